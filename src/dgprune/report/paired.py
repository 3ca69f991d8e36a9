"""Every criterion against a baseline criterion, paired by seed and target domain.

For one (dataset, model, pretraining algorithm, fine-tuning objective, keep ratio) and one challenger
criterion, a *pair* is a (seed, target domain) for which both the challenger and the baseline ran; both
pruned the same pretrained model on the same batches, so their difference isolates the criterion. Over
the n pairs the report gives the mean difference in points, its 95% confidence interval (Student t on
the paired differences), the paired t-test's p-value and the Wilcoxon signed-rank test's p-value
(``zero_method="zsplit"``: equal accuracies, which are common, count half for each side), with Holm's
correction over the challengers of one setting. The pairs are treated as independent replicates; they
share pretrained models across criteria (that is the pairing) but not across seeds or targets.

That interval counts the spread *between* targets as noise, which is right for a target drawn at
random but wide for the question a benchmark asks: the mean over its fixed set of targets, where only
the seed is random. The second interval ("targets fixed") takes the targets as strata: its error is the
within-target (seed-to-seed) spread of the differences, pooled, with n − (number of targets) degrees of
freedom. Both are reported; verdicts and Holm use the first, the more cautious one.

A challenger *beats* the baseline when the interval's lower end is above 0, and *loses* when its upper
end is below 0; otherwise the difference is not resolved by these runs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from scipy import stats

from dgprune.experiments.records import ResultRecord
from dgprune.report.table1 import Table

CONFIDENCE = 0.95


@dataclass
class PairedComparison:
    setting: tuple[str, str, str, str, float]  # dataset, model, algorithm, finetune algorithm, keep ratio
    challenger: str
    baseline: str
    metric: str
    differences: list[float]  # challenger - baseline, in points, one per (seed, target) pair
    p_holm: float = math.nan
    targets: list[str] = field(default_factory=list)  # the target domain of each difference

    @property
    def interval_targets_fixed(self) -> tuple[float, float]:
        """95% CI of the mean difference with the targets as fixed strata (module docstring); NaN
        without a target per difference or without two pairs in some target."""
        if len(self.targets) != self.n:
            return math.nan, math.nan
        by_target: dict[str, list[float]] = defaultdict(list)
        for target, difference in zip(self.targets, self.differences, strict=True):
            by_target[target].append(difference)
        df = self.n - len(by_target)
        if df < 1:
            return math.nan, math.nan
        within = sum((d - sum(ds) / len(ds)) ** 2 for ds in by_target.values() for d in ds)
        se = math.sqrt(within / df / self.n)
        if se == 0:
            return self.mean, self.mean
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, df) * se
        return self.mean - half, self.mean + half

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return sum(self.differences) / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        if self.n < 2:
            return math.nan, math.nan
        se = _stdev(self.differences) / math.sqrt(self.n)
        if se == 0:
            return self.mean, self.mean
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, self.n - 1) * se
        return self.mean - half, self.mean + half

    @property
    def p_t(self) -> float:
        if self.n < 2 or _stdev(self.differences) == 0:
            return 1.0 if all(d == 0 for d in self.differences) else math.nan
        return float(stats.ttest_1samp(self.differences, 0.0).pvalue)

    @property
    def p_wilcoxon(self) -> float:
        if self.n < 2 or all(d == 0 for d in self.differences):
            return 1.0
        return float(stats.wilcoxon(self.differences, zero_method="zsplit").pvalue)

    @property
    def verdict(self) -> str:
        low, high = self.interval
        if low > 0:
            return "better"
        if high < 0:
            return "worse"
        return "not resolved"


def _stdev(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error), in the input order; NaN stays NaN."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_comparisons(
    records: list[ResultRecord],
    label: Callable[[ResultRecord], str],
    baseline: str = "taylor",
    metric: str = "cross_acc",
) -> list[PairedComparison]:
    """One comparison per (setting, challenger label); ``label`` names a record's criterion + params."""
    cells: dict[tuple, dict[str, dict[tuple[int, str], float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.criterion == "none":
            continue
        value = getattr(r, metric)
        if value is None:  # not measured for this run (e.g. an older record's oracle selection)
            continue
        cells[_setting(r)][label(r)][(r.seed, r.target_domain)] = value
    comparisons: list[PairedComparison] = []
    for setting in sorted(cells, key=lambda s: (s[:4], -s[4])):
        by_label = cells[setting]
        if baseline not in by_label:
            continue
        family = []
        for name in sorted(by_label):
            if name == baseline:
                continue
            pairs = sorted(set(by_label[name]) & set(by_label[baseline]))
            if not pairs:
                continue
            diffs = [100 * (by_label[name][p] - by_label[baseline][p]) for p in pairs]
            targets = [target for _seed, target in pairs]
            family.append(PairedComparison(setting, name, baseline, metric, diffs, targets=targets))
        for comparison, p in zip(family, holm([c.p_wilcoxon for c in family]), strict=True):
            comparison.p_holm = p
        comparisons.extend(family)
    return comparisons


DENSE = "dense"


def _setting(r: ResultRecord) -> tuple[str, str, str, str, float]:
    return (r.dataset, r.model, r.algorithm, r.finetune_algorithm or "erm", r.keep_ratio)


def dense_comparisons(
    records: list[ResultRecord], label: Callable[[ResultRecord], str], metric: str = "cross_acc"
) -> list[PairedComparison]:
    """Every pruned run against the dense model it was pruned from (same data, model, pretraining,
    seed and target): pruned − dense in points, one comparison per (setting, criterion label). Does
    pruning raise the metric above the dense model's (as DSS reports out of domain), or cost it?"""
    dense = {
        (r.dataset, r.model, r.algorithm, r.seed, r.target_domain): getattr(r, metric)
        for r in records
        if r.criterion == "none" and getattr(r, metric) is not None
    }
    cells: dict[tuple, dict[str, list[tuple[str, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(records, key=lambda r: (r.seed, r.target_domain)):
        base = dense.get((r.dataset, r.model, r.algorithm, r.seed, r.target_domain))
        value = getattr(r, metric)
        if r.criterion == "none" or base is None or value is None:
            continue
        cells[_setting(r)][label(r)].append((r.target_domain, 100 * (value - base)))
    comparisons: list[PairedComparison] = []
    for setting in sorted(cells, key=lambda s: (s[:4], -s[4])):
        family = [
            PairedComparison(
                setting, name, DENSE, metric, [d for _t, d in pairs], targets=[t for t, _d in pairs]
            )
            for name, pairs in sorted(cells[setting].items())
        ]
        for comparison, p in zip(family, holm([c.p_wilcoxon for c in family]), strict=True):
            comparison.p_holm = p
        comparisons.extend(family)
    return comparisons


def paired_table(
    cross: list[PairedComparison],
    intra: list[PairedComparison],
    names: tuple[str, str] = ("cross", "intra"),
) -> Table:
    """Two metrics' differences to the baseline side by side (by default cross- and intra-domain
    accuracy), one row per challenger; ``names`` labels the two metrics in the header."""
    intra_by_key = {(c.setting, c.challenger): c for c in intra}
    first, second = names
    header = [
        "Dataset",
        "Keep",
        "Criterion",
        "pairs",
        f"Δ {first} (points)",
        "95% CI",
        "95% CI, targets fixed",
        "p (Wilcoxon)",
        "p (Holm)",
        first,
        f"Δ {second}",
        f"95% CI {second}",
        second,
    ]
    rows = []
    for c in cross:
        i = intra_by_key.get((c.setting, c.challenger))
        dataset, _model, algorithm, finetune, keep = c.setting
        name = dataset if (algorithm, finetune) == ("erm", "erm") else f"{dataset} ({algorithm}/{finetune})"
        rows.append(
            [
                name,
                f"{keep:.0%}",
                c.challenger,
                str(c.n),
                f"{c.mean:+.2f}",
                _interval_text(c.interval),
                _interval_text(c.interval_targets_fixed),
                f"{c.p_wilcoxon:.3f}",
                f"{c.p_holm:.3f}",
                c.verdict,
                f"{i.mean:+.2f}" if i else "-",
                _interval_text(i.interval) if i else "-",
                i.verdict if i else "-",
            ]
        )
    return Table(header, rows)


def _interval_text(interval: tuple[float, float]) -> str:
    low, high = interval
    return "-" if math.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"
