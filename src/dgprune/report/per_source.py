"""Accuracy on each source domain's val split, per target and criterion × keep ratio: which of the
domains a model trained on pruning costs most (Table 1 shows only their union, "Intra").

Rows: per target domain, the dense model then the pruned ones in Table 1's order (a fine-tuning
objective other than ERM named in the label); columns: every domain's val split accuracy where it
was a source ("-" in the target's own column), and the worst source. Cells: mean ± standard error
over seeds. The numbers are the records' ``per_domain_acc`` where ``per_domain_split`` says ``val``.
"""

from __future__ import annotations

from collections import defaultdict

from dgprune.experiments.records import ResultRecord
from dgprune.report.cells import Stat, natural_key, pct_stat, stat_text
from dgprune.report.table1 import CellValue, Table, _label, _row_key


def _source_acc(record: ResultRecord, domain: str) -> float | None:
    if record.per_domain_split.get(domain) != "val":
        return None
    return record.per_domain_acc.get(domain)


def _row_label(record: ResultRecord) -> str:
    finetune = record.finetune_algorithm or "erm"
    return _label(record) + ("" if finetune == "erm" else f", {finetune.upper()} fine-tune")


def per_source_table(records: list[ResultRecord]) -> Table:
    """The table of one dataset × model × pretraining algorithm (see the module's docstring)."""
    domains = sorted(
        {d for r in records for d, split in r.per_domain_split.items() if split == "val"}, key=natural_key
    )
    groups: dict[tuple, list[ResultRecord]] = defaultdict(list)
    for r in records:
        groups[(natural_key(r.target_domain), _row_key(r), r.finetune_algorithm or "erm")].append(r)
    header = ["Target", "Model", *(f"{d} val" for d in domains), "worst source"]
    rows: list[list[str]] = []
    values: list[list[CellValue]] = []
    for key in sorted(groups):
        group = groups[key]
        stats: list[Stat | None] = []
        for domain in domains:
            accs = [_source_acc(r, domain) for r in group]
            stats.append(pct_stat([a for a in accs if a is not None]))
        stats.append(pct_stat([r.worst_source_acc for r in group]))
        rows.append([group[0].target_domain, _row_label(group[0]), *(stat_text(s) for s in stats)])
        values.append([None, None, *stats])
    return Table(header, rows, values)
