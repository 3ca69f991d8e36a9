"""docs/architecture.md's worked examples (a criterion, an algorithm: one file + one registry line) and
the one registry style shared by datasets, models, algorithms and criteria."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dgprune.algorithms import ALGORITHMS, default_hparams, make_algorithm, random_hparams
from dgprune.data import DATASETS, MultiDomainDataset, dataset_kind, load_dataset, register_dataset
from dgprune.data.domains import Domain
from dgprune.errors import ConfigError, DataError
from dgprune.experiments.config import build_config
from dgprune.models import MODELS, build_model
from dgprune.pruning.criteria import CRITERIA, REGISTRY, ScoreInputs, make_criterion
from dgprune.registry import Registry

sys.path.insert(0, str(Path(__file__).parents[1] / "docs" / "examples"))
from my_algorithm import SoftWorst
from my_criterion import SPEC

# ---- the criterion example ------------------------------------------------------------------------


def test_mean_abs_taylor_scores_and_is_accepted_once_registered(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="must be one of"):
        build_config(overrides={"target": "0", "prune": {"criterion": "mean_abs_taylor"}})
    monkeypatch.setitem(REGISTRY, SPEC.name, SPEC)  # the one registry line, at run time
    inputs = ScoreInputs(
        gates=torch.tensor([1.0, 1.0, 0.0]),
        domain_grads=torch.tensor([[1.0, -2.0, 3.0], [-1.0, 2.0, 1.0]]),
        risks=torch.tensor([0.1, 0.2]),
    )
    # mean_i |G_im g_m| by hand: (|1| + |-1|) / 2, (|-2| + |2|) / 2, 0 (pruned)
    assert torch.equal(make_criterion("Mean_Abs_Taylor").score(inputs), torch.tensor([1.0, 2.0, 0.0]))
    config = build_config(overrides={"target": "0", "prune": {"criterion": "mean_abs_taylor"}})
    assert config.prune.criterion == "mean_abs_taylor"
    taylor = build_config(overrides={"target": "0", "prune": {"criterion": "taylor"}})
    assert config.run_id() != taylor.run_id()
    assert "mean_abs_taylor" not in CRITERIA  # the built-ins are unchanged


# ---- the algorithm example ------------------------------------------------------------------------


def test_soft_worst_objective_hparams_and_config(monkeypatch) -> None:
    monkeypatch.setitem(ALGORITHMS, SoftWorst.name, SoftWorst)
    assert default_hparams("soft_worst", "mnist")["soft_worst_tau"] == 1.0
    assert all(0.01 <= random_hparams("soft_worst", "image", s)["soft_worst_tau"] <= 10 for s in range(20))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    algorithm = make_algorithm("SoftWorst", model, 3, {"soft_worst_tau": 0.5})
    with torch.no_grad():
        risks = [nn.functional.cross_entropy(model(x), y).item() for x, y in batches]
        loss, _ = algorithm.objective(algorithm._forward_outputs(batches), batches, algorithm._forward)
    # tau log(mean_i exp(R_i / tau)), computed independently in float64
    expected = 0.5 * math.log(sum(math.exp(r / 0.5) for r in risks) / 3)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert max(risks) >= loss.item() >= sum(risks) / 3 - 1e-6  # between the mean and the worst risk
    algorithm.update(batches)  # a pretraining step runs
    config = build_config(
        overrides={"target": "0", "pretrain": {"algorithm": "soft_worst", "hparams": {"soft_worst_tau": 2.0}}}
    )
    assert config.pretrain.algorithm == "soft_worst"


# ---- the registries -------------------------------------------------------------------------------


def test_registry_resolves_spellings_and_lists_valid_names() -> None:
    registry: Registry[int] = Registry("widget")
    registry.register("big_one", 1)
    registry.register("alpha", 2)
    assert registry.names() == ("big_one", "alpha")  # registration order
    assert registry.lookup("BigOne") == 1 and registry.resolve("big-one") == "big_one"
    with pytest.raises(ConfigError, match=r"unknown widget 'gamma'; valid: big_one, alpha \(any case"):
        registry.lookup("gamma")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("alpha", 3)
    with pytest.raises(ValueError, match="spelt like the registered 'big_one'"):
        registry.register("bigone", 3)
    registry["alpha"] = 4  # the mapping API replaces
    assert dict(registry) == {"big_one": 1, "alpha": 4}
    assert Registry("x", sort_names=True, extra_names=("z",)).listing() == ("z",)


def test_the_four_registries_share_the_style() -> None:
    assert isinstance(DATASETS, Registry) and isinstance(MODELS, Registry)
    assert isinstance(ALGORITHMS, Registry) and isinstance(REGISTRY, Registry)
    for lookup, error in (
        (lambda: load_dataset("pacs2"), DataError),
        (lambda: build_model("vgg", 2, 3), ConfigError),
        (lambda: make_algorithm("dann", nn.Linear(2, 2), 2), ConfigError),
        (lambda: make_criterion("l2"), ConfigError),
    ):
        with pytest.raises(error, match=r"unknown \w+ '\w+'; valid: "):
            lookup()
    assert list(DATASETS) == sorted(DATASETS)  # datasets are listed sorted
    assert tuple(MODELS) == ("mnist_cnn", "resnet18", "resnet50")
    config = build_config(overrides={"target": "0", "model": {"name": "ResNet18"}})
    assert config.model.name == "resnet18"  # any spelling, one id
    assert (
        build_config(overrides={"target": "0", "prune": {"criterion": "IoR"}}).run_id()
        == build_config(overrides={"target": "0"}).run_id()
    )


def _tiny(kind: str, seed: int = 0) -> MultiDomainDataset:
    domains = [Domain(f"d{i}", torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])) for i in range(2)]
    return MultiDomainDataset("tiny", domains, ["a", "b"], data_kind=kind)


def test_registered_dataset_kind_chooses_defaults_and_must_match(monkeypatch) -> None:
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))  # undone after the test
    register_dataset("tiny_photos", lambda seed=0: _tiny("image"), data_kind="image")
    assert dataset_kind("Tiny-Photos") == "image"
    assert build_config(overrides={"target": "d0", "data": {"name": "tiny_photos"}}).pretrain.lr == 5e-5
    assert load_dataset("tiny_photos").data_kind == "image"
    register_dataset("tiny_wrong", lambda seed=0: _tiny("image"))  # registered as mnist (the default)
    with pytest.raises(DataError, match=r"registered with data_kind 'mnist'.*data_kind='image'"):
        load_dataset("tiny_wrong")
