"""Hostile input through the installed `dgprune` script: one `error:` line (or a warning) and the
documented exit status, never a traceback (issue 19, section 3; docs/experiments.md, "Limits")."""

from __future__ import annotations

import json
import resource
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from dgprune.errors import ConfigError
from dgprune.experiments.config import MAX_YAML_VALUES, load_yaml
from dgprune.experiments.records import ResultRecord
from dgprune.experiments.store import RunResult, Store, this_host
from dgprune.experiments.sweep import load_sweep
from dgprune.training.settings import MAX_COUNT, MAX_RATE, MAX_SEED

TINY = ["--set", "pretrain.steps=2", "--set", "pretrain.batch_size=8", "--set", "pretrain.eval_every=1"]
SWEEP = {
    "base": {
        "pretrain": {"steps": 2, "batch_size": 8},
        "prune": {"steps": 2, "interval": 1, "batch_size": 8},
        "device": "cpu",
    },
    "grid": {"target": "0", "prune.criterion": ["taylor", "ior"]},
}


def refused(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The command ended with ``code`` and one ``error:`` line holding ``needles``; no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in result.stderr, output
    return result.stderr


# -- learning rates beyond float32 (Adam's first step is 10 x lr; SGD's alpha is -lr) ----------------


def test_learning_rate_beyond_float32_is_refused_before_training(tmp_path):
    result = run_cli(
        "pretrain", "--out", "pre", "--target", "0", *TINY, "--set", "pretrain.lr=1e38", cwd=tmp_path
    )
    refused(result, 2, "pretrain.lr", f"{MAX_RATE:.0f}")
    assert not (tmp_path / "pre").exists()


def test_sgd_learning_rate_beyond_float32_is_refused(tmp_path):
    pretrained = run_cli("pretrain", "--out", "pre", "--target", "0", *TINY, "--device", "cpu", cwd=tmp_path)
    assert pretrained.returncode == 0, pretrained.stderr
    result = run_cli(
        "prune", "--pretrained", "pre", "--out", "p", "--target", "0", "--set", "prune.lr=1e39", cwd=tmp_path
    )
    refused(result, 2, "prune.lr")
    assert not (tmp_path / "p").exists()


# -- a YAML alias bomb ------------------------------------------------------------------------------


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """``levels`` levels of ``width`` aliases of the level below: width**levels values once expanded."""
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"target: *a{levels}"]) + "\n"


