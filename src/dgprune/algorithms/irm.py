"""IRMv1 (Arjovsky et al. 2019, "Invariant risk minimization"), as DomainBed implements it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import autograd

from dgprune.algorithms.base import AnnealedPenaltyAlgorithm, DomainOutput, ForwardFn, Minibatches
from dgprune.algorithms.hparams import HParam, LogUniform


def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DomainBed's unbiased IRMv1 penalty: product of d/dw CE(w * logits, y) at w = 1 on the even and on
    the odd samples (two independent estimates of the gradient, so the product estimates its square)."""
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    loss_1 = F.cross_entropy(logits[::2] * scale, y[::2])
    loss_2 = F.cross_entropy(logits[1::2] * scale, y[1::2])
    # create_graph: the penalty itself is differentiated by the training backward.
    (grad_1,) = autograd.grad(loss_1, [scale], create_graph=True)
    (grad_2,) = autograd.grad(loss_2, [scale], create_graph=True)
    return torch.sum(grad_1 * grad_2)


class IRM(AnnealedPenaltyAlgorithm):
    """mean_i R_i + w * mean_i penalty_i, w = 1 before irm_penalty_anneal_iters, then irm_lambda."""

    name = "irm"
    forward_mode = "concat"
    lambda_key = "irm_lambda"
    anneal_key = "irm_penalty_anneal_iters"
    own_hparams: ClassVar[Mapping[str, HParam]] = {
        "irm_lambda": HParam(
            100.0, LogUniform(-1, 5), "IRM: weight of the invariance penalty once annealing is over"
        ),
        "irm_penalty_anneal_iters": HParam(
            500,
            LogUniform(0, 4, integer=True),
            "IRM: steps with penalty weight 1 before irm_lambda (Adam is reset then)",
        ),
    }

    def objective(
        self, outputs: list[DomainOutput], minibatches: Minibatches, forward: ForwardFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        small = [i for i, o in enumerate(outputs) if len(o.y) < 2]
        if small:
            raise ValueError(f"IRM needs at least 2 samples per domain (two halves); domains {small}")
        nll = torch.stack([F.cross_entropy(o.logits, o.y) for o in outputs]).mean()
        penalty = torch.stack([irm_penalty(o.logits, o.y) for o in outputs]).mean()
        return self.penalised(nll, penalty)
