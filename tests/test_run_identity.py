"""A directory's results and checkpoints are reused only by the run that wrote them (issue 10, point 1).

Through the installed console script: another run's results in --out are refused with one line that
names the differing settings, --overwrite replaces them, a leftover checkpoint of other settings is
refused rather than resumed, a truncated checkpoint and an unusable --out are one-line errors.
Library-level: the identity kept in checkpoints, results written before identities existed, and
sweep directories (named by run id) that still resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from dgprune.errors import ConfigError
from dgprune.experiments.config import build_config
from dgprune.experiments.pipeline import (
    make_context,
    pretrain_identity,
    prune_identity,
    run_pretrain,
    run_prune,
)
from dgprune.experiments.sweep import ListSink, execute_unit
from dgprune.training.checkpoint import CHECKPOINT_FILE, Checkpointer
from dgprune.training.pretrain import pretrain
from dgprune.training.prune_finetune import prune_and_finetune

TINY = {
    "target": "30",
    "device": "cpu",
    "pretrain": {"steps": 10, "batch_size": 8, "eval_every": 5},
    "prune": {"steps": 12, "batch_size": 8, "interval": 2, "eval_every": 4},
}


def config(**changes):
    overrides: dict = {}
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            overrides.setdefault(section, {})[key] = value
        else:
            overrides[section] = value
    return build_config(base=TINY, overrides=overrides)


def one_line_error(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A directory with tiny.yaml and a model pretrained from it by the CLI (pre/)."""
    root = tmp_path_factory.mktemp("identity")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    done = run_cli("pretrain", "--config", "tiny.yaml", "--out", "pre", "-q", cwd=root)
    assert done.returncode == 0, done.stderr
    return root


def test_prune_into_another_runs_directory_is_refused_and_overwrite_replaces_it(work):
    args = ("prune", "--config", "tiny.yaml", "--pretrained", "pre", "--out", "out", "-q")
    first = run_cli(*args, "--keep-ratio", "0.5", cwd=work)
    assert first.returncode == 0, first.stderr
    metrics = (work / "out" / "metrics.json").read_text()
    assert json.loads(metrics)["filters_kept"] == 224

    other = run_cli(*args, "--keep-ratio", "0.3", cwd=work)
    assert other.returncode == 2
    line = one_line_error(other)
    assert "out" in line and "prune.keep_ratio: 0.5 (stored) vs 0.3 (now)" in line
    assert "--overwrite" in line and "--out" in line
    assert (work / "out" / "metrics.json").read_text() == metrics  # the earlier run is untouched

    replaced = run_cli(*args, "--keep-ratio", "0.3", "--overwrite", cwd=work)
    assert replaced.returncode == 0, replaced.stderr
    record = json.loads((work / "out" / "metrics.json").read_text())
    assert record["keep_ratio"] == 0.3 and record["filters_kept"] == round(0.3 * 448)
    assert json.loads((work / "out" / "results.json").read_text()) == [record]


def test_pretrain_into_another_runs_directory_is_refused(work):
    before = (work / "pre" / "metrics.json").read_text()
    other = run_cli("pretrain", "--config", "tiny.yaml", "--out", "pre", "--seed", "1", "-q", cwd=work)
    assert other.returncode == 2
    line = one_line_error(other)
    assert "seed: 0 (stored) vs 1 (now)" in line and "--overwrite" in line
    assert (work / "pre" / "metrics.json").read_text() == before


