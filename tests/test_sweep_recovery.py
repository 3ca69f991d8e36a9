"""A dead peer costs nothing: units of dead or silent workers are taken back while a sweep runs, two
`dgprune sweep` processes on one database survive a SIGKILL of either, and finished runs whose model
directory was deleted run again on resume."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from dgprune.errors import ConfigError
from dgprune.experiments.store import Store
from dgprune.experiments.sweep import SweepOutcome, load_sweep, register_sweep, run_sweep

BASE = {
    "data": {"name": "rotated_digits"},
    "model": {"name": "mnist_cnn"},
    "pretrain": {"steps": 30, "batch_size": 8, "eval_every": 10},
    "prune": {"steps": 40, "interval": 2, "batch_size": 8, "eval_every": 20},
    "device": "cpu",
}
# Short heartbeat and staleness, so that a silent worker's unit is taken back within seconds.
FAST = {"workers": 1, "threads": 1, "heartbeat_s": 0.5, "stale_after_s": 3}
COMPARED = ("intra_acc", "cross_acc", "per_domain_acc", "filters_kept", "params", "selected_step")


def write_sweep(path: Path, seeds: list[int]) -> Path:
    grid = {"target": "0", "seed": seeds, "prune.criterion": "taylor", "prune.keep_ratio": 0.5}
    path.write_text(yaml.safe_dump({"base": BASE, "grid": grid, "sweep": FAST}))
    return path


def query(db: Path, sql: str) -> list[dict]:
    if not db.is_file():  # not created yet (and a read must not create it)
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    except sqlite3.OperationalError:  # its schema not written yet
        return []
    finally:
        conn.close()


def in_process_sweep(sweep, **kwargs):
    threads = torch.get_num_threads()  # a 1-worker sweep runs here and sets 1 thread
    try:
        return run_sweep(sweep, quiet=True, **kwargs)
    finally:
        torch.set_num_threads(threads)


def test_stale_interval_must_exceed_two_heartbeats(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {"base": BASE, "grid": {"target": "0"}, "sweep": {"heartbeat_s": 2, "stale_after_s": 3}}
        )
    )
    with pytest.raises(ConfigError, match=r"stale_after_s \(3\) must be more than twice heartbeat_s \(2\)"):
        load_sweep(path)


def test_a_sweep_that_stops_with_runs_unfinished_exits_1(tmp_path, monkeypatch):
    """Every worker died (e.g. killed for memory): the summary says what is left, and the exit status
    is not 0 (`dgprune sweep ... && dgprune report ...` must not go on)."""
    from typer.testing import CliRunner

    from dgprune.cli import app, sweeps

    counts = {"pending": 1, "running": 1, "done": 2, "failed": 0}
    monkeypatch.setattr(sweeps, "run_sweep", lambda *args, **kwargs: SweepOutcome(counts, 1.0, []))
    result = CliRunner().invoke(app, ["sweep", str(write_sweep(tmp_path / "s.yaml", [0, 1]))])
    assert result.exit_code == 1, result.output
    assert "done 2/4, failed 0, pending 1 in 1 s, still running 1" in result.output
    assert "the same command resumes it" in result.output


def test_a_unit_held_by_a_silent_worker_elsewhere_is_taken_back_once_stale(tmp_path):
    """Another host's worker claimed a unit and stopped beating: the sweep does not end with that unit
    running; it runs the rest, waits until the claim is stale (3 s), takes the unit back, runs it."""
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", [0, 1]), tmp_path / "out")
    sweep.directory.mkdir()
    with Store(sweep.db_path) as store:
        register_sweep(store, sweep)
        held = store.claim("elsewhere", pid=1, host="another-host")  # alive as far as anyone can tell
        (claimed_at,) = [u["heartbeat"] for u in store.units() if u["unit_id"] == held.unit_id]
    outcome = in_process_sweep(sweep)
    assert outcome.counts == {"pending": 0, "running": 0, "done": 4, "failed": 0}
    units = {u["unit_id"]: u for u in query(sweep.db_path, "SELECT * FROM units")}
    assert units[held.unit_id]["attempts"] == 2 and units[held.unit_id]["worker"] == "w0"
    assert {u["status"] for u in units.values()} == {"done"}
    # Taken back only once stale: the second claim is at least stale_after_s after the silent one.
    assert units[held.unit_id]["started_at"] >= claimed_at + FAST["stale_after_s"]
    assert all(
        (sweep.directory / "runs" / c.run_id() / "model.safetensors").is_file() for c in sweep.configs()
    )


def test_killed_peer_sweep_process_is_replaced_by_the_survivor(tmp_path):
    """Two `dgprune sweep` processes share one database; one is SIGKILLed in the middle of a unit (its
    dense model done, its pruning running). The survivor takes the unit back and finishes everything:
    exit 0, every run done exactly once, the killed unit's finished dense run not redone."""
    config = write_sweep(tmp_path / "peers.yaml", [0, 1])
    out = tmp_path / "out"
    db = out / "results.sqlite"
    script = Path(sys.executable).parent / "dgprune"
    cmd = [str(script), "sweep", str(config), "--out", str(out), "--quiet"]
    procs = [
        subprocess.Popen(
            cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            for unit in query(db, "SELECT * FROM units WHERE status = 'running'"):
                runs = {
                    r["status"]
                    for r in query(db, f"SELECT status FROM runs WHERE unit_id = '{unit['unit_id']}'")
                }
                holder = [p for p in procs if p.pid == unit["pid"]]
                if holder and runs == {"done", "running"}:  # mid-unit: dense done, pruning running
                    victim, unit_id = holder[0], unit["unit_id"]
            assert all(p.poll() is None for p in procs), "a sweep ended before one could be killed"
            time.sleep(0.02)
        assert victim is not None, "no sweep process was ever caught in the middle of a unit"
        dense_finished = query(db, f"SELECT finished_at FROM runs WHERE run_id = '{unit_id}'")[0][
            "finished_at"
        ]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        survivor = next(p for p in procs if p is not victim)
        stdout, stderr = survivor.communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert survivor.returncode == 0, stderr + stdout
    assert "done 4/4, failed 0, pending 0" in stdout and "Traceback" not in stderr
    rows = query(db, "SELECT * FROM runs")
    expected = load_sweep(config, out).run_ids()
    assert sorted(r["run_id"] for r in rows) == sorted(expected)  # every run exactly once
    assert {r["status"] for r in rows} == {"done"}
    units = {u["unit_id"]: u for u in query(db, "SELECT * FROM units")}
    assert {u["status"] for u in units.values()} == {"done"}
    assert units[unit_id]["attempts"] == 2 and units[unit_id]["pid"] == survivor.pid
    dense = next(r for r in rows if r["run_id"] == unit_id)
    assert dense["finished_at"] == dense_finished  # the killed unit's finished run was not redone
    assert not list(out.glob("*/*/checkpoint.pt"))


def test_a_finished_run_whose_model_directory_was_deleted_runs_again(tmp_path):
    """Resume notices a deleted model directory (and one missing its weights) and recomputes those
    runs, to the same numbers; the others are not touched."""
    config = write_sweep(tmp_path / "s.yaml", [0])
    sweep = load_sweep(config, tmp_path / "out")
    first = in_process_sweep(sweep)
    assert first.counts["done"] == 2
    before = {r["run_id"]: r for r in query(sweep.db_path, "SELECT * FROM runs")}
    (pruned_id,) = [c.run_id() for c in sweep.configs()]
    (unit_id,) = [u.unit_id for u in sweep.units()]
    shutil.rmtree(sweep.directory / "runs" / pruned_id)
    (sweep.directory / "pretrained" / unit_id / "model.safetensors").unlink()

    result = run_cli("sweep", str(config), "--out", str(sweep.directory), timeout=180)
    assert result.returncode == 0, result.stderr + result.stdout
    for directory in (sweep.directory / "runs" / pruned_id, sweep.directory / "pretrained" / unit_id):
        assert {"model.safetensors", "structure.json", "metrics.json"} <= {
            p.name for p in directory.glob("*")
        }
    assert "ran again 2 finished run(s) whose model directory was missing" in result.stdout
    assert "done 2/2, failed 0, pending 0" in result.stdout
    after = {r["run_id"]: r for r in query(sweep.db_path, "SELECT * FROM runs")}
    assert set(after) == set(before) and {r["status"] for r in after.values()} == {"done"}
    for run_id, row in after.items():
        assert row["finished_at"] > before[run_id]["finished_at"]  # really recomputed
        assert {k: row[k] for k in COMPARED} == {k: before[run_id][k] for k in COMPARED}
    # A complete sweep directory: nothing runs again.
    again = in_process_sweep(load_sweep(config, sweep.directory))
    assert again.rerun == [] and again.counts["done"] == 2
    assert query(sweep.db_path, "SELECT finished_at FROM runs ORDER BY run_id") == [
        {"finished_at": after[k]["finished_at"]} for k in sorted(after)
    ]
