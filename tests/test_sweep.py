"""Sweeps: grid expansion and ids; a real sweep killed with SIGKILL, resumed, and compared with an
uninterrupted one; status and report on the finished sweep."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dgprune.cli import app
from dgprune.errors import ConfigError
from dgprune.experiments.config import build_config
from dgprune.experiments.sweep import (
    cuda_gpus,
    default_workers,
    expand_grid,
    group_units,
    load_sweep,
    resolve_workers,
    run_sweep,
    sweep_status,
)

TINY_BASE = {
    "data": {"name": "rotated_digits"},
    "model": {"name": "mnist_cnn"},
    "pretrain": {"steps": 6, "batch_size": 16, "eval_every": 3},
    "prune": {"steps": 12, "interval": 2, "batch_size": 16, "eval_every": 4},
    "device": "cpu",
}


def ids(configs) -> set[str]:
    return {c.run_id() for c in configs}


def test_grid_ids_are_stable_and_independent_of_order():
    grid = {
        "seed": [0, 1],
        "target": ["0", "75"],
        "prune.criterion": ["taylor", "ior"],
        "prune.keep_ratio": [0.5, 0.3],
    }
    shuffled = {
        "prune.keep_ratio": [0.3, 0.5],
        "prune.criterion": ["ior", "taylor"],
        "target": ["75", 0],  # a YAML number names the same domain
        "seed": [1, 0],
    }
    base_reordered = {key: TINY_BASE[key] for key in reversed(list(TINY_BASE))}
    first, second = expand_grid(TINY_BASE, [grid]), expand_grid(base_reordered, [shuffled])
    assert len(first) == 16 and ids(first) == ids(second)
    assert [c.run_id() for c in first] == [c.run_id() for c in second]  # canonical order too
    # The id is the hash of the whole resolved config: the same as building that config by hand.
    by_hand = build_config(
        base=TINY_BASE,
        overrides={"seed": 1, "target": "75", "prune": {"criterion": "ior", "keep_ratio": 0.3}},
    )
    assert by_hand.run_id() in ids(first)
    # Units: one pretrained model per (seed, target), shared by its 4 pruning runs.
    units = group_units(first)
    assert len(units) == 4 and all(len(u.runs) == 4 for u in units)


def test_grid_all_targets_alpha_normalisation_and_same_finetune():
    configs = expand_grid(
        TINY_BASE,
        [
            {"target": "all", "prune.criterion": ["taylor", "ior"], "prune.alpha": [1.0, 2.0]},
            {
                "target": "0",
                "pretrain.algorithm": ["erm", "coral"],
                "prune.criterion": "taylor",
                "prune.finetune_algorithm": ["erm", "same"],
            },
        ],
    )
    targets = {c.target for c in configs}
    assert targets == {"0", "15", "30", "45", "60", "75"}
    taylor = [c for c in configs if c.prune.criterion == "taylor" and c.pretrain.algorithm == "erm"]
    assert len(taylor) == 6 and all(c.prune.criterion_params == {} for c in taylor)  # α does not split them
    assert len([c for c in configs if c.prune.criterion == "ior"]) == 12
    coral = [c for c in configs if c.pretrain.algorithm == "coral"]
    assert sorted(c.prune.finetune_algorithm for c in coral) == ["coral", "erm"]
    # The union of the two grids is deduplicated: ERM/Taylor/target 0 appears once.
    assert len(configs) == 6 + 12 + 2 - 0


def test_grid_errors_name_the_problem():
    with pytest.raises(ConfigError, match="kep_ratio"):
        expand_grid(TINY_BASE, [{"target": "0", "prune.kep_ratio": [0.5]}])
    with pytest.raises(ConfigError, match="unknown target domain '90'"):
        expand_grid(TINY_BASE, [{"target": [90]}])
    with pytest.raises(ConfigError, match="keep_ratio"):
        expand_grid(TINY_BASE, [{"target": "0", "prune.keep_ratio": [1.5]}])


def test_worker_count_fits_cores_memory_and_gpus(tmp_path, monkeypatch):
    assert default_workers(cores=8, memory_bytes=64 * 2**30) == 8  # one per core
    assert default_workers(cores=8, memory_bytes=5 * 2**30) == 2  # at least 2 GiB each
    assert resolve_workers("auto", gpus=2) == 2  # on CUDA: one per GPU, not one per core
    assert resolve_workers("3", gpus=2) == 3  # an explicit count wins
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        resolve_workers(0)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": {**TINY_BASE, "device": "auto"}, "grid": {"target": "0"}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert cuda_gpus(load_sweep(path)) == 4
    assert cuda_gpus(load_sweep(path, device="cpu")) == 0  # --device cpu: the cores count


# -- a real sweep, killed and resumed --------------------------------------------------------------

# Long enough that pretraining (60 steps) and pruning (55 steps) pass a checkpoint (every 50 steps),
# short enough for a test: 2 seeds x 1 target, Taylor and IoR = 2 units, 6 rows.
KILL_SWEEP = {
    "base": {
        **TINY_BASE,
        "pretrain": {"steps": 60, "batch_size": 16, "eval_every": 20},
        "prune": {"steps": 55, "interval": 2, "batch_size": 16, "eval_every": 10},
    },
    "grid": {"target": "0", "seed": [0, 1], "prune.criterion": ["taylor", "ior"], "prune.keep_ratio": 0.5},
    "sweep": {"workers": 2, "threads": 1, "heartbeat_s": 1},
}
COMPARED = [
    "status",
    "intra_acc",
    "cross_acc",
    "per_domain_acc",
    "worst_source_acc",
    "dense_intra_acc",
    "dense_cross_acc",
    "filters_total",
    "filters_kept",
    "params",
    "macs",
    "selected_step",
    "variance_term_share",
    "masked_vs_compressed_max_abs_diff",
    "layer_widths",
]


def sweep_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dgprune", "sweep", str(config), "--quiet", *extra]


def db_rows(db: Path) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY run_id")]
    finally:
        conn.close()


def statuses(db: Path) -> list[str]:
    try:
        return [r["status"] for r in db_rows(db)]
    except sqlite3.Error:  # not created yet
        return []


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("sweep")
    config = root / "kill.yaml"
    config.write_text(yaml.safe_dump(KILL_SWEEP))
    killed_dir, clean_dir = root / "killed", root / "clean"
    db = killed_dir / "results.sqlite"
    # New session: the sweep and its spawned workers form one process group, killed together.
    proc = subprocess.Popen(
        sweep_cmd(config, "--out", str(killed_dir)),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        states = statuses(db)
        if "done" in states and "running" in states:
            break
        assert proc.poll() is None, f"sweep ended before it could be killed: {proc.stderr.read().decode()}"
        time.sleep(0.05)
    else:
        pytest.fail("the sweep never had a run done and another running")
    # Prefer a moment when a stage holds a mid-stage checkpoint, to exercise resuming from it.
    until = time.monotonic() + 8
    while time.monotonic() < until and not list(killed_dir.glob("*/*/checkpoint.pt")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = db_rows(db)
    assert any(r["status"] == "running" for r in before)  # really killed mid-sweep
    resumed = subprocess.run(
        sweep_cmd(config, "--out", str(killed_dir)), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    # The uninterrupted reference runs in this process: same code, same torch threads (1) per worker.
    threads = torch.get_num_threads()
    try:
        outcome = run_sweep(load_sweep(config, clean_dir), quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert outcome.counts["done"] == 6
    return config, killed_dir, clean_dir


def test_killed_sweep_resumes_complete_without_duplicates_and_same_numbers(killed_and_resumed):
    config, killed_dir, clean_dir = killed_and_resumed
    sweep = load_sweep(config, killed_dir)
    expected = sweep.run_ids()
    killed, clean = db_rows(killed_dir / "results.sqlite"), db_rows(clean_dir / "results.sqlite")
    assert len(expected) == 6  # 2 dense models + 4 pruned
    assert sorted(r["run_id"] for r in killed) == sorted(expected)  # every run exactly once
    assert {r["status"] for r in killed} == {"done"}
    for k, c in zip(killed, clean, strict=True):
        assert k["run_id"] == c["run_id"]
        assert {f: k[f] for f in COMPARED} == {f: c[f] for f in COMPARED}, k["run_id"]
    # Pretraining was shared: one pretrained model per unit, never one per criterion.
    units = {u.unit_id for u in sweep.units()}
    assert {p.name for p in (killed_dir / "pretrained").iterdir()} == units
    assert {p.name for p in (killed_dir / "runs").iterdir()} == set(expected) - units
    assert not list(killed_dir.glob("*/*/checkpoint.pt"))  # finished stages drop their checkpoint
    # Re-running a finished sweep does nothing (no worker even starts).
    again = CliRunner().invoke(app, ["sweep", str(config), "--out", str(killed_dir), "--quiet"])
    assert again.exit_code == 0 and "done 6/6" in again.stdout
    assert db_rows(killed_dir / "results.sqlite") == killed


def test_status_and_report_of_the_finished_sweep(killed_and_resumed):
    config, killed_dir, _ = killed_and_resumed
    state = sweep_status(load_sweep(config, killed_dir))
    assert state.counts == {"done": 6, "running": 0, "stale": 0, "failed": 0, "pending": 0}
    assert state.eta_s == 0
    status = CliRunner().invoke(app, ["status", str(config), "--out", str(killed_dir)])
    assert status.exit_code == 0 and "done 6" in status.stdout and "finished" in status.stdout
    report_dir = killed_dir / "report"
    report = CliRunner().invoke(app, ["report", str(config), "--out", str(killed_dir)])
    assert report.exit_code == 0, report.stdout
    assert "IoR vs Taylor on cross-domain accuracy" in report.stdout
    for name in ["table1-rotated_digits-mnist_cnn-erm", "wins"]:
        for ext in ("md", "csv", "tex"):
            assert (report_dir / f"{name}.{ext}").stat().st_size > 0
    assert (report_dir / "accuracy_vs_filters-rotated_digits-mnist_cnn-erm.png").stat().st_size > 10_000
    assert (report_dir / "layer_widths-rotated_digits-mnist_cnn-erm.png").stat().st_size > 10_000


def test_status_before_the_sweep_starts(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text(
        yaml.safe_dump({"base": TINY_BASE, "grid": {"target": "0", "prune.criterion": "taylor"}})
    )
    state = sweep_status(load_sweep(config))
    assert state.counts["pending"] == 2 and state.eta_s is None
    assert load_sweep(config).directory == tmp_path / "s-sweep"


def test_run_ids_of_existing_results_stay_valid():
    """Ids of the default config, recorded when the 5-seed preset ran: a new setting at its default
    (e.g. prune.round_to = 1) must not change them, or finished sweeps would be recomputed."""
    config = build_config(overrides={"target": "0"})
    assert (config.run_id(), config.pretrain_id()) == ("8e60a205d1e5", "76cbbb66dc02")
    assert build_config(overrides={"target": "0", "prune": {"round_to": 8}}).run_id() != config.run_id()
