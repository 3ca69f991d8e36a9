"""What a sweep's report reads from its results database (`experiments.store`): the records of the
finished runs, the layer widths they kept and their configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgprune.errors import ConfigError
from dgprune.experiments.records import ResultRecord
from dgprune.experiments.store import Store
from dgprune.experiments.sweep import Sweep, sweep_records


@dataclass(frozen=True)
class ReportInputs:
    records: list[ResultRecord]
    widths: dict[str, list[list]]  # run id -> layer widths (the runs that recorded them)
    configs: dict[str, dict[str, Any]]  # run id -> the run's config
    # The failed runs (database rows, with their error), which no table holds: the report says so.
    failed: list[dict[str, Any]] = field(default_factory=list)


def read_report_inputs(db_path: Path, sweep: Sweep | None = None) -> ReportInputs:
    """The finished runs of ``sweep`` in the database at ``db_path`` (all of them when ``sweep`` is
    None) and its failed runs; a ConfigError when none has finished yet."""
    records = sweep_records(sweep, db_path)
    with Store(db_path) as store:
        failed = store.rows("failed", sweep.run_ids() if sweep is not None else None)
        done = store.rows("done", [r.run_id for r in records])
    if not records:
        also = f" ({failed_summary(failed)})" if failed else ""
        raise ConfigError(f"{db_path}: no finished runs to report yet{also}")
    return ReportInputs(
        records,
        widths={r["run_id"]: r["layer_widths"] for r in done if r["layer_widths"]},
        configs={r["run_id"]: r["config"] for r in done},
        failed=failed,
    )


def failed_summary(failed: list[dict[str, Any]], shown: int = 10) -> str:
    """"2 runs failed: ab12, cd34" (the first ``shown`` ids); see `dgprune status --errors` for why."""
    ids = ", ".join(row["run_id"] for row in failed[:shown])
    more = f" and {len(failed) - shown} more" if len(failed) > shown else ""
    return f"{len(failed)} run{'s' if len(failed) != 1 else ''} failed: {ids}{more}"
