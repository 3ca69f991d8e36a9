"""Hyper-parameters have one home: defaults by data kind applied to run configs (explicit settings win,
MNIST-type ids unchanged), and DomainBed's seeded random search."""

from __future__ import annotations

import math

import pytest

from dgprune.algorithms import ALGORITHMS, default_hparams, pretrain_section, random_hparams
from dgprune.errors import ConfigError
from dgprune.experiments.config import build_config, dump_config
from dgprune.experiments.pipeline import pretrain_identity
from dgprune.training.settings import PretrainSettings

# DomainBed's hparams_registry, written out here independently of the code (docs/algorithms.md):
# name -> (low, high) of the values a draw can take, per data kind.
RANGES = {
    "mnist": {"lr": (10**-4.5, 10**-2.5), "weight_decay": (0.0, 0.0), "batch_size": (8, 512)},
    "image": {"lr": (1e-5, 10**-3.5), "weight_decay": (1e-6, 1e-2), "batch_size": (8, int(2**5.5))},
}
OWN_RANGES = {
    "mmd_gamma": (0.1, 10.0),
    "mixup_alpha": (0.1, 10.0),
    "vrex_lambda": (0.1, 1e5),
    "vrex_penalty_anneal_iters": (1, 10_000),
    "groupdro_eta": (1e-3, 0.1),
    "irm_lambda": (0.1, 1e5),
    "irm_penalty_anneal_iters": (1, 10_000),
}
INTEGER_KEYS = {"batch_size", "vrex_penalty_anneal_iters", "irm_penalty_anneal_iters"}


# ---- defaults by data kind in run configs ------------------------------------------------------------


def test_image_data_gets_domainbeds_image_defaults() -> None:
    config = build_config(overrides={"target": "photo", "data": {"name": "PACS"}})
    assert (config.pretrain.lr, config.pretrain.batch_size, config.pretrain.weight_decay) == (5e-5, 32, 0.0)
    folder = build_config(overrides={"target": "a", "data": {"name": "folder:/nowhere"}})
    assert (folder.pretrain.lr, folder.pretrain.batch_size) == (5e-5, 32)
    mnist = build_config(overrides={"target": "0", "data": {"name": "RotatedMNIST"}})
    assert (mnist.pretrain.lr, mnist.pretrain.batch_size) == (1e-3, 64)


def test_explicit_settings_win_from_every_source(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data: {name: pacs}\ntarget: photo\npretrain: {lr: 0.001}\n")
    from_file = build_config(path)
    assert (from_file.pretrain.lr, from_file.pretrain.batch_size) == (1e-3, 32)  # file's lr, default batch
    from_set = build_config(path, sets=["pretrain.batch_size=64"])
    assert (from_set.pretrain.lr, from_set.pretrain.batch_size) == (1e-3, 64)
    from_flag = build_config(path, overrides={"pretrain": {"weight_decay": 0.1}})
    assert from_flag.pretrain.weight_decay == 0.1 and from_flag.pretrain.lr == 1e-3


def test_resolved_values_are_in_the_dump_and_in_run_json() -> None:
    config = build_config(overrides={"target": "photo", "data": {"name": "pacs"}})
    assert "lr: 5.0e-05" in dump_config(config) and "batch_size: 32" in dump_config(config)
    stored = pretrain_identity(config)["config"]["pretrain"]
    assert (stored["lr"], stored["batch_size"], stored["weight_decay"]) == (5e-5, 32, 0.0)
    # Reading the dumped settings back is the same run (the values are now explicit).
    again = build_config(base=pretrain_identity(config)["config"], overrides={"prune": {}})
    assert again.pretrain_id() == config.pretrain_id()


def test_image_ids_change_mnist_ids_do_not() -> None:
    # An image config written with the old (MNIST-type) values keeps its old id; the default one differs.
    old_values = {"lr": 1e-3, "batch_size": 64, "weight_decay": 0.0}
    pinned = build_config(overrides={"target": "photo", "data": {"name": "pacs"}, "pretrain": old_values})
    default = build_config(overrides={"target": "photo", "data": {"name": "pacs"}})
    assert pinned.run_id() != default.run_id()
    assert build_config(overrides={"target": "0"}).run_id() == "8e60a205d1e5"  # tests/test_sweep.py's pin


def test_optimiser_settings_in_hparams_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"pretrain\.hparams\.lr: set pretrain\.lr instead"):
        PretrainSettings(hparams={"lr": 0.1})
    with pytest.raises(ConfigError, match=r"unknown hyper-parameter 'mmd_gamma' for algorithm 'erm'"):
        build_config(overrides={"target": "0", "pretrain": {"hparams": {"mmd_gamma": 1.0}}})
    assert PretrainSettings(algorithm="coral", hparams={"mmd_gamma": 2.0, "seed": 1}).hparams["seed"] == 1


