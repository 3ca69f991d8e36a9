"""The installed `dgprune` (subprocess, output not a terminal): plain progress lines from the first
step, self-describing model directories, --tensorboard, evaluate without --target, plot, and
status/report --json (issue 11, points 1-2). The terminal side is in test_progress.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from dgprune.experiments.config import build_config
from dgprune.training.history import read_history

TINY = {
    "device": "cpu",
    "pretrain": {"steps": 12, "batch_size": 8, "eval_every": 5},
    "prune": {"steps": 10, "batch_size": 8, "interval": 2, "max_per_step": 100, "eval_every": 3},
}


def ok(result) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def progress_steps(stderr: str, stage: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(rf"{stage} step (\d+)/\d+", stderr)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A pretrained (with TensorBoard) and a pruned model (quiet) of target 0."""
    root = tmp_path_factory.mktemp("cli_progress")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    result = run_cli(
        "pretrain", "--config", "tiny.yaml", "--target", "0", "--out", "pre", "--tensorboard", "tb", cwd=root
    )
    ok(result)
    (root / "pretrain.stderr").write_text(result.stderr)
    result = run_cli(
        "prune", "--config", "tiny.yaml", "--target", "0", "--pretrained", "pre", "--out", "pruned",
        "--keep-ratio", "0.5", "--quiet", cwd=root,
    )  # fmt: skip
    ok(result)
    (root / "prune.stderr").write_text(result.stderr)
    return root


def test_plain_progress_lines_from_the_first_step_when_not_a_terminal(work):
    stderr = (work / "pretrain.stderr").read_text()
    steps = progress_steps(stderr, "pretrain")
    assert steps[0] == 1  # not silent until step 25
    assert {5, 10, 12} <= set(steps)  # the evaluations and the last step
    assert "\x1b[" not in stderr  # no terminal control codes in a log
    line = next(line for line in stderr.splitlines() if "pretrain step 5/12" in line)
    assert re.fullmatch(r"pretrain step 5/12 \| loss \d+\.\d{3} \| val \d+\.\d% \| ETA \d+s", line), line
    assert (work / "prune.stderr").read_text() == ""  # --quiet


def test_model_directories_hold_their_config_and_curves(work):
    for name, stage_id in (("pre", "pretrain_id"), ("pruned", "run_id")):
        directory = work / name
        metrics = json.loads((directory / "metrics.json").read_text())
        assert getattr(build_config(directory / "config.yaml"), stage_id)() == metrics["run_id"]
        history = read_history(directory / "history.jsonl")
        assert [r["step"] for r in history] == list(range(1, len(history) + 1))
        assert len(history) == (12 if name == "pre" else 10)
    pruned = read_history(work / "pruned" / "history.jsonl")
    assert set(pruned[0]["risks"]) == {"15", "30", "45", "60", "75"}
    assert pruned[-1]["filters_alive"] == json.loads((work / "pruned" / "metrics.json").read_text())[
        "filters_kept"
    ]


