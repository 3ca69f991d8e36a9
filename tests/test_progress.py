"""Progress, training curves and self-describing model directories, in-process (issue 11, points 1-2).

The command-line side (plain lines when not a terminal, --tensorboard, --json, plot, evaluate
without --target) is in test_cli_progress.py.
"""

from __future__ import annotations

import json
import math
import re
import sys
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console

from dgprune.cli.sweeps import SweepProgress
from dgprune.data import DomainBatches
from dgprune.errors import ConfigError
from dgprune.experiments.config import build_config
from dgprune.experiments.pipeline import CONFIG_FILE, make_context, model_dir_config, run_pretrain, run_prune
from dgprune.experiments.sweep import SweepStatus
from dgprune.report.curves import plot_model_dir
from dgprune.training.checkpoint import Checkpointer
from dgprune.training.history import HISTORY_FILE, read_history, require_tensorboard
from dgprune.training.pretrain import pretrain
from dgprune.training.progress import (
    LinePrinter,
    NoProgress,
    PlainProgress,
    ProgressEvent,
    RichProgress,
    progress_front_end,
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RESUMABLE = {
    "target": "30",
    "device": "cpu",
    "pretrain": {"steps": 14, "batch_size": 8, "eval_every": 5},
    "prune": {"steps": 14, "batch_size": 8, "interval": 2, "max_per_step": 60, "eval_every": 5},
}


def terminal() -> tuple[Console, StringIO]:
    buffer = StringIO()
    return Console(force_terminal=True, file=buffer, width=200), buffer


def plain(buffer: StringIO) -> str:
    return ANSI.sub("", buffer.getvalue())


# -- point 1: front ends -----------------------------------------------------------------------------


def test_the_front_end_is_chosen_by_the_output():
    assert isinstance(progress_front_end(quiet=True), NoProgress)
    assert progress_front_end(quiet=True).callback("x") is None
    assert isinstance(progress_front_end(console=Console(file=StringIO())), PlainProgress)
    assert isinstance(progress_front_end(console=terminal()[0]), RichProgress)


def test_plain_lines_at_the_first_step_every_25_steps_evaluations_and_the_last():
    stream = StringIO()
    printer = LinePrinter("[t] ", stream, every=25, every_s=math.inf)  # no time-based lines
    for step in range(1, 61):
        val = 0.5 if step in (20, 40) else None
        printer(ProgressEvent("prune", step, 60, 1.0, 100, 200, val, elapsed_s=0.5 * step))
    steps = [int(re.search(r"step (\d+)/60", line).group(1)) for line in stream.getvalue().splitlines()]
    assert steps == [1, 20, 25, 40, 50, 60]
    first = stream.getvalue().splitlines()[0]
    assert first == "[t] prune step 1/60 | loss 1.000 | filters 100/200 | ETA 30s"  # 0.5 s/step x 59
    # A resumed stage starts at step 31: its first step is shown, its ETA counts only its own steps.
    stream = StringIO()
    printer = LinePrinter("", stream, every=25, every_s=math.inf)
    printer(ProgressEvent("pretrain", 31, 60, 2.0, elapsed_s=1.0))
    assert stream.getvalue() == "pretrain step 31/60 | loss 2.000 | ETA 29s\n"


def test_rich_bars_show_a_real_stage_from_its_first_step(tmp_path):
    """The rich path on a (forced) terminal: a bar from step 1 with loss and ETA, then a summary line."""
    console, buffer = terminal()
    cfg = build_config(base={**RESUMABLE, "pretrain": {"steps": 6, "batch_size": 8, "eval_every": 3}})
    ctx = make_context(cfg)
    seen: list[int] = []
    with RichProgress(console) as front:
        callback = front.callback("[30 erm] ")

        def first_step_shown(event: ProgressEvent) -> None:
            callback(event)
            if event.step == 1:  # rendered at once, not at the next refresh
                seen.append(int("[30 erm] pretrain" in plain(buffer) and "1/6" in plain(buffer)))

        pretrain(ctx.new_model(), ctx.split, cfg.pretrain, cfg.seed, ctx.device, first_step_shown)
    text = plain(buffer)
    assert seen == [1]
    assert "loss " in text and "ETA " in text and "val " in text
    summary = [line for line in text.splitlines() if "pretrain done" in line]
    assert len(summary) == 1 and summary[0].startswith("[30 erm] pretrain done: 6 steps in ")
    assert "best val " in summary[0]


def test_rich_bars_show_filters_and_val_and_leave_one_line_per_stage():
    console, buffer = terminal()
    with RichProgress(console) as front:
        callback = front.callback("[0 erm taylor-keep0.5] ")
        for step in range(1, 11):
            val = {5: 0.25, 10: 0.5}.get(step)
            callback(ProgressEvent("prune", step, 10, 1.0 / step, 448 - 20 * step, 448, val, 0.1 * step))
    text = plain(buffer)
    assert "[0 erm taylor-keep0.5] prune" in text and "filters 428/448" in text  # step 1
    assert "val 25.0%" in text
    done = [line for line in text.splitlines() if "done:" in line]
    assert done == ["[0 erm taylor-keep0.5] prune done: 10 steps in 0:01 | loss 0.100 | filters 248/448 | "
                    "best val 50.0%"]


def test_the_sweep_bar_counts_runs_and_reports_failures():
    console, buffer = terminal()
    states = [
        SweepStatus({"done": 0, "running": 1, "stale": 0, "failed": 0, "pending": 2}, 3, [], [], None, 1),
        SweepStatus(
            {"done": 1, "running": 0, "stale": 0, "failed": 1, "pending": 1},
            3,
            [],
            [
                {
                    "run_id": "abc123",
                    "kind": "pruned",
                    "criterion": "ior",
                    "criterion_params": {},
                    "keep_ratio": 0.5,
                    "target_domain": "0",
                    "seed": 0,
                    "algorithm": "erm",
                    "finetune_algorithm": "erm",
                    "error": "Traceback...\nRuntimeError: boom",
                }
            ],
            60.0,
            1,
        ),
    ]
    calls = iter(states + [states[-1]] * 10)

    class Spec:
        name = "tiny"

    progress = SweepProgress(Spec(), console, every_s=3600, status=lambda spec: next(calls))  # type: ignore[arg-type]
    with progress:
        assert "0/3" in plain(buffer) and "ETA after the first run of each kind" in plain(buffer)
        progress.poll()
    text = plain(buffer)
    assert "2/3" in text and "done 1 | failed 1 | running 0 | ETA 60 s at 1 worker(s)" in text
    failed = [line for line in text.splitlines() if line.startswith("failed ")]
    assert failed == ["failed abc123: target 0 seed 0 erm ior keep 0.5: RuntimeError: boom"]  # once


# -- point 2: history.jsonl, config.yaml, TensorBoard --------------------------------------------------


def _interrupt_batches_after(monkeypatch, calls: int) -> None:
    original = DomainBatches.next
    count = {"n": 0}

    def next_batches(self):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(DomainBatches, "next", next_batches)


def _without_seconds(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_history(path)]


def test_history_of_an_interrupted_and_resumed_run_is_the_uninterrupted_one(tmp_path, monkeypatch):
    # A checkpoint every 5 steps (50 in the stages): 14 steps, interrupted in step 13, resume at 11.
    monkeypatch.setattr(Checkpointer, "due", lambda self, step: self.path is not None and step % 5 == 0)
    ctx = make_context(build_config(base=RESUMABLE))
    run_pretrain(ctx, tmp_path / "pre")
    run_prune(ctx, tmp_path / "pre", tmp_path / "pruned")
    for stage in ("pre", "pruned"):
        with monkeypatch.context() as patch:
            _interrupt_batches_after(patch, 12)  # after the checkpoint of step 10
            with pytest.raises(KeyboardInterrupt):
                if stage == "pre":
                    run_pretrain(ctx, tmp_path / "pre2")
                else:
                    run_prune(ctx, tmp_path / "pre", tmp_path / "pruned2")
        cut = read_history(tmp_path / f"{stage}2" / HISTORY_FILE)
        assert [r["step"] for r in cut] == list(range(1, 13))  # written up to the interruption
    run_pretrain(ctx, tmp_path / "pre2")
    run_prune(ctx, tmp_path / "pre", tmp_path / "pruned2")

    pre = _without_seconds(tmp_path / "pre" / HISTORY_FILE)
    pruned = _without_seconds(tmp_path / "pruned" / HISTORY_FILE)
    assert _without_seconds(tmp_path / "pre2" / HISTORY_FILE) == pre
    assert _without_seconds(tmp_path / "pruned2" / HISTORY_FILE) == pruned
    resumed = read_history(tmp_path / "pruned2" / HISTORY_FILE)
    seconds = [r["seconds"] for r in resumed]
    assert seconds == sorted(seconds)  # counted on from before the interruption

    # One record a step; val_acc exactly on the evaluated steps.
    assert [r["step"] for r in pre] == list(range(1, 15))
    assert [r["step"] for r in pre if "val_acc" in r] == [5, 10, 14]
    assert all("risks" not in r and "filters_alive" not in r for r in pre)  # ERM exposes no risks
    assert [r["step"] for r in pruned] == list(range(1, 15))
    metrics = json.loads((tmp_path / "pruned" / "metrics.json").read_text())
    domains = {"0", "15", "45", "60", "75"}  # the sources of target 30
    for record in pruned:
        assert set(record["risks"]) == domains
        # ERM fine-tuning trains on mean_i R_i: the loss is the mean of the recorded risks.
        assert record["loss"] == pytest.approx(sum(record["risks"].values()) / len(domains), abs=1e-5)
    alive = [r["filters_alive"] for r in pruned]
    assert alive == sorted(alive, reverse=True) and alive[-1] == metrics["filters_kept"]
    assert {r["filters_total"] for r in pruned} == {metrics["filters_total"]}
    scored = [r["step"] for r in pruned if "variance_share" in r]  # until the target is reached
    reached = next(r["step"] for r in pruned if r["filters_alive"] == metrics["filters_kept"])
    assert scored == list(range(1, reached + 1))
    best = max((r for r in pruned if "val_acc" in r), key=lambda r: r["val_acc"])
    assert best["step"] == metrics["selected_step"]


def test_model_directories_describe_their_run(tmp_path):
    tiny = {**RESUMABLE, "pretrain": {"steps": 4, "batch_size": 8, "eval_every": 2}}
    tiny["prune"] = {**RESUMABLE["prune"], "steps": 4, "keep_ratio": 0.9}
    cfg = build_config(base=tiny)
    ctx = make_context(cfg)
    dense = run_pretrain(ctx, tmp_path / "pre")
    pruned = run_prune(ctx, tmp_path / "pre", tmp_path / "pruned")
    # config.yaml is the run's config: loading it back gives the run's id (device left out).
    pre_config = build_config(tmp_path / "pre" / CONFIG_FILE)
    assert pre_config.pretrain_id() == dense.run_id
    assert build_config(tmp_path / "pruned" / CONFIG_FILE).run_id() == pruned.run_id
    text = (tmp_path / "pre" / CONFIG_FILE).read_text()
    assert "device" not in text and "prune:" not in text  # a pretrained model serves every pruning
    # evaluate/analyze take the directory's settings when no flag gives them (one shared function).
    cfg_back = model_dir_config(tmp_path / "pruned", None, {"device": "cpu"})
    assert (cfg_back.target, cfg_back.seed, cfg_back.data) == (cfg.target, cfg.seed, cfg.data)
    assert model_dir_config(tmp_path / "pruned", None, {"target": "0"}).target == "0"  # flags win
    (tmp_path / "pruned" / "run.json").unlink()  # a running stage: config.yaml only
    assert model_dir_config(tmp_path / "pruned").target == "30"
    # The curves as a picture.
    png = plot_model_dir(tmp_path / "pruned")
    assert png == tmp_path / "pruned" / "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "pre" / HISTORY_FILE).unlink()
    with pytest.raises(ConfigError, match="no training curves"):
        plot_model_dir(tmp_path / "pre")


def test_missing_tensorboard_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when absent
    with pytest.raises(ConfigError) as caught:
        require_tensorboard()
    message = str(caught.value)
    assert "\n" not in message and "pip install 'dgprune[tensorboard]'" in message


def test_progress_consumes_no_random_numbers(tmp_path):
    """History and progress must not change a run: same weights with and without a callback."""
    cfg = build_config(base={**RESUMABLE, "pretrain": {"steps": 5, "batch_size": 8, "eval_every": 5}})
    ctx = make_context(cfg)
    states = []
    for callback in (None, RichProgress(terminal()[0]).callback("x")):
        model = ctx.new_model()
        pretrain(model, ctx.split, cfg.pretrain, cfg.seed, ctx.device, callback)
        states.append(model.state_dict())
        states.append(torch.rand(1))  # the RNG after the run
    assert all(torch.equal(states[0][k], states[2][k]) for k in states[0])
    assert torch.equal(states[1], states[3])
