"""DomainBed's random hyper-parameter search as the sweep file's ``hparams_seed`` grid axis."""

from __future__ import annotations

import pytest
import yaml

from dgprune.algorithms import pretrain_section, random_hparams
from dgprune.errors import ConfigError
from dgprune.experiments.sweep import expand_grid, load_sweep

BASE = {"data": {"name": "rotated_digits"}, "model": {"name": "mnist_cnn"}}


def _configs(grid: dict, base: dict | None = None):
    return expand_grid(base if base is not None else BASE, [{"target": "0", **grid}])


def test_seed_zero_is_the_defaults_and_other_seeds_are_the_registry_draws():
    plain = _configs({"pretrain.algorithm": "coral"})
    searched = _configs({"pretrain.algorithm": "coral", "hparams_seed": [0, 1, 2]})
    assert len(searched) == 3
    by_id = {c.run_id(): c for c in searched}
    assert plain[0].run_id() in by_id  # hparams_seed 0: the same run as no search at all
    drawn = [c for c in searched if c.run_id() != plain[0].run_id()]
    expected = [pretrain_section(random_hparams("coral", "mnist", seed)) for seed in (1, 2)]
    got = [
        {"lr": c.pretrain.lr, "weight_decay": c.pretrain.weight_decay, "batch_size": c.pretrain.batch_size,
         "mmd_gamma": c.pretrain.hparams["mmd_gamma"]}
        for c in drawn
    ]
    want = [
        {"lr": e["lr"], "weight_decay": e["weight_decay"], "batch_size": e["batch_size"],
         "mmd_gamma": e["hparams"]["mmd_gamma"]}
        for e in expected
    ]
    assert sorted(got, key=str) == sorted(want, key=str)
    assert len({c.pretrain_id() for c in searched}) == 3  # each draw is its own pretrained model


def test_explicit_settings_win_over_the_draws():
    base = {**BASE, "pretrain": {"lr": 0.002, "hparams": {"mmd_gamma": 3.0}}}
    searched = _configs({"pretrain.algorithm": "coral", "hparams_seed": [1, 2, 3]}, base)
    assert {c.pretrain.lr for c in searched} == {0.002}
    assert {c.pretrain.hparams["mmd_gamma"] for c in searched} == {3.0}
    assert len({c.pretrain.batch_size for c in searched}) > 1  # the others are still drawn


def test_bad_hparams_seed_names_the_grid(tmp_path):
    with pytest.raises(ConfigError, match=r"grid 0: hparams_seed must be integers >= 0 .* got -1"):
        _configs({"hparams_seed": [-1]})
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "grid": {"target": "0", "hparams_seed": [0, 1]}}))
    assert len(load_sweep(path).configs()) == 2