def test_tensorboard_logs_the_history(work):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    runs = list((work / "tb").iterdir())
    assert [run.name for run in runs] == ["pre"]  # one run, named after --out
    events = event_accumulator.EventAccumulator(str(runs[0]))
    events.Reload()
    history = read_history(work / "pre" / "history.jsonl")
    losses = [(e.step, e.value) for e in events.Scalars("pretrain/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in history]
    vals = [(e.step, e.value) for e in events.Scalars("pretrain/val_acc")]
    assert vals == [(r["step"], pytest.approx(r["val_acc"], rel=1e-6)) for r in history if "val_acc" in r]


def test_evaluate_takes_the_target_from_the_model_directory(work):
    result = run_cli("evaluate", "--model", "pruned", "--device", "cpu", cwd=work)
    ok(result)
    report = json.loads(result.stdout)
    metrics = json.loads((work / "pruned" / "metrics.json").read_text())
    assert report["target_domain"] == "0"
    assert report["intra_acc"] == metrics["intra_acc"] and report["cross_acc"] == metrics["cross_acc"]


def test_plot_draws_the_curves(work):
    result = run_cli("plot", "--model", "pruned", "--out", "curves.png", cwd=work)
    ok(result)
    assert (work / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert result.stdout.strip() == "wrote curves.png"


def test_demo_shows_every_stage_from_its_first_step_and_logs_each_model(tmp_path):
    (tmp_path / "small.yaml").write_text(
        yaml.safe_dump({"pretrain": {"batch_size": 8}, "prune": {"batch_size": 8, "interval": 1}})
    )
    result = run_cli(
        "demo", "--out", "d", "--targets", "0", "--pretrain-steps", "4", "--prune-steps", "4",
        "--device", "cpu", "--config", "small.yaml", "--tensorboard", "tb", cwd=tmp_path,
    )  # fmt: skip
    ok(result)
    # The demo's directory is a sweep directory: each model's is named by its run id in results.json.
    records = json.loads((tmp_path / "d" / "results.json").read_text())
    model_dirs = {f"{r['criterion']}-keep{r['keep_ratio']:g}": tmp_path / r["model_dir"] for r in records}
    for label in ("taylor-keep0.5", "ior-keep0.5", "taylor-keep0.3", "ior-keep0.3"):
        steps = [int(s) for s in re.findall(rf"\[0 erm {label}\] prune step (\d+)/", result.stderr)]
        assert steps and steps[0] == 1, label
        model_dir = model_dirs[label]
        assert model_dir.parent == tmp_path / "d" / "runs"
        assert (model_dir / "config.yaml").is_file() and (model_dir / "history.jsonl").is_file()
        assert any((tmp_path / "tb" / "target-0" / "erm" / label).iterdir())  # TensorBoard run per model
    assert progress_steps(result.stderr, r"\[0 erm\] pretrain")[0] == 1


def test_status_and_report_as_json(tmp_path):
    sweep = {
        "base": {**TINY, "pretrain": {"steps": 4, "batch_size": 8, "eval_every": 2}},
        "grid": {"target": "0", "prune.criterion": ["taylor", "ior"], "prune.steps": 4},
        "sweep": {"workers": 1},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    result = run_cli("status", "s.yaml", "--json", cwd=tmp_path)
    ok(result)
    before = json.loads(result.stdout)
    assert before["counts"] == {"done": 0, "running": 0, "stale": 0, "failed": 0, "pending": 3}
    assert before["total"] == 3 and before["finished"] is False and before["eta_s"] is None
    ok(sweep_run := run_cli("sweep", "s.yaml", cwd=tmp_path))
    assert sweep_run.stdout.count("done ") >= 3  # not a terminal: a line per finished run
    status = json.loads(run_cli("status", "s.yaml", "--json", cwd=tmp_path).stdout)
    assert status["counts"]["done"] == 3 and status["finished"] is True and status["failed"] == []

    result = run_cli("report", "s.yaml", "--json", "--no-plots", "--format", "md", cwd=tmp_path)
    ok(result)
    report = json.loads(result.stdout)
    table1 = report["sections"][0]
    assert table1["header"][0] == "Model" and len(table1["rows"]) == 3  # dense, Taylor, IoR
    assert all(len(row) == len(table1["header"]) for row in table1["rows"])
    assert all(Path(tmp_path / f).is_file() or Path(f).is_file() for f in report["files"])
    assert report["wins"]["summary"].startswith("IoR vs Taylor on cross-domain accuracy")
    (paired,) = report["paired"]
    assert (paired["challenger"], paired["baseline"], paired["n"]) == ("ior", "taylor", 1)
    # The difference is IoR's cross accuracy minus Taylor's, in points, as the database has them.
    rows = {r["criterion"]: r for r in _records(tmp_path)}
    expected = 100 * (rows["ior"]["cross_acc"] - rows["taylor"]["cross_acc"])
    assert paired["mean_difference_points"] == pytest.approx(expected)


def _records(sweep_dir: Path) -> list[dict]:
    from dgprune.experiments.store import Store

    with Store(sweep_dir / "s-sweep" / "results.sqlite") as store:
        return store.rows("done")
