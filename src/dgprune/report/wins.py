"""IoR vs its baseline (Taylor-FO): wins, ties and losses on cross-domain accuracy.

One comparison per (dataset, model, pretraining algorithm, fine-tuning objective, keep ratio, target
domain, IoR's parameters): the mean over seeds of IoR's cross-domain accuracy against Taylor's, over the seeds
both have (paired). A tie is an equal mean (to 1e-9; accuracies are counts over the same images).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from statistics import mean

from dgprune.experiments.records import ResultRecord
from dgprune.report.cells import natural_key, pct_stat, stat_text
from dgprune.report.table1 import CellValue, Table

TIE_TOLERANCE = 1e-9


@dataclass
class Comparison:
    dataset: str
    model: str
    algorithm: str
    finetune_algorithm: str
    keep_ratio: float
    target: str
    label: str  # the challenger's criterion_label: its name plus non-default parameters
    baseline: list[float]  # per seed, paired with ``challenger``
    challenger: list[float]

    @property
    def delta(self) -> float:
        return mean(self.challenger) - mean(self.baseline)

    @property
    def outcome(self) -> str:
        if abs(self.delta) <= TIE_TOLERANCE:
            return "tie"
        return "win" if self.delta > 0 else "loss"


@dataclass
class WinCount:
    metric: str
    challenger: str
    baseline: str
    comparisons: list[Comparison] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(c.outcome == outcome for c in self.comparisons)

    def summary(self) -> str:
        seeds = sorted({len(c.baseline) for c in self.comparisons})
        seed_text = "/".join(str(s) for s in seeds) if seeds else "0"
        what = "cross-domain" if self.metric == "cross_acc" else "intra-domain"
        return (
            f"{_name(self.challenger)} vs {_name(self.baseline)} on {what} accuracy: "
            f"{self.count('win')} wins, {self.count('tie')} ties, {self.count('loss')} losses "
            f"in {len(self.comparisons)} comparisons (model × keep ratio × target; "
            f"mean over {seed_text} seed(s) each)"
        )

    def table(self) -> Table:
        """Every comparison: both means ± standard error over seeds, the difference, the outcome; the
        challenger's non-default parameters in a column of their own when any comparison has some."""
        variants = [c.label.removeprefix(self.challenger).strip(" ()") for c in self.comparisons]
        header = [
            "Dataset",
            "Model",
            "Pretrain",
            "Keep",
            "Target",
            f"{_name(self.baseline)} Cross",
            f"{_name(self.challenger)} Cross",
            "Δ (points)",
            "outcome",
        ]
        if any(variants):
            header.insert(-1, f"{_name(self.challenger)} parameters")
        rows, values = [], []
        for c, variant in zip(self.comparisons, variants, strict=True):
            labels = [
                c.dataset,
                c.model,
                c.algorithm.upper()
                + ("" if c.finetune_algorithm == "erm" else f" (ft {c.finetune_algorithm})"),
                f"{c.keep_ratio:.0%}",
                c.target,
            ]
            stats = [pct_stat(c.baseline), pct_stat(c.challenger)]
            row = [*labels, *(stat_text(s) for s in stats), f"{100 * c.delta:+.2f}"]
            row_values: list[CellValue] = [None] * len(labels) + [*stats, 100 * c.delta]
            if any(variants):
                row.append(variant or "defaults")
                row_values.append(None)
            rows.append([*row, c.outcome])
            values.append([*row_values, None])
        return Table(header, rows, values)


def _name(criterion: str) -> str:
    return {"taylor": "Taylor", "ior": "IoR"}.get(criterion, criterion)


def count_wins(
    records: list[ResultRecord], challenger: str = "ior", baseline: str = "taylor", metric: str = "cross_acc"
) -> WinCount:
    groups: dict[tuple, dict[int, ResultRecord]] = defaultdict(dict)
    for r in records:
        if r.criterion not in (challenger, baseline):
            continue
        key = (r.dataset, r.model, r.algorithm, r.finetune_algorithm or "erm", r.keep_ratio, r.target_domain)
        groups[(*key, r.criterion, r.label)][r.seed] = r
    result = WinCount(metric, challenger, baseline)
    for key, challengers in groups.items():
        *base_key, criterion, label = key
        if criterion != challenger:
            continue
        baselines = next(
            (v for k, v in groups.items() if list(k[:-2]) == base_key and k[-2] == baseline), None
        )
        if not baselines:
            continue
        seeds = sorted(set(challengers) & set(baselines))
        if not seeds:
            continue
        dataset, model, algorithm, finetune, keep_ratio, target = base_key
        result.comparisons.append(
            Comparison(
                dataset,
                model,
                algorithm,
                finetune,
                keep_ratio,
                target,
                label,
                [getattr(baselines[s], metric) for s in seeds],
                [getattr(challengers[s], metric) for s in seeds],
            )
        )
    result.comparisons.sort(
        key=lambda c: (
            c.dataset,
            c.model,
            c.algorithm,
            c.finetune_algorithm,
            -c.keep_ratio,
            natural_key(c.target),
        )
    )
    return result
