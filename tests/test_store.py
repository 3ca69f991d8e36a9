"""The sweep database: registration, exclusive claims, reclaiming dead workers, many concurrent writers."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from dgprune.experiments.records import ResultRecord
from dgprune.experiments.store import RunResult, RunSpec, Store


def fake_record(run_id: str, seed: int = 0, criterion: str = "taylor", cross: float = 0.5) -> ResultRecord:
    return ResultRecord(
        dataset="toy",
        target_domain="a",
        model="m",
        algorithm="erm",
        criterion=criterion,
        keep_ratio=0.5,
        seed=seed,
        intra_acc=0.9,
        cross_acc=cross,
        per_domain_acc={"a": cross, "b": 0.9},
        worst_source_acc=0.9,
        filters_total=10,
        filters_kept=5,
        params=100,
        macs=1000,
        params_dense=400,
        macs_dense=4000,
        run_id=run_id,
        selected_step=3,
        model_dir="/nowhere",
        wall_time_s=1.5,
        finetune_algorithm="erm",
    )


def make_units(count: int, runs_per_unit: int = 3) -> list[tuple[str, list[RunSpec]]]:
    units = []
    for u in range(count):
        unit_id = f"u{u:03d}"
        specs = [RunSpec(unit_id, unit_id, "dense", {"unit": u}, {"criterion": "none", "seed": u})]
        specs += [
            RunSpec(
                f"{unit_id}-r{k}", unit_id, "pruned", {"unit": u, "k": k}, {"criterion": "taylor", "seed": u}
            )
            for k in range(runs_per_unit - 1)
        ]
        units.append((unit_id, specs))
    return units


def test_register_is_idempotent_and_claims_are_exclusive(tmp_path):
    with Store(tmp_path / "db.sqlite") as store:
        assert store.register(make_units(3)) == 9
        assert store.register(make_units(3)) == 0  # same rows again: nothing added
        first = store.claim("w0")
        second = store.claim("w1")
        assert first is not None and second is not None and first.unit_id != second.unit_id
        assert first.run_ids == ["u000", "u000-r0", "u000-r1"]
        assert store.claim("w2").unit_id == "u002"
        assert store.claim("w3") is None
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_record_roundtrip_and_unit_status(tmp_path):
    with Store(tmp_path / "db.sqlite") as store:
        store.register(make_units(1))
        claim = store.claim("w0")
        for run_id in claim.run_ids[:-1]:
            record = fake_record(run_id)
            store.record_done(run_id, RunResult(record, latency_ms=0.25, layer_widths=[["c1", 3, 8]]))
        store.mark_failed(claim.run_ids[-1], "Traceback ...\nRuntimeError: boom")
        assert store.finish_unit(claim.unit_id) == "failed"
        records = store.records()
        assert records == [fake_record(run_id) for run_id in claim.run_ids[:-1]]
        row = store.rows("failed")[0]
        assert row["error"].endswith("boom")
        done = store.rows("done")[0]
        assert done["latency_ms"] == 0.25 and done["layer_widths"] == [["c1", 3, 8]]
        assert done["per_domain_acc"] == {"a": 0.5, "b": 0.9}
        # Retrying a failed unit re-runs only its runs that are not done.
        assert store.reset_failed() == 1
        assert store.claim("w1").run_ids == [claim.run_ids[-1]]


def test_units_of_dead_or_silent_workers_are_reclaimed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists
    with Store(tmp_path / "db.sqlite") as store:
        store.register(make_units(3))
        store.claim("dead", pid=dead.pid)
        store.claim("alive")  # this process: alive, fresh heartbeat
        store.claim("silent", pid=os.getpid())
        store.conn.execute("UPDATE units SET heartbeat = ? WHERE worker = 'silent'", (time.time() - 999,))
        store.mark_running(["u000-r0"])
        assert sorted(store.reclaim_stale(stale_after_s=60)) == ["u000", "u002"]
        statuses = {u["unit_id"]: u["status"] for u in store.units()}
        assert statuses == {"u000": "pending", "u001": "running", "u002": "pending"}
        assert {r["status"] for r in store.rows() if r["unit_id"] == "u000"} == {"pending"}


def _worker(db_path: str, units: list, out_path: str) -> None:
    store = Store(db_path)
    store.register(units)  # every worker registers the same sweep concurrently
    claimed = []
    while (claim := store.claim(f"pid{os.getpid()}")) is not None:
        claimed.append(claim.unit_id)
        for run_id in claim.run_ids:
            store.mark_running([run_id])
            store.record_done(run_id, RunResult(fake_record(run_id), latency_ms=1.0))
        store.heartbeat([claim.unit_id])
        store.finish_unit(claim.unit_id)
    Path(out_path).write_text("\n".join(claimed))
    store.close()


def test_many_concurrent_writers(tmp_path):
    # 4 processes (each imports torch through dgprune.experiments: seconds) x 40 units x 3 runs.
    workers = 4
    units = make_units(40, runs_per_unit=3)
    db_path = str(tmp_path / "db.sqlite")
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=_worker, args=(db_path, units, str(tmp_path / f"claimed{i}.txt")))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    claimed = [
        line
        for i in range(workers)
        for line in (tmp_path / f"claimed{i}.txt").read_text().split("\n")
        if line
    ]
    assert sorted(claimed) == sorted(unit_id for unit_id, _ in units)  # each unit claimed exactly once
    with Store(db_path) as store:
        rows = store.rows()
        assert len(rows) == 40 * 3 and {r["status"] for r in rows} == {"done"}
        assert {u["status"] for u in store.units()} == {"done"}
        assert {u["attempts"] for u in store.units()} == {1}
        assert len({r["run_id"] for r in rows}) == len(rows)


def test_database_of_an_older_version_gets_new_record_columns(tmp_path):
    """A ResultRecord field added after the database was made gets its column on open."""
    path = tmp_path / "db.sqlite"
    with Store(path) as store:
        store.register(make_units(1, runs_per_unit=1))
        store.conn.execute("ALTER TABLE runs DROP COLUMN skipped_images")  # as an older dgprune made it
    with Store(path) as store:
        store.record_done("u000", RunResult(fake_record("u000")))
        assert store.records() == [fake_record("u000")]


def test_a_unit_whose_workers_keep_dying_is_failed_not_handed_on(tmp_path):
    """Within a sweep, a unit whose worker died on its third attempt is failed (with why), so a unit
    that kills its worker (e.g. out of memory) cannot take down every worker in turn."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with Store(tmp_path / "db.sqlite") as store:
        store.register(make_units(2))
        for attempt in range(1, 4):
            claim = store.claim("w", pid=dead.pid)
            assert claim is not None and claim.unit_id == "u000"
            store.mark_running(claim.run_ids[:1])
            taken_back = store.reclaim_stale(stale_after_s=60, max_attempts=3)
            assert taken_back == ([] if attempt == 3 else ["u000"])
        units = {u["unit_id"]: u for u in store.units()}
        assert units["u000"]["status"] == "failed" and units["u000"]["attempts"] == 3
        assert f"pid {dead.pid}) died while running this unit, after 3 attempt(s)" in units["u000"]["error"]
        assert {r["status"] for r in store.rows() if r["unit_id"] == "u000"} == {"failed"}
        assert units["u001"]["status"] == "pending"
        # Without a limit (on start), the same unit would be taken back again.
        store.reset_failed()
        store.claim("w", pid=dead.pid)
        assert store.reclaim_stale(stale_after_s=60) == ["u000"]


def test_requeue_and_count_units(tmp_path):
    with Store(tmp_path / "db.sqlite") as store:
        store.register(make_units(3))
        for _ in range(3):
            claim = store.claim("w")
            for run_id in claim.run_ids:
                store.record_done(run_id, RunResult(fake_record(run_id)))
            store.finish_unit(claim.unit_id)
        store.conn.execute("UPDATE units SET status = 'running' WHERE unit_id = 'u002'")  # held by a peer
        assert store.count_units("done") == 2 and store.count_units("running", ["u000", "u002"]) == 1
        # A done run of u000 and of the held u002; u001-r0 is asked twice; "nope" does not exist.
        assert store.requeue(["u000-r1", "u001-r0", "u001-r0", "u002", "nope"]) == 2
        status = {r["run_id"]: r["status"] for r in store.rows()}
        assert [k for k, v in status.items() if v != "done"] == ["u000-r1", "u001-r0"]
        assert {u["unit_id"]: u["status"] for u in store.units()} == {
            "u000": "pending",
            "u001": "pending",
            "u002": "running",
        }
        # The next claim runs only the requeued run of the unit.
        assert store.claim("w").run_ids == ["u000-r1"]
