"""Leave-one-source-out validation (DomainBed's second model-selection method) of a criterion's
parameter, e.g. ``target_entropy``'s sign: choose it without the true target's labels.

The runs are ordinary runs on the benchmark with the true target left out entirely (a dataset named
``<benchmark>-no-<target>``, e.g. ``styled_digits-no-clean``, see data/digit_styles.py): each of the
remaining domains is in turn the pseudo-target, whose images the criterion may see and whose labels
score the choice. For each (benchmark, true target, model, pretraining, keep ratio), the label
(criterion + parameters: a method, or one parameter of it) with the highest mean pseudo-target
accuracy over every (seed, pseudo-target) run is chosen; the table lists every label's mean so the
other choices are reported too. Beside it, where the records hold runs of the full benchmark on the true
target, each label's accuracy there: what the choice would have given (read for reporting only).
"""

from __future__ import annotations

from collections import defaultdict

from dgprune.experiments.records import ResultRecord
from dgprune.report.cells import pct_stat, stat_text
from dgprune.report.table1 import CellValue, Table

LEFT_OUT = "-no-"


def left_out_target(dataset: str) -> tuple[str, str] | None:
    """(benchmark, true target) of a leave-one-source-out dataset name, None for any other name."""
    base, sep, rest = dataset.partition(LEFT_OUT)
    if not sep or LEFT_OUT in rest:  # one domain left out, no more
        return None
    return base, rest


def loso_choices(records: list[ResultRecord]) -> dict[tuple, str]:
    """(benchmark, true target, model, algorithm, keep ratio) -> the chosen label (on equal
    means, the first label in alphabetical order)."""
    chosen = {}
    for key, by_label in _means(records).items():
        chosen[key] = max(sorted(by_label), key=lambda label: by_label[label].mean)  # max keeps the first
    return chosen


def _means(records: list[ResultRecord]) -> dict[tuple, dict]:
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.criterion == "none" or (names := left_out_target(r.dataset)) is None:
            continue
        groups[(*names, r.model, r.algorithm, r.keep_ratio)][r.label].append(r.cross_acc)
    return {
        key: {label: pct_stat(values) for label, values in by_label.items()}
        for key, by_label in groups.items()
        if len(by_label) > 1  # nothing to choose between
    }


def _true_target_means(records: list[ResultRecord]) -> dict[tuple, dict]:
    """(benchmark, target, model, algorithm, keep ratio) -> {label: Stat of cross_acc} over the runs of
    the full benchmark (not a left-out dataset), to set beside the choices."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.criterion != "none" and left_out_target(r.dataset) is None:
            groups[(r.dataset, r.target_domain, r.model, r.algorithm, r.keep_ratio)][r.label].append(
                r.cross_acc
            )
    return {
        key: {label: pct_stat(values) for label, values in by_label.items()}
        for key, by_label in groups.items()
    }


def loso_table(records: list[ResultRecord]) -> Table | None:
    """One row per candidate label; None when the records hold no leave-one-source-out choice."""
    means = _means(records)
    if not means:
        return None
    chosen = loso_choices(records)
    header = [
        "Benchmark",
        "True target (left out)",
        "Keep",
        "Candidate",
        "runs",
        "pseudo-target acc",
        "chosen",
        "true-target acc",
    ]
    on_true_target = _true_target_means(records)
    rows: list[list[str]] = []
    values: list[list[CellValue]] = []
    for key in sorted(means, key=lambda k: (k[0], k[1], k[2], k[3], -k[4])):
        benchmark, target, _model, _algorithm, keep = key
        for label, stat in sorted(means[key].items()):
            mark = "yes" if chosen[key] == label else ""
            true_stat = on_true_target.get(key, {}).get(label)
            rows.append(
                [
                    benchmark,
                    target,
                    f"{keep:.0%}",
                    label,
                    str(stat.n),
                    stat_text(stat),
                    mark,
                    stat_text(true_stat),
                ]
            )
            values.append([None, None, None, None, None, stat, None, true_stat])
    return Table(header, rows, values)


def loso_selection_table(records: list[ResultRecord]) -> Table | None:
    """What each way of choosing gives on the true targets, as DomainBed reports a selection method:
    the leave-one-source-out choice, every candidate taken always, and the best candidate per target
    (an oracle that reads the true target's labels: an upper bound). Mean over the true targets
    (each one the mean of its seeds) ± standard error over the targets; only targets where every
    candidate has full-benchmark runs count. None when no choice has such targets."""
    means, chosen, on_true_target = _means(records), loso_choices(records), _true_target_means(records)
    per_group: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for key, candidates in means.items():
        benchmark, _target, model, algorithm, keep = key
        true_accs = on_true_target.get(key, {})
        if not all(true_accs.get(label) for label in candidates):
            continue
        rules = per_group[(benchmark, model, algorithm, keep)]
        rules["leave-one-source-out choice"].append(true_accs[chosen[key]].mean)
        for label in sorted(candidates):
            rules[f"always {label}"].append(true_accs[label].mean)
        rules["best per target (oracle: reads target labels)"].append(
            max(true_accs[label].mean for label in candidates)
        )
    if not per_group:
        return None
    header = ["Benchmark", "Keep", "Rule", "targets", "true-target acc"]
    rows: list[list[str]] = []
    values: list[list[CellValue]] = []
    for (benchmark, _model, _algorithm, keep), rules in sorted(per_group.items(), key=lambda kv: kv[0]):
        for rule, accs in rules.items():
            stat = pct_stat([a / 100 for a in accs])
            rows.append([benchmark, f"{keep:.0%}", rule, str(len(accs)), stat_text(stat)])
            values.append([None, None, None, None, stat])
    return Table(header, rows, values)
