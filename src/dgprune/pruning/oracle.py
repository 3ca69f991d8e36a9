"""The oracle of paper Eq. 1: the real change of the mean source risk when one channel is removed.

``I_m = (mean_i R_i(g) - mean_i R_i(g with channel m pruned))^2``. Taylor-FO (Eq. 2) is its
first-order approximation; the oracle measures it directly, with one forward pass of every source
mini-batch per alive channel. That is M times a training step's forward cost: a reference for
analysis on small models (MNIST_CNN: 448 forwards per step), not a practical criterion for ResNets.

Removing a channel goes through ``GateSet.set_alive``, exactly as pruning does (so a
MaskableGroupNorm renormalises over the channels left). Forwards run in the model's current mode
under ``no_grad``; BatchNorm running statistics they would update are restored afterwards, so the
oracle leaves the training state untouched.

``removal_risks`` is the general form: one set of forwards gives, for every alive channel, the risk of
*every* given batch with that channel removed (e.g. each source domain's and the target's, for the
analysis of out-of-distribution importance, ``pruning.ood_importance``); ``loss_changes`` is the
mean-source-risk view of it that the ``oracle`` criterion uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dgprune.pruning.gates import GateSet
from dgprune.pruning.scoring import mixes_samples

Batch = tuple[torch.Tensor, torch.Tensor]


def batch_risks(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """[D]: each batch's mean cross-entropy (no grad), in the model's dtype.

    A model whose BatchNorm uses batch statistics sees each batch alone, as in scoring; otherwise the
    batches are forwarded as one (same result, one forward).
    """
    if mixes_samples(model):
        risks = [F.cross_entropy(model(x), y) for x, y in batches]
    else:
        sizes = [len(y) for _, y in batches]
        logits = model(torch.cat([x for x, _ in batches])).split(sizes)
        risks = [F.cross_entropy(lg, y) for lg, (_, y) in zip(logits, batches, strict=True)]
    return torch.stack(risks)


def mean_source_risk(model: nn.Module, batches: list[Batch]) -> float:
    """``(1/N) sum_i R_i``: each domain's mean cross-entropy, averaged over domains (no grad)."""
    return float(batch_risks(model, batches).mean())


@dataclass
class RemovalRisks:
    """Every batch's risk now and with each channel removed (one at a time)."""

    base: torch.Tensor  # [D] each batch's mean cross-entropy with the current masks
    removed: torch.Tensor  # [M, D] the same with flat position m removed; = base where not measured
    measured: torch.Tensor  # [M] bool: positions actually removed and measured

    def rises(self) -> torch.Tensor:
        """[D, M] float64: risk with the channel removed minus risk now (0 where not measured)."""
        diff = self.removed.double() - self.base.double().unsqueeze(0)
        return (diff * self.measured.unsqueeze(1)).t().contiguous()


def removable_positions(gates: GateSet) -> list[int]:
    """Flat positions of alive channels that can be removed: not the last alive channel of a group."""
    alive = gates.flat_alive()
    offsets = torch.tensor([0, *gates.sizes]).cumsum(0)
    out: list[int] = []
    for group, size in enumerate(gates.sizes):
        in_group = torch.nonzero(alive[offsets[group] : offsets[group] + size]).flatten()
        if len(in_group) >= 2:  # a group is never emptied
            out.extend((in_group + offsets[group]).tolist())
    return out


def removal_risks(
    model: nn.Module, gates: GateSet, batches: list[Batch], positions: list[int] | None = None
) -> RemovalRisks:
    """Each batch's risk now and with each removable channel (or each of ``positions`` that is
    removable) removed: one forward of all batches per channel, in the model's current mode."""
    saved_buffers = {name: b.clone() for name, b in model.named_buffers()}
    alive = gates.flat_alive().clone()
    wanted = removable_positions(gates)
    if positions is not None:
        chosen = set(positions)
        wanted = [p for p in wanted if p in chosen]
    measured = torch.zeros(alive.numel(), dtype=torch.bool)
    try:
        with torch.no_grad():
            base = batch_risks(model, batches)
            removed = base.unsqueeze(0).repeat(alive.numel(), 1)
            for position in wanted:
                trial = alive.clone()
                trial[position] = False
                gates.set_alive(trial)
                removed[position] = batch_risks(model, batches)
                measured[position] = True
    finally:
        gates.set_alive(alive)
        for name, buffer in model.named_buffers():  # undo BatchNorm running-statistics updates
            buffer.copy_(saved_buffers[name])
    return RemovalRisks(base, removed, measured.to(base.device))


def loss_changes(
    model: nn.Module,
    gates: GateSet,
    batches: list[Batch],
    positions: list[int] | None = None,
) -> torch.Tensor:
    """[M] for every flat gate position: mean source risk now minus with that channel pruned.

    0 for channels already pruned, for the last alive channel of a group (it cannot be pruned) and,
    when ``positions`` is given, for every position not in it (only those are measured).
    """
    device = gates.flat_alive().device
    risks = removal_risks(model, gates, batches, positions)
    changes = torch.zeros(len(risks.measured), dtype=torch.float64)
    base = float(risks.base.mean())  # as before: float of each [D] risk vector's mean
    for position in torch.nonzero(risks.measured).flatten().tolist():
        changes[position] = base - float(risks.removed[position].mean())
    return changes.to(device)
