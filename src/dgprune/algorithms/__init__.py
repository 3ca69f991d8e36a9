"""Training algorithms: DomainBed's definitions, one small class each, registered by name.

Each exposes ``objective`` (per-domain outputs -> loss, reusable during fine-tuning) and ``update`` (one
pretraining step with its own Adam). See docs/algorithms.md (definitions) and docs/architecture.md
(adding an algorithm).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from dgprune.algorithms.base import (
    Algorithm,
    AnnealedPenaltyAlgorithm,
    DomainOutput,
    ForwardFn,
    Minibatches,
    domain_risks,
    split_by_domain,
)
from dgprune.algorithms.coral import CORAL
from dgprune.algorithms.erm import ERM
from dgprune.algorithms.groupdro import GroupDRO
from dgprune.algorithms.hparams import HPARAM_DOCS, DataKind, default_hparams
from dgprune.algorithms.irm import IRM
from dgprune.algorithms.mixup import Mixup
from dgprune.algorithms.vrex import VREx
from dgprune.names import resolve_name

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (ERM, CORAL, Mixup, VREx, GroupDRO, IRM)}


def algorithm_name(name: str) -> str:
    """The canonical name of algorithm ``name`` in any case or DomainBed's spelling (``ERM``, ``VREx``,
    ``GroupDRO``); ConfigError listing the valid names otherwise."""
    return resolve_name(name, ALGORITHMS, "algorithm")


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
    name = algorithm_name(name)
    return ALGORITHMS[name](model, num_domains, hparams, data_kind=data_kind)


__all__ = [
    "ALGORITHMS",
    "CORAL",
    "ERM",
    "HPARAM_DOCS",
    "IRM",
    "Algorithm",
    "AnnealedPenaltyAlgorithm",
    "DataKind",
    "DomainOutput",
    "ForwardFn",
    "GroupDRO",
    "Minibatches",
    "Mixup",
    "VREx",
    "algorithm_name",
    "default_hparams",
    "domain_risks",
    "make_algorithm",
    "split_by_domain",
]
