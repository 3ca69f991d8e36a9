"""The paper's Table 1 layout: rows = dense model, then each keep ratio x criterion; columns = Intra /
Cross accuracy (%) per target domain, plus the filters, parameters and MACs that remain."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from statistics import mean

from dgprune.experiments.records import ResultRecord
from dgprune.pruning.criteria import criterion_label
from dgprune.report.cells import Stat, natural_key, pct_stat, stat_text

CRITERION_LABELS = {"taylor": "Taylor (baseline)", "ior": "IoR", "none": "before pruning"}


# A cell's numbers, for the CSV: a Stat (mean, standard error, n), a plain number, or None (a label
# column, or no value).
CellValue = Stat | float | None


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]  # the cells as shown (Markdown, LaTeX, the console)
    # The same cells as numbers, row by row (report.export.to_csv writes mean and standard error as
    # separate numeric columns); None: the CSV holds the cells as shown.
    values: list[list[CellValue]] | None = None

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def _row_key(record: ResultRecord) -> tuple[float, int, str, str]:
    order = {"none": 0, "taylor": 1, "ior": 2}
    # The label separates rows of one criterion with other parameters (a sweep over IoR's alpha).
    label = record.label  # also separates runs that saw the target's images (prune.target_access)
    return (-record.keep_ratio, order.get(record.criterion, 9), record.criterion, label)


def table1(records: list[ResultRecord]) -> Table:
    """Mean (± standard error) over seeds when several are present (the demo runs one)."""
    targets = sorted({r.target_domain for r in records}, key=natural_key)
    cells: dict[tuple, dict[str, list[ResultRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[_row_key(r)][r.target_domain].append(r)
    header = ["Model"] + [f"{t} {kind}" for t in targets for kind in ("Intra", "Cross")]
    header += ["filters kept", "params kept", "MACs kept"]
    rows, values = [], []
    for key in sorted(cells):
        by_target = cells[key]
        any_record = next(iter(by_target.values()))[0]
        stats: list[Stat | None] = []
        for t in targets:
            rs = by_target.get(t, [])
            stats += [pct_stat([r.intra_acc for r in rs]), pct_stat([r.cross_acc for r in rs])]
        all_rs = [r for rs in by_target.values() for r in rs]
        kept = [
            mean(r.filters_kept / r.filters_total for r in all_rs),
            mean(r.params / r.params_dense for r in all_rs),
            mean(r.macs / r.macs_dense for r in all_rs),
        ]
        rows.append([_label(any_record), *(stat_text(v) for v in stats), *(f"{k:.0%}" for k in kept)])
        values.append([None, *stats, *(100 * k for k in kept)])  # percent, as shown
    return Table(header, rows, values)


def _label(record: ResultRecord) -> str:
    if record.criterion == "none":
        return "dense (before pruning)"
    display = CRITERION_LABELS.get(record.criterion, record.criterion)
    name = criterion_label(  # defaults left implicit; [unlabeled target] when it saw the target's images
        record.criterion, record.criterion_params, display, target_access=record.target_access
    )
    return f"{record.keep_ratio:.0%} {name}"
