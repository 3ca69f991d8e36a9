"""`dgprune prune --pretrained DIR` describes the model it prunes (issue 19.1-2): the pretrained run's data,
target, seed, model and pretraining come from DIR, a contradicting flag is one error naming both values,
every file of the pruned run records what ran, and a budget that cannot be met is said, not hidden."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from test_image_folder import make_tree

TINY_PRUNE = ["--keep-ratio", "0.5", "--steps", "8", "--set", "prune.interval=2"]
TINY_PRUNE += ["--set", "prune.batch_size=8", "--set", "prune.eval_every=4", "--device", "cpu", "-q"]


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def _one_error(result, code: int = 2) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def coral_dir(tmp_path_factory) -> Path:
    """A CORAL model pretrained on target 30 with 12 steps (neither is a default)."""
    out = tmp_path_factory.mktemp("coral") / "pre"
    result = run_cli(
        "pretrain", "--out", str(out), "--target", "30", "--algorithm", "coral", "--steps", "12",
        "--set", "pretrain.batch_size=8", "--set", "pretrain.eval_every=6", "--device", "cpu", "-q",
    )  # fmt: skip
    _ok(result)
    return out


def test_prune_takes_the_pretrained_settings_and_every_file_says_so(coral_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    _ok(run_cli("prune", "--pretrained", str(coral_dir), "--out", str(out), "--criterion", "taylor",
                *TINY_PRUNE))  # fmt: skip
    pre_config = json.loads((coral_dir / "run.json").read_text())["config"]
    run = json.loads((out / "run.json").read_text())["config"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    (result,) = json.loads((out / "results.json").read_text())
    for settings in (run, config):
        assert settings["target"] == "30"
        assert settings["pretrain"] == pre_config["pretrain"]
        assert settings["pretrain"]["algorithm"] == "coral" and settings["pretrain"]["steps"] == 12
        assert settings["data"] == pre_config["data"] and settings["model"] == pre_config["model"]
        assert settings["prune"]["criterion"] == "taylor"
    for record in (metrics, result):
        assert record["algorithm"] == "coral"
        assert record["target_domain"] == "30"
        assert record["steps_run"] == 8
    # the pruned model's pretrain id is the pretrained model's run id: the same model, by the ids too
    pre_id = json.loads((coral_dir / "metrics.json").read_text())["run_id"]
    assert json.loads((out / "run.json").read_text())["pretrained"] == pre_id


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--target", "0"], "target: 30 (pretrained) vs 0 (this run)"),
        (["--seed", "3"], "seed: 0 (pretrained) vs 3 (this run)"),
        (["--data", "styled_digits"], "data.name: rotated_digits (pretrained) vs styled_digits (this run)"),
        (["--set", "pretrain.steps=5000"], "pretrain.steps: 12 (pretrained) vs 5000 (this run)"),
        (["--set", "model.name=resnet18"], "model.name: mnist_cnn (pretrained) vs resnet18 (this run)"),
    ],
)
def test_a_contradicting_setting_is_one_error_naming_both_values(
    coral_dir: Path, tmp_path: Path, flags: list[str], named: str
) -> None:
    out = tmp_path / "pruned"
    pruned = run_cli("prune", "--pretrained", str(coral_dir), "--out", str(out), *flags, *TINY_PRUNE)
    line = _one_error(pruned)
    assert named in line and str(coral_dir) in line
    assert not out.exists()  # refused before anything was written


def test_a_contradicting_config_file_is_refused(coral_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("target: '30'\npretrain: {algorithm: erm}\n")
    line = _one_error(
        run_cli("prune", "--pretrained", str(coral_dir), "--out", str(tmp_path / "p"),
                "--config", str(config), *TINY_PRUNE)
    )  # fmt: skip
    assert "pretrain.algorithm: coral (pretrained) vs erm (this run)" in line


def test_the_library_refuses_a_mismatch_too(coral_dir: Path, tmp_path: Path) -> None:
    from dgprune.errors import ConfigError
    from dgprune.experiments.config import build_config
    from dgprune.experiments.pipeline import make_context, run_prune

    config = build_config(overrides={"target": "0", "device": "cpu"})
    with pytest.raises(ConfigError, match=r"target: 30 \(pretrained\) vs 0 \(this run\)"):
        run_prune(make_context(config), coral_dir, tmp_path / "p")


def test_folder_resnet_is_pruned_at_its_image_size_and_recorded_as_itself(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data", domains=("a", "b", "c"), classes=("x", "y"), per_class=3)
    data = ["--data", f"folder:{root}", "--set", f"data.options.cache_dir={tmp_path / 'cache'}"]
    pre = tmp_path / "pre"
    _ok(
        run_cli("pretrain", "--out", str(pre), "--target", "c", "--model", "resnet18", "--image-size", "24",
                "--set", "model.small_input=true", "--steps", "2", "--set", "pretrain.batch_size=4",
                "--set", "pretrain.eval_every=2", *data, "--device", "cpu", "-q")
    )  # fmt: skip
    out = tmp_path / "pruned"
    result = run_cli(
        "prune", "--pretrained", str(pre), "--out", str(out), "--criterion", "taylor", "--keep-ratio", "0.9",
        "--steps", "2", "--set", "prune.interval=1", "--set", "prune.max_per_step=1000",
        "--set", "prune.batch_size=4", "--set", f"data.options.cache_dir={tmp_path / 'cache2'}",
        "--device", "cpu", "-q",
    )  # fmt: skip
    _ok(result)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == {"name": "resnet18", "small_input": True, "weights": None}
    assert config["data"]["options"]["image_size"] == 24 and config["data"]["name"] == f"folder:{root}"
    assert config["target"] == "c"
    assert json.loads((out / "metrics.json").read_text())["model"] == "resnet18"
    line = _one_error(
        run_cli("prune", "--pretrained", str(pre), "--out", str(tmp_path / "p2"), "--image-size", "64",
                *TINY_PRUNE)
    )  # fmt: skip
    assert "data.options.image_size: 24 (pretrained) vs 64 (this run)" in line


def test_too_few_steps_are_extended_with_a_line_and_recorded(coral_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = run_cli(
        "prune", "--pretrained", str(coral_dir), "--out", str(out), "--criterion", "taylor",
        "--keep-ratio", "0.5", "--steps", "3", "--set", "prune.interval=2", "--set", "prune.max_per_step=50",
        "--set", "prune.batch_size=8", "--device", "cpu", "-q",
    )  # fmt: skip
    _ok(result)
    # 448 filters to 224 at most 50 per pruning step: 5 pruning steps, every 2 steps, then one at the target
    assert "warning: prune.steps 3 cannot reach 224 of 448 filters" in result.stderr
    assert "running 11 steps" in result.stderr
    assert json.loads((out / "metrics.json").read_text())["steps_run"] == 11
    text = (out / "config.yaml").read_text()
    assert text.startswith("# prune.steps 3 was too few to reach the target filters: 11 steps ran")
    assert yaml.safe_load(text)["prune"]["steps"] == 3  # the file stays this run's --config (same run id)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert max(h["step"] for h in history if "step" in h) == 11


def test_a_round_to_that_cannot_reach_the_target_is_refused(coral_dir: Path, tmp_path: Path) -> None:
    line = _one_error(
        run_cli("prune", "--pretrained", str(coral_dir), "--out", str(tmp_path / "p"), "--round-to", "1000",
                *TINY_PRUNE)
    )  # fmt: skip
    assert "prune.round_to 1000" in line and "at least 448 of 448 filters remain" in line
    assert "use prune.round_to 56 or less" in line
    assert not (tmp_path / "p" / "metrics.json").exists()
