"""Learned channel masks (criterion ``learned_masks``): the hard-concrete relaxation against sampling,
frozen weights, exactly the target number of channels by the top logits (MNIST_CNN, ResNet-18, with
and without round_to), resume after an interruption (in the library and by SIGINT through the console
script), a tiny sweep, ``dgprune analyze`` and parameter validation."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from dgprune.data import DomainBatches, load_dataset, make_lodo_split
from dgprune.errors import ConfigError
from dgprune.experiments.config import build_config
from dgprune.models import build_model
from dgprune.pruning import GateSet, find_channel_groups
from dgprune.pruning import learned_masks as lm
from dgprune.pruning.criteria import LearnerContext, make_criterion
from dgprune.pruning.schedule import PruningSchedule, target_channels
from dgprune.training import PruneSettings, prune_and_finetune

CPU = torch.device("cpu")
SCRIPT = Path(sys.executable).parent / "dgprune"
# One thread per process: two cores shared by several runs, where more threads only contend.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _split():
    return make_lodo_split(load_dataset("rotated_digits"), target="45", seed=1)


def _settings(**changes) -> PruneSettings:
    values = {
        "criterion": "learned_masks",
        "criterion_params": {"mask_steps": 6},
        "keep_ratio": 0.5,
        "steps": 3,
        "batch_size": 4,
        "eval_every": 2,
        **changes,
    }
    return PruneSettings(**values)


class _Spy:
    """Records the logits the pruning step ranked by (MaskLearner.scores at the end of mask training)."""

    def __init__(self, monkeypatch) -> None:
        self.logits: list[torch.Tensor] = []
        original = lm.MaskLearner.scores

        def scores(learner):
            values = original(learner)
            self.logits.append(values.clone())
            return values

        monkeypatch.setattr(lm.MaskLearner, "scores", scores)


# ---- the relaxation ------------------------------------------------------------------------------


def test_keep_probability_is_the_frequency_of_nonzero_samples():
    """P(z != 0) in closed form against 200,000 hard-concrete draws per logit."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([-3.0, -1.0, 0.0, 1.5, 3.0], dtype=torch.float64)
    for beta in (2 / 3, 0.3):
        u = torch.rand(200_000, len(logits), generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        z = lm.hard_concrete(logits.expand_as(u), u, beta)
        assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
        frequency = (z > 0).double().mean(dim=0)
        expected = 1 / (1 + torch.exp(-(logits - beta * math.log(0.1 / 1.1))))  # sigmoid, spelt out
        torch.testing.assert_close(lm.keep_probability(logits, beta), expected)
        torch.testing.assert_close(frequency, expected, atol=4e-3, rtol=0)
    # at the starting logit the mask is the dense model: every draw near 1, P(z != 0) = 0.99
    assert float(lm.keep_probability(torch.tensor(lm.INIT_LOGIT), 2 / 3)) == pytest.approx(0.99, abs=5e-3)


@pytest.mark.parametrize("name", ["mnist_cnn", "resnet18"])
def test_mask_training_trains_only_the_logits(name):
    """Weights, BatchNorm statistics and parameter gradients are untouched; the expected kept share
    moves towards keep_ratio."""
    torch.manual_seed(0)
    model = build_model(name, 4, 1, small_input=True)
    gates = GateSet(model, find_channel_groups(model, torch.zeros(1, 1, 8, 8))).attach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = make_criterion("learned_masks", {"mask_steps": 3, "mask_lr": 0.5}).learner(
        LearnerContext(model, gates, 0.3, "per_domain", 0)
    )
    batches = [(torch.rand(3, 1, 8, 8), torch.randint(0, 4, (3,))) for _ in range(2)]
    shares = [learner.step(batches)["expected_keep"] for _ in range(learner.steps)]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert shares[-1] < shares[0]
    assert not torch.equal(learner.scores(), torch.full_like(learner.scores(), lm.INIT_LOGIT))


# ---- exactly the target, by the top logits ------------------------------------------------------


@pytest.mark.parametrize(("name", "keep"), [("mnist_cnn", 0.3), ("resnet18", 0.5)])
def test_learned_masks_end_at_exactly_the_target_by_the_top_logits(monkeypatch, name, keep):
    spy = _Spy(monkeypatch)
    model = build_model(name, 10, 1, small_input=True)
    settings = _settings(keep_ratio=keep, steps=1, batch_size=2 if name == "resnet18" else 4)
    outcome = prune_and_finetune(model, _split(), settings, 0, CPU, torch.zeros(1, 1, 8, 8))
    target = target_channels(outcome.filters_total, keep, len(outcome.gates.sizes))
    assert outcome.filters_kept == target == round(keep * outcome.filters_total)
    [logits] = spy.logits
    alive = outcome.gates.flat_alive()
    assert float(logits[alive].min()) >= float(logits[~alive].max())  # the kept are the top logits
    # equal logits (a few Adam steps move many alike) go by position, as the schedule breaks ties
    top = set(torch.argsort(-logits, stable=True)[:target].tolist())
    assert set(torch.nonzero(alive).flatten().tolist()) == top
    assert outcome.steps_run == 6 + 1 and outcome.best_step == 7  # mask steps, then fine-tuning


@pytest.mark.parametrize("round_mode", ["budget", "per_layer"])
def test_round_to_applies_to_the_one_pruning_step(round_mode):
    """With round_to 8 every group keeps a multiple of 8 of its highest logits; the budget rule's total
    is the multiple of 8 nearest the target; the same channels as the iterative schedule's last step."""
    model = build_model("resnet18", 10, 1, small_input=True)
    sizes = GateSet(model, find_channel_groups(model, torch.zeros(1, 1, 8, 8))).sizes
    logits = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(1))
    once = PruningSchedule(sizes, 0.3, interval=30, max_per_step=100, round_to=8, round_mode=round_mode)
    pruned = once.prune_at_once(logits)
    alive = torch.ones(sum(sizes), dtype=torch.bool)
    alive[pruned] = False
    kept = 0
    for part, scores in zip(alive.split(sizes), logits.split(sizes), strict=True):
        width = int(part.sum())
        assert width % 8 == 0 and width >= 8
        assert set(torch.nonzero(part).flatten().tolist()) == set(
            torch.argsort(scores, descending=True)[:width].tolist()
        )
        kept += width
    if round_mode == "budget":
        assert kept == 8 * round(once.target / 8)
    # the iterative schedule with no cap per step, fed the same scores for one interval, agrees
    reference = PruningSchedule(
        sizes, 0.3, interval=1, max_per_step=sum(sizes), round_to=8, round_mode=round_mode
    )
    reference.observe(logits)
    assert torch.equal(reference.step(), pruned) and once.done