def test_leftover_checkpoint_of_other_settings_is_refused_not_resumed(work, tmp_path):
    # A pretraining of 5 steps, stopped after its checkpoint at step 5 (as a kill would leave it).
    earlier = config(pretrain__steps=5)
    ctx = make_context(earlier)
    out = tmp_path / "leftover"
    pretrain(
        ctx.new_model(),
        ctx.split,
        earlier.pretrain,
        earlier.seed,
        ctx.device,
        checkpoint_dir=out,
        checkpoint_every=5,
        checkpoint_identity=pretrain_identity(earlier),
    )
    assert (out / CHECKPOINT_FILE).is_file()

    args = ("pretrain", "--config", str(work / "tiny.yaml"), "--out", str(out), "-q")
    other = run_cli(*args)
    assert other.returncode == 2
    line = one_line_error(other)
    assert CHECKPOINT_FILE in line and "pretrain.steps: 5 (stored) vs 10 (now)" in line
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()

    replaced = run_cli(*args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((out / "metrics.json").read_text())["run_id"] == config().pretrain_id()
    assert not (out / CHECKPOINT_FILE).exists()


def test_leftover_prune_checkpoint_of_another_keep_ratio_is_refused(work, tmp_path):
    # Today such a checkpoint was resumed with its own total_steps and died on an assertion.
    earlier = config(prune__keep_ratio=0.5)
    ctx = make_context(earlier)
    out = tmp_path / "pruned"
    prune_and_finetune(
        ctx.load_model_dir(work / "pre"),
        ctx.split,
        earlier.prune,
        earlier.seed,
        ctx.device,
        ctx.example_input,
        checkpoint_dir=out,
        checkpoint_every=4,
        checkpoint_identity=prune_identity(earlier, work / "pre"),
    )
    assert (out / CHECKPOINT_FILE).is_file()
    with pytest.raises(ConfigError, match=r"prune\.keep_ratio: 0\.5 \(stored\) vs 0\.3 \(now\)"):
        run_prune(make_context(config(prune__keep_ratio=0.3)), work / "pre", out)
    assert not (out / "metrics.json").exists()


def test_prune_from_another_pretrained_model_is_refused(work, tmp_path):
    cfg = config()
    run_prune(make_context(cfg), work / "pre", tmp_path / "out")
    other_pre = tmp_path / "pre-seed1"
    run_pretrain(make_context(config(seed=1, pretrain__steps=5)), other_pre)
    # refused before the output directory is looked at: the model was pretrained with other settings
    with pytest.raises(ConfigError, match=r"seed: 1 \(pretrained\) vs 0 \(this run\)"):
        run_prune(make_context(cfg), other_pre, tmp_path / "out")


def test_truncated_checkpoint_is_a_one_line_error(work, tmp_path):
    good = tmp_path / "good"
    Checkpointer(good, identity=pretrain_identity(config())).save({"step": 5, "model": {"w": torch.ones(50)}})
    data = (good / CHECKPOINT_FILE).read_bytes()
    out = tmp_path / "broken"
    out.mkdir()
    (out / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    result = run_cli("pretrain", "--config", str(work / "tiny.yaml"), "--out", str(out), "-q")
    assert result.returncode == 2
    line = one_line_error(result)
    assert str(out / CHECKPOINT_FILE) in line and "--overwrite" in line


def test_out_that_is_a_file_or_cannot_be_created_fails_before_training(work):
    (work / "a-file").write_text("not a directory")
    for out, why in (("a-file", "is a file"), ("a-file/sub", "not writable")):
        result = run_cli("pretrain", "--config", "tiny.yaml", "--out", out, cwd=work)  # progress on
        assert result.returncode == 2
        line = one_line_error(result)  # no progress line either: it stopped before training
        assert out in line and why in line
    assert (work / "a-file").read_text() == "not a directory"


def test_checkpoint_identity_rules(tmp_path):
    mine = pretrain_identity(config())
    theirs = pretrain_identity(config(pretrain__lr=0.01, seed=3))
    Checkpointer(tmp_path / "a", identity=theirs).save({"step": 50})
    with pytest.raises(ConfigError) as caught:
        Checkpointer(tmp_path / "a", identity=mine).load()
    message = str(caught.value)
    assert "pretrain.lr: 0.01 (stored) vs 0.001 (now)" in message and "seed: 3 (stored) vs 0 (now)" in message
    assert "\n" not in message
    # Only the ids decide: a result-neutral setting (the data's folder) may differ.
    moved = pretrain_identity(config(data={"options": {"root": "/elsewhere"}}))
    Checkpointer(tmp_path / "b", identity=moved).save({"step": 50})
    assert Checkpointer(tmp_path / "b", identity=mine).load()["step"] == 50
    # A checkpoint written before identities existed: only in a directory named by the run id.
    Checkpointer(tmp_path / "c").save({"step": 50})
    with pytest.raises(ConfigError, match="unknown settings"):
        Checkpointer(tmp_path / "c", identity=mine).load()
    sweep_dir = tmp_path / mine["run_id"]
    Checkpointer(sweep_dir).save({"step": 50})
    assert Checkpointer(sweep_dir, identity=mine).load()["step"] == 50


def test_results_written_before_identities_are_reused_only_by_the_same_run(work, tmp_path):
    legacy = tmp_path / "legacy"
    cfg = config(pretrain__steps=5)
    record = run_pretrain(make_context(cfg), legacy)
    (legacy / "run.json").unlink()  # as an earlier dgprune left it
    assert run_pretrain(make_context(cfg), legacy) == record
    with pytest.raises(ConfigError, match=r"older dgprune.*--overwrite"):
        run_pretrain(make_context(config(pretrain__steps=5, seed=2)), legacy)
    rerun = run_pretrain(make_context(config(pretrain__steps=5, seed=2)), legacy, overwrite=True)
    assert rerun.seed == 2 and json.loads((legacy / "run.json").read_text())["run_id"] == rerun.run_id


def test_sweep_unit_directories_still_resume(tmp_path):
    runs = [config(pretrain__steps=5, prune__keep_ratio=0.5)]
    first, second = ListSink(), ListSink()
    todo = {runs[0].pretrain_id(), runs[0].run_id()}
    execute_unit(runs[0], runs, todo, tmp_path, first)
    execute_unit(runs[0], runs, todo, tmp_path, second)  # everything reused from the run directories
    assert (tmp_path / "runs" / runs[0].run_id() / "run.json").is_file()
    for sink in (first, second):
        assert [e[0] for e in sink.events if e[0] != "started"] == ["done"] * 2, sink.events
    records = [[e[2].record for e in sink.events if e[0] == "done"] for sink in (first, second)]
    assert records[0] == records[1]
