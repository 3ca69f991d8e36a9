"""The iterative pruning schedule of the official Taylor-pruning code (paper A.3).

Scores are summed every mini-batch and averaged over each pruning interval; an exponential
moving average runs across intervals (the first interval initialises it). At the end of every
interval the alive channels of all groups are ranked globally and the lowest are removed, at
most ``max_per_step`` at a time, until exactly ``target`` channels remain. A group is never
emptied, and pruned channels never return.

With ``round_to = q > 1`` the last pruning step makes every group's width a multiple of q (a
group narrower than q is never pruned, and no step takes a group below q); convolutions whose widths
are multiples of 8 run faster (docs/benchmarks.md). Two rules choose the widths (``round_mode``):

- ``budget``: the widths whose total is the multiple of q nearest the target and that keep the most
  score mass. Every group starts at q (or its alive width if smaller) and blocks of q of its next
  best channels are added, the block with the largest score sum first, until the total is reached.
  Since each group's channels are taken best first, a block's sum never grows along a group, so this
  greedy choice is optimal; it follows the global ranking, one block of q at a time.
  To leave that choice open, the steps before the last stop q channels per group above the target
  (channels never return), and the last step may remove up to max(``max_per_step``, q x groups)
  channels, a few more when rounding goes down.
- ``per_layer``: each group's width from the ranking, rounded on its own to the nearest multiple of
  q (never above the width before that step); the total then differs from the target by up to about
  q/2 per group. (The only rule of dgprune 0.1.0; its results keep their run ids.)

Either way each group keeps its highest-scored channels. When the floors of q stop the pruning
above the target (a very small keep ratio), that step is the last.

The global ranking can take a few groups almost to one channel while others stay whole (on
ResNet-18, the wide ``layer4`` convolutions; docs/method.md). ``max_layer_prune = s`` (None: no
limit, as the paper) caps every group's pruned share: a group of n channels keeps at least
n - floor(s n) of them, in every step and in both rounding rules (with ``round_to`` that floor is
raised to a multiple of q; a group with no multiple of q between it and n is kept whole). A target
that the limit makes unreachable is a ConfigError when the schedule is made, before any training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch

from dgprune.errors import ConfigError

RoundMode = Literal["budget", "per_layer"]
ROUND_MODES: tuple[str, ...] = ("budget", "per_layer")


class WidthCost(Protocol):
    """A model's cost (params, MACs, predicted latency) as a function of its groups' widths."""

    def __call__(self, widths: Sequence[int]) -> float: ...


def target_channels(total: int, keep_ratio: float, num_groups: int) -> int:
    """Channels that remain at ``keep_ratio``; at least one per group."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return max(round(keep_ratio * total), num_groups)


def group_floors(
    group_sizes: list[int], round_to: int = 1, max_layer_prune: float | None = None
) -> list[int]:
    """Fewest channels each group may keep: 1 (a group is never emptied); with ``round_to = q > 1`` q,
    or the group's size if it is narrower; with ``max_layer_prune = s`` at least n - floor(s n), raised
    to a multiple of q when rounding (the group's size when no such multiple fits: kept whole)."""
    floors = []
    for n in group_sizes:
        # 1e-9: s n computed in floating point must not fall just below an integer (0.29 * 100)
        least = 1 if max_layer_prune is None else max(1, n - math.floor(max_layer_prune * n + 1e-9))
        if round_to > 1:
            least = round_to * math.ceil(max(least, round_to) / round_to)
            least = least if least <= n else n
        floors.append(least)
    return floors


