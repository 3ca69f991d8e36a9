"""V-REx (Krueger et al. 2021, "Out-of-distribution generalization via risk extrapolation")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from dgprune.algorithms.base import (
    AnnealedPenaltyAlgorithm,
    DomainOutput,
    ForwardFn,
    Minibatches,
    domain_risks,
)
from dgprune.algorithms.hparams import HParam, LogUniform


class VREx(AnnealedPenaltyAlgorithm):
    """mean_i R_i + w * mean_i (R_i - mean R)^2, w = 1 before vrex_penalty_anneal_iters, then vrex_lambda."""

    name = "vrex"
    forward_mode = "concat"
    lambda_key = "vrex_lambda"
    anneal_key = "vrex_penalty_anneal_iters"
    own_hparams: ClassVar[Mapping[str, HParam]] = {
        "vrex_lambda": HParam(
            10.0, LogUniform(-1, 5), "VREx: weight of the risk-variance penalty once annealing is over"
        ),
        "vrex_penalty_anneal_iters": HParam(
            500,
            LogUniform(0, 4, integer=True),
            "VREx: steps with penalty weight 1 before vrex_lambda (Adam is reset then)",
        ),
    }

    def objective(
        self, outputs: list[DomainOutput], minibatches: Minibatches, forward: ForwardFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        risks = domain_risks(outputs)
        mean = risks.mean()
        penalty = (risks - mean).pow(2).mean()  # population variance of the domain risks
        return self.penalised(mean, penalty)