# ---- random search -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mnist", "image"])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_random_hparams_stay_in_domainbeds_ranges(algorithm: str, kind: str) -> None:
    draws = [random_hparams(algorithm, kind, seed) for seed in range(40)]
    for values in draws:
        assert set(values) == set(default_hparams(algorithm, kind))
        for key, value in values.items():
            low, high = {**RANGES[kind], **OWN_RANGES}.get(key, (None, None))
            if low is None:  # not searched: the default
                assert value == default_hparams(algorithm, kind)[key], key
                continue
            assert low * (1 - 1e-9) <= value <= high * (1 + 1e-9), (key, value)
            assert isinstance(value, int) == (key in INTEGER_KEYS), key
    # A log-uniform draw over decades: both ends of the lr range are visited across 40 seeds.
    lrs = [math.log10(v["lr"]) for v in draws]
    low, high = (math.log10(x) for x in RANGES[kind]["lr"])
    assert min(lrs) < low + 0.5 and max(lrs) > high - 0.5


def test_random_hparams_are_deterministic_per_seed_and_differ_across_seeds() -> None:
    assert random_hparams("vrex", "image", 7) == random_hparams("vrex", "image", 7)
    assert random_hparams("vrex", "image", 7) != random_hparams("vrex", "image", 8)
    assert len({random_hparams("erm", "image", seed)["lr"] for seed in range(20)}) == 20
    # Each key has its own stream: the common keys do not depend on the algorithm's other keys.
    erm, irm = random_hparams("erm", "image", 3), random_hparams("irm", "image", 3)
    assert all(erm[key] == irm[key] for key in ("lr", "weight_decay", "batch_size"))


def test_fixed_values_win_over_the_draws() -> None:
    drawn = random_hparams("coral", "image", 5)
    fixed = random_hparams("coral", "image", 5, fixed={"lr": 0.5, "mmd_gamma": 1.0})
    assert fixed["lr"] == 0.5 and fixed["mmd_gamma"] == 1.0
    assert {k: v for k, v in fixed.items() if k not in ("lr", "mmd_gamma")} == {
        k: v for k, v in drawn.items() if k not in ("lr", "mmd_gamma")
    }
    with pytest.raises(ConfigError, match="unknown hyper-parameter 'irm_lambda'"):
        random_hparams("coral", "image", 5, fixed={"irm_lambda": 1.0})


def test_a_drawn_point_is_a_valid_run_config_section() -> None:
    values = random_hparams("irm", "image", 11)
    section = pretrain_section(values)
    assert set(section) == {"lr", "weight_decay", "batch_size", "hparams"}
    assert set(section["hparams"]) == {"irm_lambda", "irm_penalty_anneal_iters"}
    config = build_config(
        overrides={"target": "photo", "data": {"name": "pacs"}, "pretrain": {"algorithm": "irm", **section}}
    )
    assert config.pretrain.lr == values["lr"] and config.pretrain.batch_size == values["batch_size"]
    assert config.pretrain.hparams["irm_lambda"] == values["irm_lambda"]
