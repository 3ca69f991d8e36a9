"""Training algorithms: DomainBed's definitions, one small class each, registered by name.

Each exposes ``objective`` (per-domain outputs -> loss, reusable during fine-tuning) and ``update`` (one
pretraining step with its own Adam). The registry (``algorithms/registry.py``) owns their names and
hyper-parameters. See docs/algorithms.md (definitions, hyper-parameters) and docs/architecture.md
(adding an algorithm).
"""

from __future__ import annotations

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
from dgprune.algorithms.hparams import OPTIMISER_KEYS, DataKind, HParam, LogUniform
from dgprune.algorithms.irm import IRM
from dgprune.algorithms.mixup import Mixup
from dgprune.algorithms.registry import (
    ALGORITHMS,
    algorithm_name,
    default_hparams,
    hparam_docs,
    hparam_specs,
    make_algorithm,
    optimiser_defaults,
    pretrain_section,
    random_hparams,
)
from dgprune.algorithms.vrex import VREx

HPARAM_DOCS: dict[str, str] = hparam_docs()

__all__ = [
    "ALGORITHMS",
    "CORAL",
    "ERM",
    "HPARAM_DOCS",
    "IRM",
    "OPTIMISER_KEYS",
    "Algorithm",
    "AnnealedPenaltyAlgorithm",
    "DataKind",
    "DomainOutput",
    "ForwardFn",
    "GroupDRO",
    "HParam",
    "LogUniform",
    "Minibatches",
    "Mixup",
    "VREx",
    "algorithm_name",
    "default_hparams",
    "domain_risks",
    "hparam_specs",
    "make_algorithm",
    "optimiser_defaults",
    "pretrain_section",
    "random_hparams",
    "split_by_domain",
]
