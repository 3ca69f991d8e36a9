"""One training step that also yields exact per-domain gate gradients.

Two BatchNorm modes (``prune.bn_mode``) decide how the sources are forwarded when the model couples
the samples of a batch (train-mode BatchNorm):

- ``per_domain`` (default): each source domain's mini-batch is forwarded on its own, through that
  domain's gate copies (see GateSet). Train-mode BatchNorm therefore normalises each domain's batch
  separately and the domains' graphs share parameters but no activations. The loss ``mean_i R_i``
  is backpropagated once; the gradient in domain i's gate copy is then exactly ``(1/N) dR_i/dg``:
  per-domain gradients at no extra cost.
- ``mixed``: the sources are forwarded as ONE concatenated batch (train-mode BatchNorm normalises over
  all sources, as pretraining and the paper do) through a single gate vector. Domain j's samples
  then influence domain i's risk through the batch statistics, so one backward cannot separate the
  domains: each domain's exact gradient ``dR_i/dg`` of that mixed forward is taken with its own
  ``torch.autograd.grad(R_i, gates, retain_graph=True)``, then the training loss is backpropagated
  once for the parameters. Cost: N extra partial backward passes (down to the first gated layer,
  without parameter gradients) per step. ``mixed_grads="batched"`` issues the N passes as one
  backward under ``torch.func.vmap`` (one-hot cotangents): same gradients, fewer and larger kernels,
  but the same arithmetic, because BatchNorm's backward spreads each domain's cotangent over every
  sample; see ``_batched_risk_gradients`` and docs/benchmarks.md for when that pays.

A model whose layers never mix samples (no train-mode BatchNorm) is forwarded once on the
concatenated batch in both modes, each sample gated by its own domain's copy: the two modes are the
same computation there, one forward and one backward.

``gate_gradients`` gives the same per-domain gate gradients for batches that must not train the
model (e.g. held-out validation batches): parameter ``.grad`` and BatchNorm statistics are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dgprune.algorithms.base import DomainOutput
from dgprune.models.features import forward_with_features
from dgprune.pruning.gates import GateSet

BnMode = Literal["per_domain", "mixed"]
BN_MODES: tuple[str, ...] = ("per_domain", "mixed")
# How mixed mode takes its N per-domain gradients: N autograd.grad calls, or one vmapped backward.
MixedGrads = Literal["loop", "batched"]
MIXED_GRADS: tuple[str, ...] = ("loop", "batched")

Batches = list[tuple[torch.Tensor, torch.Tensor]]


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
    batches: Batches,
    objective: Objective | None = None,
    bn_mode: BnMode = "per_domain",
    mixed_grads: MixedGrads = "loop",
) -> DomainStep:
    """Forward the domains (as ``bn_mode`` says), return risks and exact per-domain gate gradients.

    Without ``objective`` the training loss is ``mean_i R_i`` (ERM); in ``per_domain`` mode one
    backward then yields both the parameter gradients and the gate gradients. With another
    ``objective`` (a DG algorithm's, e.g. CORAL), the gate gradients still come from the plain
    per-domain cross-entropies — IoR's risks — via ``autograd.grad``, and the objective is
    backpropagated separately. Parameter gradients are accumulated in ``.grad``; the caller steps
    the optimizer. ``mixed_grads`` only matters in mixed mode (see the module docstring).
    """
    num_domains = len(batches)
    shared = _shared_gates(model, bn_mode)
    gates.begin_scoring(1 if shared else num_domains)
    outputs = _gated_forward(model, gates, batches, shared)
    risk_vector = torch.stack([F.cross_entropy(o.logits, o.y) for o in outputs])
    if objective is None and not shared:
        loss = risk_vector.mean()
        loss.backward()
        # d(mean R)/d(copy i) = (1/N) dR_i/dg: undo the 1/N to get each domain's own gradient.
        domain_grads = gates.domain_gradients().detach() * num_domains
    else:
        domain_grads = _risk_gradients(risk_vector, gates, shared, True, mixed_grads)
        if objective is None:
            loss = risk_vector.mean()
        else:
            with gates.masked():  # extra forwards (Mixup's mixed images) see the masks, not a copy
                loss, _ = objective(outputs, batches, lambda x: forward_with_features(model, x))
        loss.backward()
    gates.end_scoring()
    correct = sum(int((o.logits.argmax(dim=1) == o.y).sum()) for o in outputs)
    seen = sum(len(o.y) for o in outputs)
    return DomainStep(float(loss.detach()), risk_vector.detach(), domain_grads, correct, seen)


def gate_gradients(
    model: nn.Module,
    gates: GateSet,
    batches: Batches,
    bn_mode: BnMode = "per_domain",
    mixed_grads: MixedGrads = "loop",
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N] risks, [N, M] dR_i/dg) of ``batches`` forwarded as in training, without training on them:
    only the gates are differentiated (parameter ``.grad`` is untouched) and BatchNorm running
    statistics are restored afterwards."""
    saved_buffers = {name: b.clone() for name, b in model.named_buffers()}
    shared = _shared_gates(model, bn_mode)
    gates.begin_scoring(1 if shared else len(batches))
    try:
        outputs = _gated_forward(model, gates, batches, shared)
        risks = torch.stack([F.cross_entropy(o.logits, o.y) for o in outputs])
        grads = _risk_gradients(risks, gates, shared, False, mixed_grads)
    finally:
        gates.end_scoring()
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved_buffers[name])
    return risks.detach(), grads


