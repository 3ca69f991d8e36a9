"""Deep CORAL (Sun & Saenko 2016) as DomainBed implements it: align feature means and covariances."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import ClassVar

import torch

from dgprune.algorithms.base import Algorithm, DomainOutput, ForwardFn, Minibatches, domain_risks
from dgprune.algorithms.hparams import HParam, LogUniform


def coral_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean_d (mu_a - mu_b)^2 + mean_{d,e} (C_a - C_b)^2 of two [n, D] feature sets, C with n - 1."""
    mean_a, mean_b = a.mean(0, keepdim=True), b.mean(0, keepdim=True)
    cent_a, cent_b = a - mean_a, b - mean_b
    cov_a = cent_a.T @ cent_a / (len(a) - 1)
    cov_b = cent_b.T @ cent_b / (len(b) - 1)
    return (mean_a - mean_b).pow(2).mean() + (cov_a - cov_b).pow(2).mean()


class CORAL(Algorithm):
    """Mean per-domain cross-entropy + mmd_gamma * mean over domain pairs i < j of the CORAL distance
    between their classifier-input features."""

    name = "coral"
    forward_mode = "per_domain"  # DomainBed's CORAL featurizes each domain's mini-batch separately
    own_hparams: ClassVar[Mapping[str, HParam]] = {
        "mmd_gamma": HParam(
            1.0, LogUniform(-1, 1), "CORAL: weight of the mean + covariance alignment penalty"
        ),
    }

    def objective(
        self, outputs: list[DomainOutput], minibatches: Minibatches, forward: ForwardFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        small = [i for i, o in enumerate(outputs) if len(o.y) < 2]
        if small:
            raise ValueError(f"CORAL needs at least 2 samples per domain (covariance); domains {small}")
        nll = domain_risks(outputs).mean()
        pairs = list(itertools.combinations(range(len(outputs)), 2))
        if pairs:
            penalty = torch.stack(
                [coral_distance(outputs[i].features, outputs[j].features) for i, j in pairs]
            )
            penalty = penalty.mean()
        else:  # one source domain: nothing to align (DomainBed adds 0)
            penalty = nll.new_zeros(())
        loss = nll + self.hparams["mmd_gamma"] * penalty
        return loss, {
            "loss": float(loss.detach()),
            "nll": float(nll.detach()),
            "penalty": float(penalty.detach()),
        }
