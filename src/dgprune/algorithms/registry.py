"""The algorithm registry: one line per algorithm, and the functions that look algorithms up by name.

Adding an algorithm = one new file (a subclass of ``Algorithm`` with its ``name``, ``forward_mode``,
``own_hparams`` and ``objective``) + its line in ``ALGORITHMS`` below (docs/architecture.md).
The registry also owns every hyper-parameter's default and random-search distribution: the common
ones (optimiser settings, by data kind) from ``algorithms/hparams.py``, the others from each class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from dgprune.algorithms.base import Algorithm
from dgprune.algorithms.coral import CORAL
from dgprune.algorithms.erm import ERM
from dgprune.algorithms.groupdro import GroupDRO
from dgprune.algorithms.hparams import OPTIMISER_KEYS, DataKind, HParam, common_hparams, draw_hparams
from dgprune.algorithms.irm import IRM
from dgprune.algorithms.mixup import Mixup
from dgprune.algorithms.vrex import VREx
from dgprune.registry import DATA_KINDS, Registry

ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")
for _algorithm in (ERM, CORAL, Mixup, VREx, GroupDRO, IRM):  # the registry lines
    ALGORITHMS.register(_algorithm.name, _algorithm)


def algorithm_name(name: str) -> str:
    """The canonical name of algorithm ``name`` in any case or DomainBed's spelling (``ERM``, ``VREx``,
    ``GroupDRO``); ConfigError listing the valid names otherwise."""
    return ALGORITHMS.resolve(name)


def make_algorithm(
    name: str,
    model: nn.Module,
    num_domains: int,
    hparams: Mapping[str, Any] | None = None,
    *,
    data_kind: DataKind = "image",
) -> Algorithm:
    """The algorithm ``name`` for ``model`` over ``num_domains`` source domains; ``hparams`` override
    ``default_hparams(name, data_kind)`` (an unknown key is a ConfigError)."""
    return ALGORITHMS.lookup(name)(model, num_domains, hparams, data_kind=data_kind)


def hparam_specs(algorithm: str, data_kind: DataKind = "image") -> dict[str, HParam]:
    """Every hyper-parameter of ``algorithm`` for ``data_kind``: the common ones, then its own."""
    return {**common_hparams(data_kind), **ALGORITHMS.lookup(algorithm).own_hparams}


def default_hparams(algorithm: str, data_kind: DataKind = "image") -> dict[str, Any]:
    """DomainBed's default hyper-parameters of ``algorithm`` for ``data_kind`` (a fresh dict)."""
    return {key: spec.default for key, spec in hparam_specs(algorithm, data_kind).items()}


def optimiser_defaults(algorithm: str, data_kind: DataKind) -> dict[str, Any]:
    """The defaults of the optimiser settings (lr, weight_decay, batch_size) of ``algorithm`` on data of
    ``data_kind``: what a run config's ``pretrain`` section uses where it does not set them."""
    defaults = default_hparams(algorithm, data_kind)
    return {key: defaults[key] for key in OPTIMISER_KEYS}


def random_hparams(
    algorithm: str, data_kind: DataKind, seed: int, fixed: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One point of DomainBed's random hyper-parameter search for ``algorithm`` on data of ``data_kind``.

    Every hyper-parameter of the algorithm (``default_hparams``' keys: lr, weight_decay, batch_size,
    seed and the algorithm's own) is drawn from DomainBed's distribution for that data kind
    (docs/algorithms.md lists them); one without a distribution (seed, MNIST-type weight decay,
    mixup_fixed_lambda) keeps its default. Deterministic: the same (``seed``, key) gives the same value
    on every machine, and a key's value does not depend on the algorithm's other keys, so two
    algorithms drawn with the same ``seed`` share lr, weight_decay and batch_size (paired comparisons).
    ``fixed``: values that win over the draws (settings given explicitly); an unknown key is a
    ConfigError. DomainBed's own sweep uses ``seed = hash(hparams_seed, trial_seed)`` and the defaults
    for ``hparams_seed`` 0; that choice is the caller's.

    For a run config, split the result with :func:`pretrain_section`.
    """
    return draw_hparams(hparam_specs(algorithm, data_kind), seed, fixed)


def pretrain_section(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` (e.g. from :func:`random_hparams`) as a run config's ``pretrain`` section: the
    optimiser settings as ``lr`` / ``weight_decay`` / ``batch_size``, the algorithm's own keys under
    ``hparams``. ``seed`` is left out: the run's seed drives the algorithm's draws unless a config sets
    ``pretrain.hparams.seed`` itself."""
    section: dict[str, Any] = {key: hparams[key] for key in OPTIMISER_KEYS if key in hparams}
    own = {k: v for k, v in hparams.items() if k not in OPTIMISER_KEYS and k != "seed"}
    if own:
        section["hparams"] = own
    return section


def hparam_docs() -> dict[str, str]:
    """One line per hyper-parameter key of every registered algorithm (the common keys first)."""
    docs = {key: spec.doc for key, spec in common_hparams(DATA_KINDS[0]).items()}
    for name in ALGORITHMS.names():
        docs.update({key: spec.doc for key, spec in ALGORITHMS[name].own_hparams.items()})
    return docs
