"""V-REx (Krueger et al. 2021, "Out-of-distribution generalization via risk extrapolation")."""

from __future__ import annotations

import torch

from dgprune.algorithms.base import (
    AnnealedPenaltyAlgorithm,
    DomainOutput,
    ForwardFn,
    Minibatches,
    domain_risks,
)


class VREx(AnnealedPenaltyAlgorithm):
    """mean_i R_i + w * mean_i (R_i - mean R)^2, w = 1 before vrex_penalty_anneal_iters, then vrex_lambda."""

    name = "vrex"
    forward_mode = "concat"
    lambda_key = "vrex_lambda"
    anneal_key = "vrex_penalty_anneal_iters"

    def objective(
        self, outputs: list[DomainOutput], minibatches: Minibatches, forward: ForwardFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        risks = domain_risks(outputs)
        mean = risks.mean()
        penalty = (risks - mean).pow(2).mean()  # population variance of the domain risks
        return self.penalised(mean, penalty)
