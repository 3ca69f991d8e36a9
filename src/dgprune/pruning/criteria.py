"""Filter-importance criteria: pure functions of per-domain gate gradients, risks and weights.

All tensors are *flat* over every prunable channel of the model (``M`` positions, see GateSet).
Higher score = more important = pruned later.

- ``taylor`` (Molchanov et al. 2019; paper Eq. 2): ``((1/N) sum_i G_i * g)^2``
- ``ior`` (paper Eq. 4): ``taylor + alpha * (dVar/dg * g)^2`` with the population variance of the
  per-domain risks, ``dVar/dg = (2/N) sum_i (R_i - mean R) G_i``
- ``random``, ``l1`` (filter weight L1 norm), ``bn_scale`` (|gamma| of the normalisation): baselines.
- ``oracle`` (paper Eq. 1): the squared real change of the mean source risk when the channel is
  removed (measured by ``pruning.oracle.loss_changes``; one forward per channel: small models only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScoreInputs:
    gates: torch.Tensor  # [M] current gate values (1 alive, 0 pruned)
    domain_grads: torch.Tensor | None = None  # [N, M] G_i,m = dR_i/dg_m
    risks: torch.Tensor | None = None  # [N] per-domain mean cross-entropy
    filter_l1: torch.Tensor | None = None  # [M] sum of |W| over the group's output filters
    norm_scale: torch.Tensor | None = None  # [M] sum of |gamma| over the group's normalisations
    loss_change: torch.Tensor | None = None  # [M] mean risk minus mean risk with the channel removed


def taylor_scores(inputs: ScoreInputs) -> torch.Tensor:
    grads = _require(inputs.domain_grads, "domain_grads")
    return (grads.mean(dim=0) * inputs.gates) ** 2


def variance_gradient(domain_grads: torch.Tensor, risks: torch.Tensor) -> torch.Tensor:
    """d Var{R_1..R_N} / d g for the population variance (as V-REx): (2/N) sum_i (R_i - mean R) G_i."""
    centred = risks - risks.mean()
    return 2.0 / risks.numel() * (centred.unsqueeze(1) * domain_grads).sum(dim=0)


def ior_scores(inputs: ScoreInputs, alpha: float = 1.0) -> torch.Tensor:
    grads = _require(inputs.domain_grads, "domain_grads")
    risks = _require(inputs.risks, "risks")
    ood = (variance_gradient(grads, risks) * inputs.gates) ** 2
    return taylor_scores(inputs) + alpha * ood


def l1_scores(inputs: ScoreInputs) -> torch.Tensor:
    return _require(inputs.filter_l1, "filter_l1") * inputs.gates


def bn_scale_scores(inputs: ScoreInputs) -> torch.Tensor:
    return _require(inputs.norm_scale, "norm_scale") * inputs.gates


def oracle_scores(inputs: ScoreInputs) -> torch.Tensor:
    return _require(inputs.loss_change, "loss_change").to(inputs.gates.dtype) ** 2 * inputs.gates


def _require(value: torch.Tensor | None, name: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"this criterion needs {name}")
    return value


@dataclass(frozen=True)
class Criterion:
    """A named scoring rule and what it needs computed each step."""

    name: str
    score: Callable[[ScoreInputs], torch.Tensor]
    needs_gradients: bool = False
    needs_weights: bool = False
    needs_loss_changes: bool = False  # the oracle: one extra forward per alive channel
    generator: torch.Generator | None = None  # random draws (checkpointed so that resume is exact)


def _random_scores(generator: torch.Generator) -> Callable[[ScoreInputs], torch.Tensor]:
    def score(inputs: ScoreInputs) -> torch.Tensor:
        return torch.rand(inputs.gates.shape, generator=generator).to(inputs.gates.device)

    return score


CRITERIA: tuple[str, ...] = ("taylor", "ior", "random", "l1", "bn_scale", "oracle")


def make_criterion(name: str, alpha: float = 1.0, seed: int = 0) -> Criterion:
    """Build a criterion by name (one of CRITERIA); ``alpha`` weighs IoR's variance term."""
    if name == "taylor":
        return Criterion("taylor", taylor_scores, needs_gradients=True)
    if name == "ior":
        return Criterion("ior", lambda inputs: ior_scores(inputs, alpha), needs_gradients=True)
    if name == "random":
        generator = torch.Generator().manual_seed(seed)
        return Criterion("random", _random_scores(generator), generator=generator)
    if name == "l1":
        return Criterion("l1", l1_scores, needs_weights=True)
    if name == "bn_scale":
        return Criterion("bn_scale", bn_scale_scores, needs_weights=True)
    if name == "oracle":
        return Criterion("oracle", oracle_scores, needs_gradients=True, needs_loss_changes=True)
    raise ValueError(f"unknown criterion {name!r}; valid: {', '.join(CRITERIA)}")
