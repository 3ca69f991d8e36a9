"""``target_entropy``: the first-order change of the target's mean prediction entropy when a channel is
removed, with its sign a parameter. Needs ``prune.target_access: unlabeled`` (the target's images,
never its labels); scored once per pruning event, in evaluation mode.

``H(g) = (1/n) sum_x -sum_k p_k(x) log p_k(x)`` over a fixed sample of ``images`` target images, and
``dH_m = H(g - g_m e_m) - H(g) ~ -g_m dH/dg_m`` (Taylor at the current gates, from one backward of H to
the gates only). The score is ``sign * dH_m``, higher kept: ``sign = +1`` prunes first the channels
whose removal *lowers* the target entropy (makes the target's predictions more confident), ``sign = -1``
those whose removal raises it.

``sign`` has no default: which direction pays is not known in advance. Measured against the labelled
target oracle (the real entropy change per removed channel against the real target risk rise), the
correlation was -0.31 on one held-out benchmark and +0.02 to +0.06 on the rotated digits. Choose it
without target labels, e.g. by leave-one-source-out validation (each source as the pseudo-target,
DomainBed's second selection method), and report what the other sign gives (docs/criteria.md).

Cost per pruning event: one forward and one backward (to the gates, no weight gradients) of
``images`` target images.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dgprune.pruning.criterion_spec import CriterionSpec, EventParams, ScoreInputs, require
from dgprune.pruning.gates import GateSet


class TargetEntropyParams(EventParams):
    sign: Literal[1, -1] = Field(
        description="+1: prune first what lowers the target entropy; -1: what raises it (no default)"
    )


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B] -> scalar sum over the batch of each prediction's entropy, in nats."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum()


def entropy_gate_gradients(
    model: nn.Module, gates: GateSet, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, float]:
    """([M] dH/dg, H) of the mean prediction entropy ``H`` over ``images``, in evaluation mode; only the
    gates are differentiated (parameter ``.grad`` and BatchNorm statistics are untouched)."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    total = torch.zeros(gates.total, dtype=dtype, device=images.device)
    entropy = 0.0
    gates.begin_scoring(1)
    try:
        for start in range(0, len(images), batch_size):
            with gates.domain(0):
                logits = model(images[start : start + batch_size])
            part = mean_entropy(logits) / len(images)
            grads = torch.autograd.grad(part, gates.domain_gate_tensors())
            total += torch.cat([g.flatten() for g in grads]).to(total.device)
            entropy += float(part.detach())
    finally:
        gates.end_scoring()
        model.train(was_training)
    return total, entropy


def entropy_change(inputs: ScoreInputs) -> torch.Tensor:
    """[M] ``-g_m dH/dg_m``: the predicted change of the target's mean entropy when channel m goes."""
    probe = require(inputs.probe, "probe")
    target = require(probe.target, "the target's images (prune.target_access unlabeled)")
    grads, _ = entropy_gate_gradients(probe.model, probe.gates, target)
    return -grads * inputs.gates.to(grads)


def _target_entropy(inputs: ScoreInputs, params: TargetEntropyParams) -> torch.Tensor:
    return params.sign * entropy_change(inputs)


SPEC = CriterionSpec(
    "target_entropy",
    _target_entropy,
    TargetEntropyParams,
    needs=frozenset({"target_images"}),
    scored="per_pruning_event",
)
