"""One training step that also yields exact per-domain gate gradients from a single backward.

Each source domain's mini-batch is forwarded on its own, through that domain's gate copies
(see GateSet). Train-mode BatchNorm therefore normalises each domain's batch separately and the
domains' graphs share parameters but no activations. The loss ``mean_i R_i`` is backpropagated
once; the gradient in domain i's gate copy is then exactly ``(1/N) dR_i/dg``.

A model whose layers never mix samples (no train-mode BatchNorm) is forwarded once on the
concatenated batch instead, each sample gated by its own domain's copy: same result, one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dgprune.algorithms.base import DomainOutput
from dgprune.models.features import forward_with_features
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


Objective = Callable[
    [list[DomainOutput], list[tuple[torch.Tensor, torch.Tensor]], Callable[[torch.Tensor], tuple]],
    tuple[torch.Tensor, dict[str, float]],
]


def per_domain_forward_backward(
    model: nn.Module,
    gates: GateSet,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    objective: Objective | None = None,
) -> DomainStep:
    """Forward every domain through its gate copies, return risks and exact per-domain gate grads.

    Without ``objective`` the training loss is ``mean_i R_i`` (ERM) and one backward yields both
    the parameter gradients and the gate gradients. With another ``objective`` (a DG algorithm's,
    e.g. CORAL), the gate gradients still come from the plain per-domain cross-entropies — IoR's
    risks — via ``autograd.grad(sum_i R_i, gate copies)``, and the objective is backpropagated
    separately: two backward passes. Parameter gradients are accumulated in ``.grad``; the caller
    steps the optimizer.
    """
    num_domains = len(batches)
    gates.begin_scoring(num_domains)
    outputs = _gated_forward(model, gates, batches)
    risk_vector = torch.stack([F.cross_entropy(o.logits, o.y) for o in outputs])
    if objective is None:
        loss = risk_vector.mean()
        loss.backward()
        # d(mean R)/d(copy i) = (1/N) dR_i/dg: undo the 1/N to get each domain's own gradient.
        domain_grads = gates.domain_gradients().detach() * num_domains
    else:
        # d(sum R)/d(copy i) = dR_i/dg, since domain i's risk only sees its own copy.
        grads = torch.autograd.grad(risk_vector.sum(), gates.domain_gate_tensors(), retain_graph=True)
        domain_grads = torch.cat(grads, dim=1).detach()
        with gates.masked():  # extra forwards (Mixup's mixed images) see the masks, not a copy
            loss, _ = objective(outputs, batches, lambda x: forward_with_features(model, x))
        loss.backward()
    gates.end_scoring()
    correct = sum(int((o.logits.argmax(dim=1) == o.y).sum()) for o in outputs)
    seen = sum(len(o.y) for o in outputs)
    return DomainStep(float(loss.detach()), risk_vector.detach(), domain_grads, correct, seen)


def _gated_forward(
    model: nn.Module, gates: GateSet, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[DomainOutput]:
    if mixes_samples(model):
        outputs = []
        for index, (x, y) in enumerate(batches):
            with gates.domain(index):
                logits, features = forward_with_features(model, x)
            outputs.append(DomainOutput(logits, features, y))
        return outputs
    # No sample coupling: one forward of the whole batch, each sample gated by its domain's copy.
    sizes = [len(y) for _, y in batches]
    sample_domain = torch.repeat_interleave(torch.arange(len(batches)), torch.tensor(sizes))
    with gates.domain(sample_domain.to(batches[0][0].device)):
        logits, features = forward_with_features(model, torch.cat([x for x, _ in batches]))
    return [
        DomainOutput(lg, ft, y)
        for lg, ft, (_, y) in zip(logits.split(sizes), features.split(sizes), batches, strict=True)
    ]