# ---- resume ----------------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def test_interrupted_mask_training_resumes_to_identical_masks(tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    settings = _settings(criterion_params={"mask_steps": 8})
    split, x = _split(), torch.zeros(1, 1, 8, 8)

    def fresh():
        torch.manual_seed(123)
        return build_model("mnist_cnn", 10, 1)

    reference = prune_and_finetune(model_ref := fresh(), split, settings, 0, CPU, x)
    original, count = DomainBatches.next, {"n": 0}

    def next_batches(self):
        count["n"] += 1
        if count["n"] > 7:  # during mask-training step 7: the checkpoint on disk is step 6's
            raise _Interrupted
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(DomainBatches, "next", next_batches)
        with pytest.raises(_Interrupted):
            prune_and_finetune(
                fresh(), split, settings, 0, CPU, x, checkpoint_dir=tmp_path, checkpoint_every=3
            )
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["phase"] == "learn" and saved["step"] == 6
    resumed = prune_and_finetune(
        model := fresh(), split, settings, 0, CPU, x, checkpoint_dir=tmp_path, checkpoint_every=3
    )
    first, second = spy.logits[0], spy.logits[-1]
    assert len(spy.logits) == 2 and torch.equal(first, second)  # the same logits, bit for bit
    assert torch.equal(resumed.gates.flat_alive(), reference.gates.flat_alive())
    assert resumed.history == reference.history and resumed.best_step == reference.best_step
    for key, value in model_ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("learned")
    config = root / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"name": "rotated_digits"},
                "target": "30",
                "device": "cpu",
                "pretrain": {"steps": 10, "batch_size": 8, "eval_every": 10},
                "prune": {"steps": 4, "batch_size": 4, "eval_every": 2, "criterion": "learned_masks"},
            }
        )
    )
    done = subprocess.run(
        [str(SCRIPT), "pretrain", "--config", str(config), "--out", str(root / "pre"), "-q"],
        capture_output=True, text=True, env=ONE_THREAD, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return config, root / "pre"


MASK_STEPS = 120  # checkpoints every 50 steps: the interrupt comes after the first, well before the end


def _prune_args(config: Path, pre: Path, out: Path) -> list[str]:
    return [
        str(SCRIPT), "prune", "--config", str(config), "--pretrained", str(pre), "--out", str(out),
        "--criterion", "learned_masks", "--criterion-param", f"mask_steps={MASK_STEPS}", "-q",
    ]  # fmt: skip


def test_console_script_sigint_during_mask_training_resumes_to_identical_masks(pretrained, tmp_path):
    config, pre = pretrained
    clean = subprocess.run(
        _prune_args(config, pre, tmp_path / "clean"),
        capture_output=True,
        text=True,
        env=ONE_THREAD,
        timeout=300,
    )
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        _prune_args(config, pre, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD,
        # as in a terminal: a shell running tests in the background may have SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(240, process.kill)
    watchdog.start()
    try:
        while not (out / "checkpoint.pt").is_file():  # the first checkpoint: mask-training step 50
            assert process.poll() is None, process.communicate()[1]
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        watchdog.cancel()
    assert process.returncode == 130, err
    assert err.startswith("interrupted: ") and str(out / "checkpoint.pt") in err
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["phase"] == "learn" and saved["step"] < MASK_STEPS  # stopped inside mask training
    resumed = subprocess.run(_prune_args(config, pre, out), capture_output=True, text=True, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr

    def read(directory: Path, name: str):
        return json.loads((directory / name).read_text())

    a, b = tmp_path / "clean", out
    assert read(a, "structure.json")["pruned_channels"] == read(b, "structure.json")["pruned_channels"]
    [first], [second] = read(a, "results.json"), read(b, "results.json")
    assert first["filters_kept"] == second["filters_kept"] == round(0.5 * 448)
    for key in ("intra_acc", "cross_acc", "selected_step", "run_id"):
        assert first[key] == second[key], key
    # the whole curve, mask training included, is the uninterrupted run's (but for the clock)
    curves = [
        [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (d / "history.jsonl").open()
        ]
        for d in (a, b)
    ]
    assert curves[0] == curves[1] and len(curves[0]) == MASK_STEPS + 4


# ---- sweep, analyze, parameters -----------------------------------------------------------------------


def test_a_tiny_sweep_prunes_with_learned_masks(tmp_path):
    spec = {
        "base": {
            "data": {"name": "rotated_digits"},
            "model": {"name": "mnist_cnn"},
            "device": "cpu",
            "pretrain": {"steps": 4, "batch_size": 8, "eval_every": 4},
            "prune": {"steps": 2, "batch_size": 4, "eval_every": 2, "keep_ratio": 0.5},
        },
        "grid": {
            "target": "0",
            "prune.criterion": "learned_masks",
            "prune.criterion_params.mask_steps": 5,
        },
        "sweep": {"db": "results.sqlite", "workers": 1},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [str(SCRIPT), "sweep", str(path), "--out", str(tmp_path / "sw"), "-q"],
        capture_output=True, text=True, env=ONE_THREAD, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    conn = sqlite3.connect(tmp_path / "sw" / "results.sqlite")
    try:
        rows = conn.execute("SELECT criterion, status, filters_kept, criterion_params FROM runs").fetchall()
    finally:
        conn.close()
    [learned] = [row[1:] for row in rows if row[0] == "learned_masks"]
    assert learned[:2] == ("done", round(0.5 * 448))
    assert json.loads(learned[2])["mask_steps"] == 5


def test_analyze_reports_the_learned_logits(pretrained, tmp_path):
    _, pre = pretrained
    out = tmp_path / "analysis.json"
    done = subprocess.run(
        [
            str(SCRIPT), "analyze", "--model", str(pre), "--channels", "16", "--batch-size", "4",
            "--set", "prune.criterion=learned_masks", "--set", "prune.criterion_params.mask_steps=5",
            "--device", "cpu", "--out", str(out),
        ],
        capture_output=True, text=True, env=ONE_THREAD, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "criterion learned_masks (mask_steps=5)" in done.stdout
    payload = json.loads(out.read_text())
    [row] = [r for r in payload["rows"] if r["name"] == "learned_masks (mask_steps=5)"]
    assert row["spearman_target"] is not None and -1 <= row["spearman_target"] <= 1
    assert "learned_masks (mask_steps=5)" in payload["signals"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": 0}, "learned_masks: temperature must be > 0, got 0"),
        ({"mask_steps": 0}, "learned_masks: mask_steps must be >= 1, got 0"),
        ({"penalty": -1}, "learned_masks: penalty must be >= 0, got -1"),
        ({"mask_lr": "fast"}, "learned_masks: mask_lr must be a number"),
        ({"masks": 3}, "criterion 'learned_masks' has no parameter 'masks'"),
    ],
)
def test_bad_parameters_are_one_clear_error(params, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config(
            overrides={"target": "0", "prune": {"criterion": "learned_masks", "criterion_params": params}}
        )


def test_parameters_are_part_of_the_run_id_and_the_label():
    default = build_config(overrides={"target": "0", "prune": {"criterion": "learned_masks"}})
    longer = build_config(
        overrides={
            "target": "0",
            "prune": {"criterion": "learned_masks", "criterion_params": {"mask_steps": 50}},
        }
    )
    taylor = build_config(overrides={"target": "0", "prune": {"criterion": "taylor"}})
    assert taylor.run_id() == "66f118795323"  # pinned in test_criteria_extra: unchanged
    assert len({default.run_id(), longer.run_id(), taylor.run_id()}) == 3
    assert make_criterion("learned_masks", {"mask_steps": 50}).label == "learned_masks (mask_steps=50)"
    # a dumped learned_masks config switched to another criterion drops the defaults it does not take
    switched = build_config(base=default.model_dump(), overrides={"prune": {"criterion": "taylor"}})
    assert switched.prune.criterion_params == {} and switched.run_id() == taylor.run_id()


def test_the_torch_pruning_importance_refuses_learned_masks():
    from dgprune.integrations.torch_pruning import DomainImportance

    model = build_model("mnist_cnn", 10, 1)
    with pytest.raises(ConfigError, match="trains parameters of its own"):
        DomainImportance(model, torch.zeros(1, 1, 8, 8), "learned_masks")
