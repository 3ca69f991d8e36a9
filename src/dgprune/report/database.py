"""What a sweep's report reads from its results database (`experiments.store`): the records of the
finished runs, the layer widths they kept and their configs."""

from __future__ import annotations

from dataclasses import dataclass
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


def read_report_inputs(db_path: Path, sweep: Sweep | None = None) -> ReportInputs:
    """The finished runs of ``sweep`` in the database at ``db_path`` (all of them when ``sweep`` is
    None); a ConfigError when there are none yet."""
    records = sweep_records(sweep, db_path)
    if not records:
        raise ConfigError(f"{db_path}: no finished runs to report yet")
    with Store(db_path) as store:
        done = store.rows("done", [r.run_id for r in records])
    return ReportInputs(
        records,
        widths={r["run_id"]: r["layer_widths"] for r in done if r["layer_widths"]},
        configs={r["run_id"]: r["config"] for r in done},
    )