class PruningSchedule:
    def __init__(
        self,
        group_sizes: list[int],
        keep_ratio: float,
        interval: int = 30,
        max_per_step: int = 100,
        momentum: float = 0.9,
        round_to: int = 1,
        round_mode: RoundMode = "budget",
        max_layer_prune: float | None = None,
        cost: WidthCost | None = None,
        budget_ratio: float = 1.0,
    ) -> None:
        if interval < 1 or max_per_step < 1 or round_to < 1 or not 0.0 <= momentum < 1.0:
            raise ValueError("interval, max_per_step and round_to must be >= 1 and momentum in [0, 1)")
        if round_mode not in ROUND_MODES:
            raise ValueError(f"round_mode must be one of {', '.join(ROUND_MODES)}, got {round_mode!r}")
        if max_layer_prune is not None and not 0.0 < max_layer_prune <= 1.0:
            raise ValueError(f"max_layer_prune must be in (0, 1] or None, got {max_layer_prune}")
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
        self.round_mode = round_mode
        self.max_layer_prune = max_layer_prune
        self.finished = False  # set by the last step (with rounding the count may end above target)
        # Fewest channels a group may keep: 1, or with rounding q (its size if narrower), or more
        # under max_layer_prune.
        self._floor = group_floors(self.group_sizes, round_to, max_layer_prune)
        self.cost = cost
        self.budget_ratio = budget_ratio
        if cost is None:
            self._check_limit_reachable(keep_ratio)
        else:  # the budget, not a channel count, ends the pruning: only the floors stop it otherwise
            self.dense_cost = float(cost(self.group_sizes))
            self.target = sum(self._floor)
            self._check_budget_reachable()
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

    @property
    def fewest_reachable(self) -> int:
        """The fewest channels pruning can leave: every group at its floor (1, or ``round_to``)."""
        return sum(self._floor)

    def _check_limit_reachable(self, keep_ratio: float) -> None:
        """ConfigError when ``max_layer_prune`` keeps more channels than the target (and than the floors
        of ``round_to`` alone would), naming the least limit and the least keep ratio that work."""
        if self.max_layer_prune is None:
            return
        without_limit = sum(group_floors(self.group_sizes, self.round_to))
        allowed = max(self.target, without_limit)
        fewest = sum(self._floor)
        if fewest <= allowed:
            return

        def reachable(share: float) -> bool:
            return sum(group_floors(self.group_sizes, self.round_to, share)) <= allowed

        # The floors only fall as the share grows, and change only at shares k/n: bisect those.
        shares = sorted({k / n for n in set(self.group_sizes) for k in range(1, n + 1)})
        low, high = 0, len(shares) - 1  # share 1 is reachable: its floors are those without a limit
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if reachable(shares[middle]) else (middle + 1, high)
        least_share = math.ceil(shares[low] * 100 - 1e-9) / 100
        least_keep = math.ceil(fewest / self.total * 100 - 1e-9) / 100
        rounding = f" (widths multiples of round_to {self.round_to})" if self.round_to > 1 else ""
        raise ConfigError(
            f"prune.max_layer_prune {self.max_layer_prune:g}: no layer loses more than "
            f"{100 * self.max_layer_prune:g}% of its channels{rounding}, so at least {fewest} "
            f"of {self.total} filters remain, more than the {self.target} that keep_ratio {keep_ratio:g} "
            f"asks for; use max_layer_prune {least_share:g} or more, or keep_ratio {least_keep:g} or more"
        )

    def widths(self) -> list[int]:
        """Alive channels per group."""
        return torch.bincount(self.group_of[self.alive], minlength=len(self.group_sizes)).tolist()

    @property
    def predicted_ratio(self) -> float | None:
        """The cost of the current widths over the dense cost (None without a cost)."""
        if self.cost is None:
            return None
        return float(self.cost(self.widths())) / self.dense_cost

    def _check_budget_reachable(self) -> None:
        least = float(self.cost(self._floor)) / self.dense_cost  # type: ignore[misc]
        if least <= self.budget_ratio + 1e-12:
            return
        limits = f"round_to {self.round_to}" + (
            f", max_layer_prune {self.max_layer_prune:g}" if self.max_layer_prune is not None else ""
        )
        raise ConfigError(
            f"prune.budget ratio {self.budget_ratio:g}: the narrowest widths the schedule may reach "
            f"({limits}) still cost {least:.4f} of the dense model; ask for "
            f"{math.ceil(least * 1000) / 1000:g} or more, or lower round_to / max_layer_prune"
        )

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

    @property
    def event_due(self) -> bool:
        """Whether the next observation completes an interval, so that ``step()`` then prunes."""
        return not self.done and self._batches + 1 >= self.interval

    def observe_event(self, scores: torch.Tensor | None) -> None:
        """For a criterion scored once per pruning event (``CriterionSpec.scored``): count a mini-batch
        (``scores`` None), and at the event (``event_due``) take ``scores`` as that event's ranking alone,
        with no mean over the interval and no moving average across events (they are measured afresh
        on several batches at each event)."""
        if scores is None:
            self._batches += 1
            return
        self._sum = scores.detach().to("cpu", torch.float64).clone()
        self._batches = self.interval
        self.ema = None

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
        if self.cost is not None:
            chosen = self._cost_step(self.ema)
        elif self.round_to > 1 and self.round_mode == "budget":
            chosen = self._budget_step(self.ema)
        else:
            budget = min(self.max_per_step, self.num_alive - self.target)
            chosen = self._lowest_prunable(self.ema, budget)
            # The last step: the target is reached, or the floors of `round_to` allow no further pruning.
            if self.num_alive - len(chosen) <= self.target or len(chosen) < budget:
                if self.round_to > 1:
                    chosen = self._rounded(chosen, self.ema)
                self.finished = True
        self.alive[chosen] = False
        return chosen

    def prune_at_once(self, scores: torch.Tensor) -> torch.Tensor:
        """All the pruning in one step, ranked by ``scores`` (flat [M]; learned masks,
        pruning/learned_masks.py): the last step of the schedule with no limit on how many channels
        it removes, so the same target, floors and ``round_to`` rule. Returns the pruned positions."""
        self.max_per_step = max(self.max_per_step, self.num_alive)  # no cap: the target in one step
        self.interval, self.ema, self._batches = 1, None, 0
        self._sum.zero_()
        self.observe(scores)
        chosen = self.step()
        return chosen if chosen is not None else torch.zeros(0, dtype=torch.long)

    def _budget_step(self, scores: torch.Tensor) -> torch.Tensor:
        """A step of the budget rule. The steps before the last stop ``round_to`` channels per group
        above the target, so that the last one can still reach the multiple of q nearest the target
        by rounding every group down (pruned channels never return)."""
        margin = self.round_to * len(self.group_sizes)
        gap = self.num_alive - self.target
        if gap > max(self.max_per_step, margin):
            budget = min(self.max_per_step, gap - margin)
            chosen = self._lowest_prunable(scores, budget)
            if len(chosen) == budget:
                return chosen
            # the floors of q stop the pruning above the target: this step becomes the last
        self.finished = True
        return self._budget_rounded(scores)

    def _cost_step(self, scores: torch.Tensor) -> torch.Tensor:
        """A step of the cost-aware rule (module docstring): greedy over blocks by score sum per unit
        of cost saved at the current widths, until the budget, the step's cap or the floors."""
        assert self.cost is not None
        q = self.round_to
        widths = self.widths()
        shifted = scores - scores[self.alive].min()  # importance >= 0: a ratio to a saving means something
        ranked = []
        for group in range(len(widths)):
            alive_now = torch.nonzero(self.alive & (self.group_of == group)).flatten()
            ranked.append(alive_now[torch.argsort(shifted[alive_now], stable=True)].tolist())
        taken = [0] * len(widths)  # channels taken from the front of each group's ranking
        goal = self.budget_ratio * self.dense_cost
        current = float(self.cost(widths))
        chosen: list[int] = []
        while current > goal + 1e-12 * self.dense_cost:
            best: tuple[float, int, int, float] | None = None  # (score per saving, group, new width, cost)
            for group, width in enumerate(widths):
                narrower = q * ((width - 1) // q)  # the next multiple of q below (width - 1 when q is 1)
                if narrower < self._floor[group]:
                    continue
                trial = list(widths)
                trial[group] = narrower
                after = float(self.cost(trial))
                saving = current - after
                if saving <= 0:
                    continue  # removing these channels saves nothing: never worth their importance
                block = ranked[group][taken[group] : taken[group] + width - narrower]
                value = float(shifted[block].sum()) / saving
                if best is None or value < best[0]:
                    best = (value, group, narrower, after)
            if best is None:  # the floors (or blocks that save nothing) stop it above the budget
                break
            _, group, narrower, after = best
            size = widths[group] - narrower
            if chosen and len(chosen) + size > self.max_per_step:
                return torch.tensor(sorted(chosen), dtype=torch.long)  # this step's cap: more next step
            chosen += ranked[group][taken[group] : taken[group] + size]
            taken[group] += size
            widths[group] = narrower
            current = after
        self.finished = True
        return torch.tensor(sorted(chosen), dtype=torch.long)

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
                width = max(width, self._floor[group])  # max_layer_prune (a group kept whole)
            ranked = alive_now[torch.argsort(scores[alive_now], descending=True, stable=True)]
            pruned.append(ranked[width:])
        return torch.cat(pruned).sort().values

    def _budget_rounded(self, scores: torch.Tensor) -> torch.Tensor:
        """The last step of the budget rule: from the alive channels, widths that are multiples of
        ``round_to``, sum to the multiple of it nearest the target, and keep the most score mass."""
        q = self.round_to
        ranked_per_group: list[torch.Tensor] = []
        widths: list[int] = []
        blocks: list[tuple[float, int, int]] = []  # (score sum, group, block index) of addable blocks
        for group in range(len(self.group_sizes)):
            alive_now = torch.nonzero(self.alive & (self.group_of == group)).flatten()
            ranked = alive_now[torch.argsort(scores[alive_now], descending=True, stable=True)]
            ranked_per_group.append(ranked)
            # From the group's floor: q, all of it (narrower than q, or down to one block already),
            # or what max_layer_prune keeps (a multiple of q, or the whole group)
            floor = min(self._floor[group], len(ranked))
            widths.append(floor)
            sums = scores[ranked[floor : q * (len(ranked) // q)]].reshape(-1, q).sum(dim=1)
            blocks += [(float(total), group, index) for index, total in enumerate(sums.tolist())]
        fixed = sum(widths)
        wanted = max(math.floor((self.target - fixed) / q + 0.5), 0)
        # Within a group the blocks' sums never increase, so the best blocks overall come in each
        # group's own order; ties go to the earlier group, then the earlier block (deterministic).
        blocks.sort(key=lambda block: (-block[0], block[1], block[2]))
        for _, group, _ in blocks[:wanted]:
            widths[group] += q
        pruned = [ranked[width:] for ranked, width in zip(ranked_per_group, widths, strict=True)]
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
