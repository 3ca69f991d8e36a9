"""Where a sweep stands (counts, running and failed runs, ETA) and its finished records."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgprune.errors import ConfigError
from dgprune.experiments.records import ResultRecord
from dgprune.experiments.store import Store, worker_gone
from dgprune.experiments.sweep.spec import Sweep
from dgprune.experiments.sweep.workers import cuda_gpus, resolve_workers


@dataclass
class SweepStatus:
    counts: dict[str, int]  # done, running, stale, failed, pending
    total: int
    running: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    eta_s: float | None
    parallel: int
    # Runs marked running whose worker is gone (dead process, no heartbeat): the next `dgprune sweep`
    # takes them back. Each row has "stale_reason".
    stale: list[dict[str, Any]] = field(default_factory=list)


def sweep_status(sweep: Sweep, now: float | None = None) -> SweepStatus:
    """Counts per status (runs not yet registered count as pending; a running run whose worker is gone
    counts as stale) and an ETA.

    ETA = remaining work / parallelism: each pending run costs the mean wall time of the finished
    runs of its kind (dense or pruned); a running one, that minus its elapsed time; parallelism is
    the number of live workers (or the configured number when none is running).
    """
    now = time.time() if now is None else now
    ids = sweep.run_ids()
    kinds = {spec.run_id: spec.kind for unit in sweep.units() for spec in unit.specs()}
    rows: dict[str, dict[str, Any]] = {}
    if sweep.db_path.is_file():
        with Store(sweep.db_path) as store:
            rows = {r["run_id"]: r for r in store.rows(run_ids=ids)}
            units = {u["unit_id"]: u for u in store.units()}
    else:
        units = {}
    stale = {
        run_id: reason
        for run_id, row in rows.items()
        if row["status"] == "running"
        and (reason := _stale_reason(units.get(row["unit_id"]), now, sweep.options.stale_after_s))
    }
    counts = {"done": 0, "running": 0, "stale": 0, "failed": 0, "pending": 0}
    for run_id in ids:
        counts["stale" if run_id in stale else rows[run_id]["status"] if run_id in rows else "pending"] += 1
    done = [r for r in rows.values() if r["status"] == "done" and r["wall_time_s"] is not None]
    mean_s = {
        kind: statistics.mean(r["wall_time_s"] for r in done if r["kind"] == kind)
        for kind in ("dense", "pruned")
        if any(r["kind"] == kind for r in done)
    }
    running = [r for r in rows.values() if r["status"] == "running" and r["run_id"] not in stale]
    stale_rows = [{**rows[run_id], "stale_reason": reason} for run_id, reason in stale.items()]
    live = {
        (u["host"], u["pid"])
        for u in units.values()
        if u["status"] == "running" and worker_gone(u, now, sweep.options.stale_after_s) is None
    }
    parallel = max(1, len(live) or resolve_workers(sweep.options.workers, cuda_gpus(sweep)))
    eta: float | None = 0.0
    for run_id in ids:
        row = rows.get(run_id)
        status = row["status"] if row else "pending"
        if status in ("done", "failed"):
            continue
        kind = kinds[run_id]
        if kind not in mean_s:
            eta = None
            break
        running_now = status == "running" and run_id not in stale  # a stale run starts again
        elapsed = now - row["started_at"] if running_now and row and row["started_at"] else 0.0
        eta += max(mean_s[kind] - elapsed, 0.0)
    if eta is not None:
        eta /= parallel
    failed = [r for r in rows.values() if r["status"] == "failed"]
    return SweepStatus(counts, len(ids), running, failed, eta, parallel, stale_rows)


def _stale_reason(unit: dict[str, Any] | None, now: float, stale_after_s: float) -> str | None:
    """Why a running run's worker is gone, or None while it is alive."""
    if unit is None or unit["status"] != "running":
        return "no worker holds its unit"
    gone = worker_gone(unit, now, stale_after_s)
    who = f"worker {unit['worker']} (host {unit['host']}, pid {unit['pid']})"
    if gone == "dead":
        return f"{who} is dead"
    if gone == "silent":
        beat = "never beat" if unit["heartbeat"] is None else f"last beat {now - unit['heartbeat']:.0f} s ago"
        return f"{who} is silent ({beat}; stale after {stale_after_s:g} s)"
    return None


def sweep_records(sweep: Sweep | None, db_path: Path) -> list[ResultRecord]:
    """The finished records of the sweep (of the whole database when ``sweep`` is None)."""
    if not db_path.is_file():
        raise ConfigError(f"no results database at {db_path}; run `dgprune sweep` first")
    with Store(db_path) as store:
        return store.records(sweep.run_ids() if sweep is not None else None)
