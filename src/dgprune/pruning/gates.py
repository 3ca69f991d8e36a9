"""Channel gates: one vector per channel group, multiplied into the group's outputs by hooks.

A gate is 1 while its channel is alive and 0 once pruned; gates are never trained. While
scoring, each source domain gets its own *copy* of every gate vector (a leaf tensor with
``requires_grad``), and each domain's mini-batch is forwarded separately with its own copy.
The domains' graphs are then independent (train-mode BatchNorm only mixes samples of one
domain), so a single backward of ``sum_i w_i R_i`` leaves ``w_i * dR_i/dg`` exactly in the
gradient of domain i's copy: the per-domain gate gradients come from one backward pass.

Models without batch-coupled layers (no train-mode BatchNorm, e.g. GroupNorm's MNIST_CNN) may
instead forward all domains in one batch with a per-sample domain index: each sample is gated by
its own domain's copy, and since samples do not interact the result is the same, only faster.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from dgprune.models.group_norm import MaskableGroupNorm
from dgprune.pruning.groups import ChannelGroup, MemberChannels


class GateSet:
    """The gates of a model's channel groups; flat position order = groups in order, then channels."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self.model = model
        self.groups = groups
        self.sizes = [g.size for g in groups]
        device = next(model.parameters()).device
        self.alive = [torch.ones(g.size, dtype=torch.bool, device=device) for g in groups]
        self._domain_gates: list[torch.Tensor] | None = None
        self._domain: int | torch.Tensor | None = None
        self._relaxed: list[torch.Tensor] | None = None  # see relaxed()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._modules = dict(model.named_modules())

    # ---- hooks -------------------------------------------------------------------------------
    def attach(self) -> GateSet:
        if self._handles:
            return self
        for group_idx, group in enumerate(self.groups):
            for site in group.gate_sites:
                order = _channel_order(site)
                hook = partial(self._apply_gate, group_idx, order)
                self._handles.append(self._modules[site.module_name].register_forward_hook(hook))
        self._sync_group_norms()
        return self

    def detach(self) -> None:
        """Remove the hooks (needed before Torch-Pruning traces the model)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _apply_gate(
        self, group_idx: int, order: torch.Tensor | None, module: nn.Module, inputs, output: torch.Tensor
    ) -> torch.Tensor:
        gate = self._current_gate(group_idx).to(output.dtype)
        if order is not None:
            gate = gate[..., order.to(gate.device)]
        if gate.dim() == 1:
            gate = gate.unsqueeze(0)  # one gate vector for the whole batch, else one per sample
        return output * gate.view(gate.shape[0], -1, *([1] * (output.dim() - 2)))

    def _current_gate(self, group_idx: int) -> torch.Tensor:
        if self._domain_gates is not None and self._domain is not None:
            return self._domain_gates[group_idx][self._domain]
        if self._relaxed is not None:
            return self.alive[group_idx].float() * self._relaxed[group_idx]
        return self.alive[group_idx].float()

    # ---- per-domain scoring --------------------------------------------------------------------
    def begin_scoring(self, num_domains: int) -> None:
        """Fresh per-domain gate copies (values = the current 0/1 masks) for one training step."""
        dtype = next(self.model.parameters()).dtype  # float64 models get float64 gradients
        self._domain_gates = [
            alive.to(dtype).expand(num_domains, -1).clone().requires_grad_(True) for alive in self.alive
        ]

    def end_scoring(self) -> None:
        self._domain_gates = None
        self._domain = None

    @contextmanager
    def domain(self, index: int | torch.Tensor) -> Iterator[None]:
        """Forward passes inside this block use domain ``index``'s gate copies.

        ``index`` may be a [B] tensor giving each sample's domain (for batches mixing domains).
        """
        if self._domain_gates is None:
            raise RuntimeError("call begin_scoring() before forwarding per domain")
        self._domain = index
        try:
            yield
        finally:
            self._domain = None

    def domain_gate_tensors(self) -> list[torch.Tensor]:
        """The leaf [N, C] gate copies of the current scoring step (for autograd.grad)."""
        if self._domain_gates is None:
            raise RuntimeError("no scoring step in progress")
        return list(self._domain_gates)

    @contextmanager
    def relaxed(self, values: list[torch.Tensor]) -> Iterator[None]:
        """Forward passes inside this block multiply each group's 0/1 mask by ``values[group]`` ([C],
        may require grad): the relaxed masks that learned_masks trains (pruning/learned_masks.py)."""
        if [len(v) for v in values] != self.sizes:
            raise ValueError("one value per channel of every group")
        self._relaxed = values
        try:
            yield
        finally:
            self._relaxed = None

    @contextmanager
    def masked(self) -> Iterator[None]:
        """Inside a scoring step, forward passes use the plain 0/1 masks (no domain copy)."""
        saved, self._domain = self._domain, None
        try:
            yield
        finally:
            self._domain = saved

    def domain_gradients(self) -> torch.Tensor:
        """[N, M]: gradient of the backpropagated loss w.r.t. every domain's gate copy."""
        if self._domain_gates is None:
            raise RuntimeError("no scoring step in progress")
        grads = [g.grad if g.grad is not None else torch.zeros_like(g) for g in self._domain_gates]
        return torch.cat(grads, dim=1)

    # ---- masks ---------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(self.sizes)

    def flat_alive(self) -> torch.Tensor:
        return torch.cat(self.alive)

    def flat_gates(self) -> torch.Tensor:
        return self.flat_alive().float()

    def num_alive(self) -> int:
        return int(sum(int(a.sum()) for a in self.alive))

    def group_of_position(self) -> torch.Tensor:
        """[M] group index of every flat position."""
        return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.sizes)])

    def prune(self, flat_positions: torch.Tensor | list[int]) -> None:
        """Mark channels (flat positions) as pruned. Pruned channels never come back."""
        flat = self.flat_alive().clone()
        flat[torch.as_tensor(flat_positions, dtype=torch.long, device=flat.device)] = False
        self.set_alive(flat)

    def set_alive(self, flat_alive: torch.Tensor) -> None:
        parts = torch.split(flat_alive.to(torch.bool), self.sizes)
        for group_idx, part in enumerate(parts):
            if not part.any():
                raise ValueError(f"channel group {self.groups[group_idx].name} would be emptied")
            self.alive[group_idx] = part.clone().to(self.alive[group_idx].device)
        self._sync_group_norms()

    def pruned_positions(self) -> dict[str, list[int]]:
        """Pruned channels of every group, keyed by group name (root conv's channel indices)."""
        return {
            g.name: torch.nonzero(~alive).flatten().tolist()
            for g, alive in zip(self.groups, self.alive, strict=True)
        }

    def _sync_group_norms(self) -> None:
        # A GroupNorm must normalise over alive channels only, or masking != removing (see MaskableGroupNorm).
        for group, alive in zip(self.groups, self.alive, strict=True):
            for member in group.norms:
                module = self._modules[member.module_name]
                if isinstance(module, MaskableGroupNorm):
                    order = _channel_order(member)
                    module.set_alive(alive if order is None else alive[order.to(alive.device)])


def _channel_order(member: MemberChannels) -> torch.Tensor | None:
    """For each of the module's channels, the group position gating it (None if identity)."""
    index = torch.tensor(member.channel_index, dtype=torch.long)
    if torch.equal(index, torch.arange(len(index))):
        return None
    return torch.argsort(index)
