"""The paper's Table 2 layout: per pretraining algorithm, the dense model, the pruned model and the
change (Δ = pruned − dense, in points), Intra and Cross per target domain. Each fine-tuning
objective used while pruning gets its own pruned and Δ rows."""

from __future__ import annotations

from collections import defaultdict

from dgprune.experiments.records import ResultRecord
from dgprune.report.cells import Stat, natural_key, pct_stat, stat_text
from dgprune.report.table1 import CellValue, Table

ALGORITHM_ORDER = ["erm", "coral", "mixup", "vrex", "groupdro", "irm"]


def table2(records: list[ResultRecord]) -> Table:
    targets = sorted({r.target_domain for r in records}, key=natural_key)
    by_algorithm: dict[str, list[ResultRecord]] = defaultdict(list)
    for r in records:
        by_algorithm[r.algorithm].append(r)
    header = ["Pretrain", "Model"] + [f"{t} {kind}" for t in targets for kind in ("Intra", "Cross")]
    rows: list[list[str]] = []
    values: list[list[CellValue]] = []

    def add(labels: list[str], stats: list[Stat | None], signed: bool = False) -> None:
        rows.append([*labels, *(stat_text(s, signed) for s in stats)])
        values.append([None] * len(labels) + list(stats))

    for algorithm in sorted(by_algorithm, key=_algorithm_rank):
        group = by_algorithm[algorithm]
        dense = [r for r in group if r.criterion == "none"]
        add([algorithm.upper(), "dense"], _accuracy_stats(dense, targets))
        pruned = [r for r in group if r.criterion != "none"]
        for finetune in sorted({r.finetune_algorithm or "erm" for r in pruned}, key=_algorithm_rank):
            chosen = [r for r in pruned if (r.finetune_algorithm or "erm") == finetune]
            ratio = chosen[0].keep_ratio
            add(["", f"pruned {ratio:.0%}, {finetune.upper()} fine-tune"], _accuracy_stats(chosen, targets))
            add(["", "Δ"], _delta_stats(dense, chosen, targets), signed=True)
    return Table(header, rows, values)


def _algorithm_rank(name: str) -> tuple[int, str]:
    return (ALGORITHM_ORDER.index(name) if name in ALGORITHM_ORDER else len(ALGORITHM_ORDER), name)


def _accuracy_stats(records: list[ResultRecord], targets: list[str]) -> list[Stat | None]:
    cells = []
    for t in targets:
        rs = [r for r in records if r.target_domain == t]
        cells += [pct_stat([r.intra_acc for r in rs]), pct_stat([r.cross_acc for r in rs])]
    return cells


def _delta_stats(
    dense: list[ResultRecord], pruned: list[ResultRecord], targets: list[str]
) -> list[Stat | None]:
    """Δ per seed (pruned minus its own dense model), then mean ± standard error over seeds."""
    dense_by = {(r.target_domain, r.seed): r for r in dense}
    cells = []
    for t in targets:
        pairs = [
            (dense_by[(r.target_domain, r.seed)], r)
            for r in pruned
            if r.target_domain == t and (r.target_domain, r.seed) in dense_by
        ]
        cells.append(pct_stat([p.intra_acc - d.intra_acc for d, p in pairs]))
        cells.append(pct_stat([p.cross_acc - d.cross_acc for d, p in pairs]))
    return cells
