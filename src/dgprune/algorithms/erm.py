"""ERM as DomainBed defines it: cross-entropy over the concatenation of all domains' mini-batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dgprune.algorithms.base import Algorithm, Minibatches


class ERM(Algorithm):
    name = "erm"

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}
