"""One training step that also yields exact per-domain gate gradients from a single backward.

Each source domain's mini-batch is forwarded on its own, through that domain's gate copies
(see GateSet). Train-mode BatchNorm therefore normalises each domain's batch separately and the
domains' graphs share parameters but no activations. The loss ``mean_i R_i`` is backpropagated
once; the gradient in domain i's gate copy is then exactly ``(1/N) dR_i/dg``.

A model whose layers never mix samples (no train-mode BatchNorm) is forwarded once on the
concatenated batch instead, each sample gated by its own domain's copy: same result, one forward.
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


def mixes_samples(model: nn.Module) -> bool:
    """True when a forward pass couples the samples of a batch (BatchNorm using batch statistics)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
        for m in model.modules()
    )


def per_domain_forward_backward(
    model: nn.Module, gates: GateSet, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> DomainStep:
    """Forward every domain separately, backward ``mean_i R_i`` once, return risks and gate grads.

    Parameter gradients are accumulated in ``.grad`` as by ``loss.backward()``: the caller steps
    the optimizer.
    """
    num_domains = len(batches)
    gates.begin_scoring(num_domains)
    if mixes_samples(model):
        outputs = []
        for index, (x, _) in enumerate(batches):
            with gates.domain(index):
                outputs.append(model(x))
    else:
        sizes = [len(y) for _, y in batches]
        sample_domain = torch.repeat_interleave(torch.arange(num_domains), torch.tensor(sizes))
        with gates.domain(sample_domain.to(batches[0][0].device)):
            outputs = list(model(torch.cat([x for x, _ in batches])).split(sizes))
    risks = [F.cross_entropy(logits, y) for logits, (_, y) in zip(outputs, batches, strict=True)]
    correct = sum(
        int((logits.argmax(dim=1) == y).sum()) for logits, (_, y) in zip(outputs, batches, strict=True)
    )
    seen = sum(len(y) for _, y in batches)
    risk_vector = torch.stack(risks)
    loss = risk_vector.mean()
    loss.backward()
    # d(mean R)/d(copy i) = (1/N) dR_i/dg: undo the 1/N to get each domain's own gradient.
    domain_grads = gates.domain_gradients().detach() * num_domains
    gates.end_scoring()
    return DomainStep(float(loss.detach()), risk_vector.detach(), domain_grads, correct, seen)
