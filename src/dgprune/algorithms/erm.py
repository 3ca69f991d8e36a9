"""ERM as DomainBed defines it: cross-entropy over the concatenation of all domains' mini-batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dgprune.algorithms.base import Algorithm, DomainOutput, ForwardFn, Minibatches


class ERM(Algorithm):
    """Empirical risk minimisation (Vapnik 1998), DomainBed's baseline."""

    name = "erm"
    objective_is_mean_risk = True  # exactly the mean of per-domain risks when the batch sizes are equal
    forward_mode = "concat"

    def objective(
        self, outputs: list[DomainOutput], minibatches: Minibatches, forward: ForwardFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # All samples together: with unequal batch sizes a larger domain weighs more, as in DomainBed.
        loss = F.cross_entropy(torch.cat([o.logits for o in outputs]), torch.cat([o.y for o in outputs]))
        return loss, {"loss": float(loss.detach())}
