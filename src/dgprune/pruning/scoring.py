"""One training step that also yields exact per-domain gate gradients from a single backward.

Each source domain's mini-batch is forwarded on its own, through that domain's gate copies
(see GateSet). Train-mode BatchNorm therefore normalises each domain's batch separately and the
domains' graphs share parameters but no activations. The loss ``mean_i R_i`` is backpropagated
once; the gradient in domain i's gate copy is then exactly ``(1/N) dR_i/dg``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dgprune.pruning.gates import GateSet


@dataclass
class DomainStep:
    loss: float  # the training loss mean_i R_i
    risks: torch.Tensor  # [N] per-domain mean cross-entropy (detached)
    domain_grads: torch.Tensor  # [N, M] dR_i/dg for every flat gate position
    correct: int
    seen: int


def per_domain_forward_backward(
    model: nn.Module, gates: GateSet, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> DomainStep:
    """Forward every domain separately, backward ``mean_i R_i`` once, return risks and gate grads.

    Parameter gradients are accumulated in ``.grad`` as by ``loss.backward()``: the caller steps
    the optimizer.
    """
    num_domains = len(batches)
    gates.begin_scoring(num_domains)
    risks = []
    correct = seen = 0
    for index, (x, y) in enumerate(batches):
        with gates.domain(index):
            logits = model(x)
        risks.append(F.cross_entropy(logits, y))
        correct += int((logits.argmax(dim=1) == y).sum())
        seen += len(y)
    risk_vector = torch.stack(risks)
    loss = risk_vector.mean()
    loss.backward()
    # d(mean R)/d(copy i) = (1/N) dR_i/dg: undo the 1/N to get each domain's own gradient.
    domain_grads = gates.domain_gradients().detach() * num_domains
    gates.end_scoring()
    return DomainStep(float(loss.detach()), risk_vector.detach(), domain_grads, correct, seen)
