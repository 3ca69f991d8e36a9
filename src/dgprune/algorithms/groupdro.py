"""GroupDRO (Sagawa et al. 2020) over source domains, as DomainBed implements it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from dgprune.algorithms.base import Algorithm, DomainOutput, ForwardFn, Minibatches, domain_risks
from dgprune.algorithms.hparams import HParam, LogUniform


class GroupDRO(Algorithm):
    """Domain weights q (uniform at start): q <- q * exp(eta * R_i) then q <- q / sum(q); loss = sum q_i R_i.

    DomainBed starts from ones and normalises after every multiplication; starting from the uniform
    distribution gives the same q from the first step on.
    """

    name = "groupdro"
    forward_mode = "per_domain"  # DomainBed forwards each domain's mini-batch separately
    own_hparams: ClassVar[Mapping[str, HParam]] = {
        "groupdro_eta": HParam(
            0.01,
            LogUniform(-3, -1),
            "GroupDRO: step size of the exponentiated-gradient update of the domain weights q",
        ),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.q = torch.full((self.num_domains,), 1.0 / self.num_domains)

    def objective(
        self, outputs: list[DomainOutput], minibatches: Minibatches, forward: ForwardFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Updates ``self.q`` (as DomainBed does inside its step): call once per training step."""
        if len(outputs) != self.num_domains:
            raise ValueError(f"GroupDRO was built for {self.num_domains} domains, got {len(outputs)}")
        risks = domain_risks(outputs)
        q = self.q.to(risks) * torch.exp(self.hparams["groupdro_eta"] * risks.detach())
        self.q = q / q.sum()
        loss = torch.dot(risks, self.q)
        stats = {"loss": float(loss.detach())}
        stats.update({f"q_{i}": float(w) for i, w in enumerate(self.q)})
        return loss, stats

    def _extra_state(self) -> dict[str, Any]:
        return {"q": self.q.detach().clone()}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.q = state["q"].detach().clone()
