"""What a pruning criterion is: the inputs it scores, its declaration (``CriterionSpec``) and its
parameters (a pydantic model). A criterion in a file of its own imports from here (not from
``pruning/criteria.py``, which imports it to register it): docs/architecture.md, "A pruning criterion".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class ScoreInputs:
    gates: torch.Tensor  # [M] current gate values (1 alive, 0 pruned)
    domain_grads: torch.Tensor | None = None  # [N, M] G_i,m = dR_i/dg_m
    risks: torch.Tensor | None = None  # [N] per-domain mean cross-entropy
    filter_l1: torch.Tensor | None = None  # [M] sum of |W| over the group's output filters
    norm_scale: torch.Tensor | None = None  # [M] sum of |gamma| over the group's normalisations
    loss_change: torch.Tensor | None = None  # [M] mean risk minus mean risk with the channel removed
    val_domain_grads: torch.Tensor | None = None  # [N, M] dR_i/dg_m on a source-validation batch
    val_risks: torch.Tensor | None = None  # [N] per-domain risks on that validation batch


def contributions(inputs: ScoreInputs) -> torch.Tensor:
    """[N, M] ``c_{i,m} = G_{i,m} g_m``: each domain's first-order Taylor contribution."""
    return require(inputs.domain_grads, "domain_grads") * inputs.gates


def require(value: torch.Tensor | None, name: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"this criterion needs {name}")
    return value


class CriterionParams(BaseModel):
    """Base of a criterion's parameters: frozen, and a misspelt name is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(CriterionParams):
    pass


def plain(function: Callable[[ScoreInputs], torch.Tensor]) -> Callable[[ScoreInputs, Any], torch.Tensor]:
    return lambda inputs, _params: function(inputs)


@dataclass(frozen=True)
class CriterionSpec:
    """Everything about one criterion: its score, its parameters and what must be computed for it."""

    name: str
    score: Callable[[ScoreInputs, Any], torch.Tensor]  # (inputs, validated params) -> [M]
    params: type[CriterionParams] = NoParams
    needs_gradients: bool = False  # per-domain gate gradients of the training batch
    needs_weights: bool = False  # filter L1 norms and normalisation scales
    needs_loss_changes: bool = False  # the oracle: one extra forward per alive channel
    needs_val_gradients: bool = False  # per-domain gate gradients of a source-validation batch
    random: bool = False  # draws from a seeded generator
    # Share of the score that is a variance term (IoR family); None: IoR at alpha = 1 is reported.
    variance_share: Callable[[ScoreInputs, Any], float] | None = None
