"""The iterative pruning schedule of the official Taylor-pruning code (paper A.3).

Scores are summed every mini-batch and averaged over each pruning interval; an exponential
moving average runs across intervals (the first interval initialises it). At the end of every
interval the alive channels of all groups are ranked globally and the lowest are removed, at
most ``max_per_step`` at a time, until exactly ``target`` channels remain. A group is never
emptied, and pruned channels never return.

With ``round_to = q > 1`` the last pruning step also rounds every group's width to a multiple of q
(the nearest one, but never above the width before that step nor below q), keeping each group's
highest-scored channels; no step takes a group below q, and a group narrower than q is never pruned.
Convolutions whose widths are multiples of 8 run faster (docs/benchmarks.md); the total kept then
differs from the target by up to about q/2 per group. When those floors of q stop the pruning
above the target (a very small keep ratio), that step is the last.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def target_channels(total: int, keep_ratio: float, num_groups: int) -> int:
    """Channels that remain at ``keep_ratio``; at least one per group."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return max(round(keep_ratio * total), num_groups)


class PruningSchedule:
    def __init__(
        self,
        group_sizes: list[int],
        keep_ratio: float,
        interval: int = 30,
        max_per_step: int = 100,
        momentum: float = 0.9,
        round_to: int = 1,
    ) -> None:
        if interval < 1 or max_per_step < 1 or round_to < 1 or not 0.0 <= momentum < 1.0:
            raise ValueError("interval, max_per_step and round_to must be >= 1 and momentum in [0, 1)")
        self.group_sizes = list(group_sizes)
        self.group_of = torch.cat(
            [torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.group_sizes)]
        )
        self.total = sum(self.group_sizes)
        self.target = target_channels(self.total, keep_ratio, len(self.group_sizes))
        self.interval = interval
        self.max_per_step = max_per_step
        self.momentum = momentum
        self.round_to = round_to
        self.finished = False  # set by the last step (with rounding the count may end above target)
        # Fewest channels a group may keep: 1, or with rounding q (its size if narrower).
        self._floor = [min(round_to, n) if round_to > 1 else 1 for n in self.group_sizes]
        self.alive = torch.ones(self.total, dtype=torch.bool)
        self.ema: torch.Tensor | None = None
        self._sum = torch.zeros(self.total, dtype=torch.float64)
        self._batches = 0

    @property
    def num_alive(self) -> int:
        return int(self.alive.sum())

    @property
    def done(self) -> bool:
        return self.finished or self.num_alive <= self.target

    def steps_to_target(self) -> int:
        """Mini-batches needed from now until the target is reached."""
        if self.done:
            return 0
        steps = math.ceil(max(self.num_alive - self.target, 0) / self.max_per_step)
        return max(steps * self.interval - self._batches, 0)

    def observe(self, scores: torch.Tensor) -> None:
        """Add one mini-batch's scores (flat [M])."""
        self._sum += scores.detach().to("cpu", torch.float64)
        self._batches += 1

    def step(self) -> torch.Tensor | None:
        """Call after each mini-batch. Returns the flat positions to prune now, or None."""
        if self.done or self._batches < self.interval:
            return None
        interval_mean = self._sum / self._batches
        self._sum.zero_()
        self._batches = 0
        if self.ema is None:
            self.ema = interval_mean
        else:
            self.ema = self.momentum * self.ema + (1.0 - self.momentum) * interval_mean
        budget = min(self.max_per_step, self.num_alive - self.target)
        chosen = self._lowest_prunable(self.ema, budget)
        # The last step: the target is reached, or the floors of `round_to` allow no further pruning.
        if self.num_alive - len(chosen) <= self.target or len(chosen) < budget:
            if self.round_to > 1:
                chosen = self._rounded(chosen, self.ema)
            self.finished = True
        self.alive[chosen] = False
        return chosen

    def _rounded(self, chosen: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Replace the last step's choice: per group, keep the best ``width`` alive channels, where
        ``width`` is the ranking's width rounded to the nearest multiple of ``round_to``."""
        q = self.round_to
        after = self.alive.clone()
        after[chosen] = False
        pruned: list[torch.Tensor] = []
        for group in range(len(self.group_sizes)):
            alive_now = torch.nonzero(self.alive & (self.group_of == group)).flatten()
            width = int((after[alive_now]).sum())
            if len(alive_now) >= q:
                width = min(max(q * math.floor(width / q + 0.5), q), q * (len(alive_now) // q))
            ranked = alive_now[torch.argsort(scores[alive_now], descending=True, stable=True)]
            pruned.append(ranked[width:])
        return torch.cat(pruned).sort().values

    def _lowest_prunable(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        alive_per_group = torch.bincount(self.group_of[self.alive], minlength=len(self.group_sizes))
        candidates = torch.nonzero(self.alive).flatten()
        # stable sort: equal scores are broken by position, so runs are deterministic
        ranked = candidates[torch.argsort(scores[candidates], stable=True)]
        chosen: list[int] = []
        for position in ranked.tolist():
            if len(chosen) == budget:
                break
            group = int(self.group_of[position])
            if alive_per_group[group] > self._floor[group]:  # never empty a group (nor go below q)
                alive_per_group[group] -= 1
                chosen.append(position)
        return torch.tensor(chosen, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {
            "alive": self.alive.clone(),
            "ema": None if self.ema is None else self.ema.clone(),
            "sum": self._sum.clone(),
            "batches": self._batches,
            "finished": self.finished,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alive = state["alive"].clone()
        self.ema = None if state["ema"] is None else state["ema"].clone()
        self._sum = state["sum"].clone()
        self._batches = int(state["batches"])
        self.finished = bool(state.get("finished", False))  # absent in checkpoints of older versions
