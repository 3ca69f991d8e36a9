"""Divergence is stopped, not saved (issue 10, point 2).

The first non-finite loss, risk, score or weight stops the stage with DivergenceError (exit code 1
on the command line, one line naming stage and step); no model, metrics or checkpoint is written
after it, the last good checkpoint stays, a sweep records the run as failed with that message, and
results JSON never holds NaN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from dgprune.errors import DgpruneError, DivergenceError, RunFailedError
from dgprune.experiments.config import build_config
from dgprune.experiments.pipeline import make_context, run_pretrain
from dgprune.experiments.records import write_json_atomic
from dgprune.experiments.sweep import ListSink, execute_unit
from dgprune.training import prune_finetune as prune_module
from dgprune.training.checkpoint import CHECKPOINT_FILE
from dgprune.training.pretrain import pretrain
from dgprune.training.prune_finetune import prune_and_finetune

TINY = {
    "target": "30",
    "device": "cpu",
    "pretrain": {"steps": 10, "batch_size": 8, "eval_every": 5},
    "prune": {"steps": 12, "batch_size": 8, "interval": 2, "eval_every": 4},
}
SAVED_FILES = ("model.safetensors", "structure.json", "metrics.json", "results.json")


def tiny(**sections) -> dict:
    return {
        key: {**value, **sections.get(key, {})} if isinstance(value, dict) else value
        for key, value in TINY.items()
    }


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("div") / "pre"
    run_pretrain(make_context(build_config(base=TINY)), out)
    return out


def one_line_error(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_error_kinds_carry_their_exit_codes():
    assert DgpruneError.exit_code == 2 and RunFailedError.exit_code == 1
    assert issubclass(DivergenceError, RunFailedError) and DivergenceError("x").exit_code == 1


def test_cli_pretrain_divergence_exits_1_and_saves_nothing(tmp_path):
    # A learning rate large enough to overflow is refused by the settings' limits (test_hostile_input);
    # GroupDRO's exponentiated weights overflow at once with a huge step size.
    diverging = {"algorithm": "groupdro", "hparams": {"groupdro_eta": 1e30}}
    (tmp_path / "div.yaml").write_text(yaml.safe_dump(tiny(pretrain=diverging)))
    result = run_cli("pretrain", "--config", "div.yaml", "--out", "out", "-q", cwd=tmp_path)
    assert result.returncode == 1
    line = one_line_error(result)
    assert (
        line.startswith("error: pretrain diverged at step ") and "loss is nan" in line and "lr 0.001" in line
    )
    assert not any((tmp_path / "out" / name).exists() for name in SAVED_FILES)


def test_cli_prune_divergence_exits_1_and_saves_nothing(tmp_path, pretrained):
    (tmp_path / "div.yaml").write_text(yaml.safe_dump(tiny(prune={"lr": 1000})))
    result = run_cli(
        "prune", "--config", "div.yaml", "--pretrained", str(pretrained), "--out", "out", "-q", cwd=tmp_path
    )
    assert result.returncode == 1
    line = one_line_error(result)
    assert line.startswith("error: prune diverged at step ") and "lr 1000" in line
    assert not any((tmp_path / "out" / name).exists() for name in SAVED_FILES)


def poison_at(model: torch.nn.Module, at_step: int):
    """A progress callback that turns one weight to NaN after step ``at_step`` (deterministic)."""

    def progress(event) -> None:
        if event.step == at_step:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")

    return progress


def assert_finite_checkpoint(directory: Path, step: int) -> None:
    state = torch.load(directory / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == step
    for name, tensor in state["model"].items():
        assert torch.isfinite(tensor).all(), name


def test_pretraining_stops_at_the_first_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = build_config(base=tiny(pretrain={"eval_every": 2}))
    ctx = make_context(cfg)
    model = ctx.new_model()
    with pytest.raises(DivergenceError) as caught:
        pretrain(
            model,
            ctx.split,
            cfg.pretrain,
            cfg.seed,
            ctx.device,
            poison_at(model, 4),  # weights NaN after step 4: step 5's loss is NaN
            checkpoint_dir=tmp_path,
            checkpoint_every=3,
        )
    message = str(caught.value)
    assert message.startswith("pretrain diverged at step 5: loss is nan")
    assert f"last good checkpoint (step 3) kept in {tmp_path / CHECKPOINT_FILE}" in message
    assert_finite_checkpoint(tmp_path, 3)  # not step 6: nothing is saved after the NaN


def test_nan_weights_at_a_checkpoint_are_divergence_not_saved(tmp_path):
    cfg = build_config(base=tiny(pretrain={"eval_every": 3}))
    ctx = make_context(cfg)
    model = ctx.new_model()
    with pytest.raises(DivergenceError, match=r"pretrain diverged at step 6: the weights are not finite"):
        pretrain(model, ctx.split, cfg.pretrain, cfg.seed, ctx.device, poison_at(model, 6), tmp_path, 3)
    assert_finite_checkpoint(tmp_path, 3)


def test_pruning_stops_at_the_first_nan_and_keeps_the_last_good_checkpoint(tmp_path, pretrained):
    cfg = build_config(base=TINY)
    ctx = make_context(cfg)
    model = ctx.load_model_dir(pretrained)
    with pytest.raises(DivergenceError) as caught:
        prune_and_finetune(
            model,
            ctx.split,
            cfg.prune,
            cfg.seed,
            ctx.device,
            ctx.example_input,
            poison_at(model, 4),
            log_every=1,
            checkpoint_dir=tmp_path,
            checkpoint_every=3,
        )
    assert str(caught.value).startswith("prune diverged at step 5: loss is nan")
    assert_finite_checkpoint(tmp_path, 3)


class NanScores:
    """A criterion whose scores turn NaN from the second call on: the pruning must stop there."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def score(self, inputs) -> torch.Tensor:
        self.calls += 1
        scores = self.inner.score(inputs)
        return scores if self.calls == 1 else torch.full_like(scores, float("nan"))


def test_nan_scores_stop_pruning_instead_of_ranking_by_position(monkeypatch, pretrained):
    real = prune_module.make_criterion
    monkeypatch.setattr(prune_module, "make_criterion", lambda *a, **k: NanScores(real(*a, **k)))
    cfg = build_config(base=TINY)
    ctx = make_context(cfg)
    with pytest.raises(DivergenceError, match=r"prune diverged at step 2: \d+ of \d+ pruning scores are not"):
        prune_and_finetune(
            ctx.load_model_dir(pretrained), ctx.split, cfg.prune, cfg.seed, ctx.device, ctx.example_input
        )


def test_a_sweep_records_the_diverged_run_as_failed_with_the_message(tmp_path):
    diverging = build_config(base=tiny(prune={"lr": 1000}))
    sink = ListSink()
    execute_unit(diverging, [diverging], {diverging.pretrain_id(), diverging.run_id()}, tmp_path, sink)
    outcome = {run_id: (event, payload) for event, run_id, payload in sink.events if event != "started"}
    assert outcome[diverging.pretrain_id()][0] == "done"
    event, error = outcome[diverging.run_id()]
    assert event == "failed" and "prune diverged at step " in error
    assert not (tmp_path / "runs" / diverging.run_id() / "model.safetensors").exists()


def test_results_json_is_never_written_with_nan(tmp_path):
    path = tmp_path / "results.json"
    with pytest.raises(ValueError):
        write_json_atomic(path, [{"intra_acc": math.nan}])
    assert not path.exists()
    write_json_atomic(path, [{"intra_acc": 0.5}])
    assert json.loads(path.read_text()) == [{"intra_acc": 0.5}]
