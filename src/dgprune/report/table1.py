"""The paper's Table 1 layout: rows = dense model, then each keep ratio x criterion; columns = Intra /
Cross accuracy (%) per target domain, plus the filters, parameters and MACs that remain."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from statistics import mean

from dgprune.experiments.records import ResultRecord
from dgprune.pruning.criteria import criterion_label
from dgprune.report.cells import natural_key, pct_cell

CRITERION_LABELS = {"taylor": "Taylor (baseline)", "ior": "IoR", "none": "before pruning"}


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def _row_key(record: ResultRecord) -> tuple[float, int, str, str]:
    order = {"none": 0, "taylor": 1, "ior": 2}
    # The label separates rows of one criterion with other parameters (a sweep over IoR's alpha).
    label = criterion_label(record.criterion, record.criterion_params)
    return (-record.keep_ratio, order.get(record.criterion, 9), record.criterion, label)


def table1(records: list[ResultRecord]) -> Table:
    """Mean (± standard error) over seeds when several are present (the demo runs one)."""
    targets = sorted({r.target_domain for r in records}, key=natural_key)
    cells: dict[tuple, dict[str, list[ResultRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[_row_key(r)][r.target_domain].append(r)
    header = ["Model"] + [f"{t} {kind}" for t in targets for kind in ("Intra", "Cross")]
    header += ["filters kept", "params kept", "MACs kept"]
    rows = []
    for key in sorted(cells):
        by_target = cells[key]
        any_record = next(iter(by_target.values()))[0]
        label = _label(any_record)
        row = [label]
        for t in targets:
            rs = by_target.get(t, [])
            row += [pct_cell([r.intra_acc for r in rs]), pct_cell([r.cross_acc for r in rs])]
        all_rs = [r for rs in by_target.values() for r in rs]
        row.append(f"{mean(r.filters_kept / r.filters_total for r in all_rs):.0%}")
        row.append(f"{mean(r.params / r.params_dense for r in all_rs):.0%}")
        row.append(f"{mean(r.macs / r.macs_dense for r in all_rs):.0%}")
        rows.append(row)
    return Table(header, rows)


def _label(record: ResultRecord) -> str:
    if record.criterion == "none":
        return "dense (before pruning)"
    display = CRITERION_LABELS.get(record.criterion, record.criterion)
    name = criterion_label(record.criterion, record.criterion_params, display)  # defaults left implicit
    return f"{record.keep_ratio:.0%} {name}"
