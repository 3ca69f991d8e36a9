"""`runs.csv`: every finished run as one row of numbers, for pandas, R or a spreadsheet.

``run_id``, then one column per scalar field of the record (``ResultRecord``, in its order:
accuracies as fractions, sizes as counts), ``criterion_label`` and ``criterion_params`` (JSON),
``in_tables`` (1 when the run is in the report's tables; 0 for a hyper-parameter draw that
training-domain validation left out), then one column per domain and split measured,
``acc/<domain>/<split>`` (the record's ``domain_split_acc``: ``train`` and ``val`` where the domain
was a source, ``target``, ``target_val`` and ``target_test`` where it was the target), empty where a
run has no such number.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Collection
from dataclasses import fields
from pathlib import Path
from typing import Any

from dgprune.experiments.records import ResultRecord
from dgprune.report.cells import natural_key
from dgprune.training.evaluation import SOURCE_SPLITS, TARGET_SPLITS

RUNS_FILE = "runs.csv"
_SPLIT_ORDER = {name: i for i, name in enumerate(SOURCE_SPLITS + TARGET_SPLITS)}
# Mappings: flattened into the per-domain columns, or (criterion_params) written as JSON.
_NOT_SCALAR = {"per_domain_acc", "per_domain_split", "domain_split_acc", "criterion_params", "versions"}


def _cell(value: Any) -> Any:
    """A CSV cell: empty for a missing or non-finite number; floats in full (repr round-trips)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else value


def accuracy_columns(records: list[ResultRecord]) -> list[tuple[str, str]]:
    """(domain, split) of every accuracy some record holds, domains in natural order."""
    pairs = {(d, split) for r in records for d, splits in r.domain_split_acc.items() for split in splits}
    return sorted(pairs, key=lambda p: (natural_key(p[0]), _SPLIT_ORDER.get(p[1], 99), p[1]))


def flat_rows(records: list[ResultRecord], in_tables: Collection[str] | None = None) -> list[dict[str, Any]]:
    """One dict per record with the columns of :func:`write_runs_csv` (values as written)."""
    scalar = ["run_id"] + [f.name for f in fields(ResultRecord) if f.name not in _NOT_SCALAR | {"run_id"}]
    accuracies = accuracy_columns(records)
    rows = []
    for r in records:
        row: dict[str, Any] = {name: _cell(getattr(r, name)) for name in scalar}
        row["criterion_label"] = r.label
        row["criterion_params"] = json.dumps(r.criterion_params, sort_keys=True)
        row["in_tables"] = int(in_tables is None or r.run_id in in_tables)
        for domain, split in accuracies:
            row[f"acc/{domain}/{split}"] = _cell(r.domain_split_acc.get(domain, {}).get(split))
        rows.append(row)
    return rows


def write_runs_csv(path: Path, records: list[ResultRecord], in_tables: Collection[str] | None = None) -> Path:
    """Write ``records`` to ``path`` (see the module's docstring); ``in_tables``: the run ids the
    tables show (None: all)."""
    rows = flat_rows(records, in_tables)
    header = list(rows[0]) if rows else [f.name for f in fields(ResultRecord)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path
