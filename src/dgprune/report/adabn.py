"""Transductive runs beside AdaBN (issue 17.3): every run under ``prune.target_access: unlabeled``
of a BatchNorm model next to the baseline every transductive result is reported with — the same
model's cross-domain accuracy after AdaBN (BatchNorm statistics re-estimated on the target's
images, Li et al. 2016), for the pruned model and the dense model it came from.

Rows: per dataset × model × keep ratio × criterion label; cells: mean ± standard error over the
(seed, target) runs, in percent. Only records that measured AdaBN (``cross_acc_adabn`` set) appear.
"""

from __future__ import annotations

from collections import defaultdict

from dgprune.experiments.records import ResultRecord
from dgprune.report.cells import pct_stat, stat_text
from dgprune.report.table1 import CellValue, Table


def adabn_table(records: list[ResultRecord]) -> Table | None:
    """None when no record measured AdaBN (source-only runs, GroupNorm models)."""
    groups: dict[tuple, list[ResultRecord]] = defaultdict(list)
    for r in records:
        if r.cross_acc_adabn is not None:
            groups[(r.dataset, r.model, -r.keep_ratio, r.label)].append(r)
    if not groups:
        return None
    header = [
        "Dataset",
        "Model",
        "Keep",
        "Criterion",
        "runs",
        "cross",
        "cross + AdaBN",
        "dense cross + AdaBN",
    ]
    rows: list[list[str]] = []
    values: list[list[CellValue]] = []
    for (dataset, model, keep, label), group in sorted(groups.items()):
        stats = [
            pct_stat([r.cross_acc for r in group]),
            pct_stat([r.cross_acc_adabn for r in group if r.cross_acc_adabn is not None]),
            pct_stat([r.dense_cross_acc_adabn for r in group if r.dense_cross_acc_adabn is not None]),
        ]
        rows.append([dataset, model, f"{-keep:.0%}", label, str(len(group)), *(stat_text(s) for s in stats)])
        values.append([None, None, None, None, None, *stats])
    return Table(header, rows, values)
