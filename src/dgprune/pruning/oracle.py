"""The oracle of paper Eq. 1: the real change of the mean source risk when one channel is removed.

``I_m = (mean_i R_i(g) - mean_i R_i(g with channel m pruned))^2``. Taylor-FO (Eq. 2) is its
first-order approximation; the oracle measures it directly, with one forward pass of every source
mini-batch per alive channel. That is M times a training step's forward cost: a reference for
analysis on small models (MNIST_CNN: 448 forwards per step), not a practical criterion for ResNets.

Removing a channel goes through ``GateSet.set_alive``, exactly as pruning does (so a
MaskableGroupNorm renormalises over the channels left). Forwards run in the model's current mode
under ``no_grad``; BatchNorm running statistics they would update are restored afterwards, so the
oracle leaves the training state untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgprune.pruning.gates import GateSet
from dgprune.pruning.scoring import mixes_samples


def mean_source_risk(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``(1/N) sum_i R_i``: each domain's mean cross-entropy, averaged over domains (no grad).

    A model whose BatchNorm uses batch statistics sees each domain's batch alone, as in scoring.
    """
    if mixes_samples(model):
        risks = [F.cross_entropy(model(x), y) for x, y in batches]
    else:
        sizes = [len(y) for _, y in batches]
        logits = model(torch.cat([x for x, _ in batches])).split(sizes)
        risks = [F.cross_entropy(lg, y) for lg, (_, y) in zip(logits, batches, strict=True)]
    return float(torch.stack(risks).mean())


def loss_changes(
    model: nn.Module,
    gates: GateSet,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    positions: list[int] | None = None,
) -> torch.Tensor:
    """[M] for every flat gate position: mean source risk now minus with that channel pruned.

    0 for channels already pruned, for the last alive channel of a group (it cannot be pruned) and,
    when ``positions`` is given, for every position not in it (only those are measured).
    """
    saved_buffers = {name: b.clone() for name, b in model.named_buffers()}
    alive = gates.flat_alive().clone()
    changes = torch.zeros(alive.numel(), dtype=torch.float64)
    wanted = None if positions is None else set(positions)
    try:
        with torch.no_grad():
            base = mean_source_risk(model, batches)
            offsets = torch.tensor([0, *gates.sizes]).cumsum(0)
            for group, size in enumerate(gates.sizes):
                in_group = torch.nonzero(alive[offsets[group] : offsets[group] + size]).flatten()
                if len(in_group) < 2:
                    continue  # a group is never emptied
                for position in (in_group + offsets[group]).tolist():
                    if wanted is not None and position not in wanted:
                        continue
                    trial = alive.clone()
                    trial[position] = False
                    gates.set_alive(trial)
                    changes[position] = base - mean_source_risk(model, batches)
    finally:
        gates.set_alive(alive)
        for name, buffer in model.named_buffers():  # undo BatchNorm running-statistics updates
            buffer.copy_(saved_buffers[name])
    return changes.to(alive.device)