def _shared_gates(model: nn.Module, bn_mode: BnMode) -> bool:
    """Whether the domains go through one shared gate vector (mixed mode with sample coupling)."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
    return bn_mode == "mixed" and mixes_samples(model)


def _risk_gradients(
    risks: torch.Tensor, gates: GateSet, shared: bool, retain_graph: bool, mixed_grads: MixedGrads = "loop"
) -> torch.Tensor:
    """[N, M] dR_i/dg. With per-domain copies one autograd.grad of sum_i R_i separates the domains
    (R_i only sees copy i); with one shared gate vector each domain needs its own backward pass,
    looped or batched (``mixed_grads``)."""
    tensors = gates.domain_gate_tensors()
    if not shared:
        grads = torch.autograd.grad(risks.sum(), tensors, retain_graph=retain_graph)
        return torch.cat(grads, dim=1).detach()
    if mixed_grads not in MIXED_GRADS:
        raise ValueError(f"mixed_grads must be one of {', '.join(MIXED_GRADS)}, got {mixed_grads!r}")
    if mixed_grads == "batched":
        batched = _batched_risk_gradients(risks, tensors)
        if batched is not None:
            return batched
    return _looped_risk_gradients(risks, tensors, retain_graph)


def _looped_risk_gradients(
    risks: torch.Tensor, tensors: list[torch.Tensor], retain_graph: bool
) -> torch.Tensor:
    """[N, M]: one ``autograd.grad(R_i, gates)`` per domain (the reference computation)."""
    rows = []
    for index in range(len(risks)):
        keep = retain_graph or index < len(risks) - 1
        rows.append(torch.cat(torch.autograd.grad(risks[index], tensors, retain_graph=keep), dim=1))
    return torch.cat(rows, dim=0).detach()


def _batched_risk_gradients(risks: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """[N, M] from ONE backward: ``autograd.grad`` under ``torch.func.vmap`` over the rows of the
    identity (cotangent e_i of the risk vector gives row i), or None where that cannot run.

    Why torch.func.vmap and not ``autograd.grad(..., is_grads_batched=True)``: the latter uses the
    legacy vmap, which has no batching rule for convolution_backward, native_batch_norm_backward,
    _log_softmax_backward_data or nll_loss_backward and runs them as per-slice loops (torch says so
    under ``torch._C._debug_only_display_vmap_fallback_warnings(True)``): the loop plus copies.
    The graph is always retained so that a failed attempt leaves it whole for the loop. It fails
    (RuntimeError) on a backward that vmap cannot batch, e.g. a custom autograd.Function without a
    vmap rule, or when the N stacked cotangents (N times the activation-gradient memory of one
    backward) do not fit: the caller then falls back to the loop.
    """
    basis = torch.eye(len(risks), dtype=risks.dtype, device=risks.device)

    def vector_jacobian(cotangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(risks, tensors, cotangent, retain_graph=True)

    try:
        grads = torch.func.vmap(vector_jacobian)(basis)
    except RuntimeError:
        return None
    # each gate copy is [1, C] (one shared copy): its batched gradient is [N, 1, C]
    return torch.cat([grad.flatten(1) for grad in grads], dim=1).detach()


def _gated_forward(model: nn.Module, gates: GateSet, batches: Batches, shared: bool) -> list[DomainOutput]:
    sizes = [len(y) for _, y in batches]
    if shared:  # mixed BatchNorm: one batch of all sources through the single gate copy
        with gates.domain(0):
            logits, features = forward_with_features(model, torch.cat([x for x, _ in batches]))
    elif mixes_samples(model):
        outputs = []
        for index, (x, y) in enumerate(batches):
            with gates.domain(index):
                logits, features = forward_with_features(model, x)
            outputs.append(DomainOutput(logits, features, y))
        return outputs
    else:  # no sample coupling: one forward of the whole batch, each sample gated by its domain's copy
        sample_domain = torch.repeat_interleave(torch.arange(len(batches)), torch.tensor(sizes))
        with gates.domain(sample_domain.to(batches[0][0].device)):
            logits, features = forward_with_features(model, torch.cat([x for x, _ in batches]))
    return [
        DomainOutput(lg, ft, y)
        for lg, ft, (_, y) in zip(logits.split(sizes), features.split(sizes), batches, strict=True)
    ]