def test_alias_bomb_is_refused_before_expansion_in_little_memory():
    text = alias_bomb()
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="expand to more than"):
            load_yaml(text, "bomb.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # bytes: the composed graph only, not 9**9 values
    # A config with anchors and merge keys within the limit loads as before.
    assert load_yaml("a: &a {x: 1}\nb: {<<: *a, y: 2}\n", "ok.yaml") == {"a": {"x": 1}, "b": {"x": 1, "y": 2}}
    with pytest.raises(ConfigError, match="recursive alias"):
        load_yaml("target: &t [1, *t]\n", "rec.yaml")
    assert MAX_YAML_VALUES < 9**9


def _address_space_cap() -> None:
    # A regression would expand the bomb into gigabytes: fail with MemoryError, not swap the machine.
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def test_alias_bomb_config_is_one_short_error_line(tmp_path):
    (tmp_path / "bomb.yaml").write_text(alias_bomb())
    script = Path(sys.executable).parent / "dgprune"
    result = subprocess.run(
        [str(script), "pretrain", "--out", "pre", "--config", "bomb.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        preexec_fn=_address_space_cap,
    )
    stderr = refused(result, 2, "bomb.yaml", "alias")
    assert len(stderr) < 500  # the expanded value is not printed


def test_a_set_value_with_an_alias_bomb_is_refused(tmp_path):
    flow = "{" + alias_bomb().strip().replace("\n", ", ") + "}"  # one flow mapping: {a0: &a0 [...], ...}
    result = run_cli(
        "pretrain", "--out", "pre", "--target", "0", "--set", f"data.options={flow}", cwd=tmp_path
    )
    refused(result, 2, "--set", "alias")


# -- seeds beyond int64 -----------------------------------------------------------------------------

HUGE_SEED = "99999999999999999999"


@pytest.mark.parametrize(
    "how",
    [["--seed", HUGE_SEED], ["--set", f"seed={HUGE_SEED}"], ["--config", "seed.yaml"]],
    ids=["option", "set", "config-file"],
)
def test_seed_beyond_int64_is_refused(tmp_path, how):
    (tmp_path / "seed.yaml").write_text(f"seed: {HUGE_SEED}\n")
    result = run_cli("pretrain", "--out", "pre", "--target", "0", *how, cwd=tmp_path)
    refused(result, 2, "seed", str(MAX_SEED))


def test_algorithm_seed_must_be_a_seed_too(tmp_path):
    result = run_cli(
        "pretrain", "--out", "pre", "--target", "0", "--set", "pretrain.algorithm=mixup",
        "--set", "pretrain.hparams.seed=-1", cwd=tmp_path,
    )  # fmt: skip
    refused(result, 2, "pretrain.hparams.seed")


# -- step counts without bound ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [("steps.toml", "[pretrain]\nsteps = 1e26\n"), ("steps.yaml", f"prune: {{steps: {10**26}}}\n")],
)
def test_step_counts_are_bounded(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    result = run_cli("pretrain", "--out", "pre", "--target", "0", "--config", name, cwd=tmp_path)
    refused(result, 2, "steps", name)
    assert MAX_COUNT == 10**9


# -- damaged results databases ----------------------------------------------------------------------


def finished_sweep(tmp_path: Path, failed: str | None = None) -> tuple[Path, list[dict]]:
    """A sweep file and its database, every run recorded as done (numbers made up, no training);
    the run of criterion ``failed`` recorded as failed instead."""
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(SWEEP))
    sweep = load_sweep(str(config))
    specs = [spec for unit in sweep.units() for spec in unit.specs()]
    with Store(sweep.db_path) as store:
        store.register((unit.unit_id, unit.specs()) for unit in sweep.units())
        for spec in specs:
            labels = spec.labels
            if labels["criterion"] == failed:
                store.mark_failed(spec.run_id, "Traceback ...\nDivergenceError: prune diverged at step 2")
                continue
            dense = spec.kind == "dense"
            record = ResultRecord(
                **{key: labels[key] for key in ("dataset", "target_domain", "model", "algorithm", "seed")},
                criterion="none" if dense else labels["criterion"],
                keep_ratio=1.0 if dense else labels["keep_ratio"],
                intra_acc=0.9,
                cross_acc=0.6 if dense else 0.5,
                per_domain_acc={"0": 0.5, "15": 0.9},
                worst_source_acc=0.9,
                filters_total=10,
                filters_kept=10 if dense else 5,
                params=400 if dense else 100,
                macs=4000 if dense else 1000,
                params_dense=400,
                macs_dense=4000,
                run_id=spec.run_id,
                selected_step=2,
                model_dir=str(tmp_path / spec.run_id),
                wall_time_s=1.0,
                finetune_algorithm=None if dense else "erm",
            )
            store.record_done(spec.run_id, RunResult(record))
    return sweep.db_path, [{"run_id": s.run_id, "criterion": s.labels["criterion"]} for s in specs]


def damage(db: Path, run_id: str, column: str, value: object) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute(f"UPDATE runs SET {column} = ? WHERE run_id = ?", (value, run_id))
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize(("column", "value"), [("config", "{not json"), ("cross_acc", "abc")])
@pytest.mark.parametrize("command", ["status", "report", "sweep"])
def test_a_damaged_database_row_is_named(tmp_path, command, column, value):
    db, runs = finished_sweep(tmp_path)
    victim = next(r["run_id"] for r in runs if r["criterion"] == "ior")
    damage(db, victim, column, value)
    extra = ["--no-plots"] if command == "report" else []
    result = run_cli(command, "s.yaml", *extra, cwd=tmp_path)
    refused(result, 2, f"run {victim}", f"column {column}", repr(value))


def test_a_damaged_value_inside_a_json_column_is_named(tmp_path):
    db, runs = finished_sweep(tmp_path)
    victim = runs[-1]["run_id"]
    damage(db, victim, "per_domain_acc", json.dumps({"0": "x"}))
    refused(
        run_cli("report", "s.yaml", "--no-plots", cwd=tmp_path), 2, f"run {victim}", "per_domain_acc['0']"
    )


# -- status: dead workers; report: failed runs ------------------------------------------------------


def test_status_shows_a_run_of_a_dead_worker_as_stale(tmp_path):
    db, runs = finished_sweep(tmp_path)
    victim = next(r["run_id"] for r in runs if r["criterion"] == "taylor")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    conn = sqlite3.connect(db)
    try:
        unit = conn.execute("SELECT unit_id FROM runs WHERE run_id = ?", (victim,)).fetchone()[0]
        conn.execute(
            "UPDATE units SET status = 'running', worker = 'w0', host = ?, pid = ?, heartbeat = ?"
            " WHERE unit_id = ?",
            (this_host(), dead.pid, time.time(), unit),
        )
        conn.execute(
            "UPDATE runs SET status = 'running', started_at = ? WHERE run_id = ?", (time.time(), victim)
        )
        conn.commit()
    finally:
        conn.close()
    result = run_cli("status", "s.yaml", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert f"stale {victim}" in result.stdout and f"pid {dead.pid}) is dead" in result.stdout
    assert f"running {victim}" not in result.stdout and "running 0  stale 1" in result.stdout
    data = json.loads(run_cli("status", "s.yaml", "--json", cwd=tmp_path).stdout)
    assert data["counts"]["stale"] == 1 and data["counts"]["running"] == 0 and not data["finished"]
    assert [row["run_id"] for row in data["stale"]] == [victim]


def test_report_says_how_many_runs_failed_and_names_them(tmp_path):
    _, runs = finished_sweep(tmp_path, failed="ior")
    victim = next(r["run_id"] for r in runs if r["criterion"] == "ior")
    result = run_cli("report", "s.yaml", "--no-plots", "--format", "md", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "1 run(s) failed and are in no table" in result.stdout
    assert f"failed {victim}: " in result.stdout and "prune diverged at step 2" in result.stdout
    data = json.loads(run_cli("report", "s.yaml", "--no-plots", "--json", cwd=tmp_path).stdout)
    assert [row["run_id"] for row in data["failed"]] == [victim]


# -- a wrongly typed history.jsonl record -----------------------------------------------------------


def test_plot_skips_wrongly_typed_history_records_with_a_warning(tmp_path):
    model = tmp_path / "run"
    model.mkdir()
    good = [{"step": s, "loss": 1.0 / s, "val_acc": 0.5} for s in (1, 2, 3)]
    lines = [
        json.dumps(good[0]),
        json.dumps({"step": "x", "loss": [1]}),
        "not json",
        *map(json.dumps, good[1:]),
    ]
    (model / "history.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli("plot", "--model", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "skipped 2 bad line(s)" in warnings[0], result.stderr
    assert "line 2: step is 'x'" in warnings[0] and "line 3: not JSON" in warnings[0]
    assert (model / "curves.png").stat().st_size > 0
