"""prune.max_layer_prune: no group loses more than that share of its channels (issue 19 §5)."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from dgprune.errors import ConfigError
from dgprune.experiments.config import build_config
from dgprune.pruning.schedule import PruningSchedule

# ResNet-18's channel groups (stage-coupled and internal), the widest last, as they collapse.
RESNET18_LIKE = [64, 64, 64, 128, 128, 128, 256, 256, 256, 512, 512, 512]


def _skewed_scores(sizes: list[int], seed: int) -> torch.Tensor:
    """Scores that fall with the group's index: unlimited, the ranking prunes the last groups most."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.cat([torch.full((n,), 1.0 / (1 + i) ** 2) for i, n in enumerate(sizes)])
    return torch.rand(sum(sizes), generator=generator, dtype=torch.float64) * scale


def _widths(schedule: PruningSchedule) -> list[int]:
    return torch.bincount(schedule.group_of[schedule.alive], minlength=len(schedule.group_sizes)).tolist()


def _run(schedule: PruningSchedule, scores: torch.Tensor) -> list[list[int]]:
    """Prune with noisy copies of ``scores``; the widths after every pruning step."""
    noise = torch.Generator().manual_seed(99)
    history = []
    for _ in range(1000):
        if schedule.done:
            break
        schedule.observe(scores * (1 + 0.2 * torch.rand(scores.shape, generator=noise, dtype=torch.float64)))
        if schedule.step() is not None:
            history.append(_widths(schedule))
    assert schedule.done
    return history


def _most_pruned(n: int, share: float) -> int:
    """The limit computed on its own: at most share x n channels of n, in exact arithmetic."""
    from fractions import Fraction

    return math.floor(Fraction(str(share)) * n)


@pytest.mark.parametrize(
    ("round_to", "round_mode"), [(1, "budget"), (8, "budget"), (8, "per_layer"), (16, "budget")]
)
@pytest.mark.parametrize("limit", [0.8, 0.75])
def test_no_group_is_pruned_beyond_the_limit_in_any_step(round_to, round_mode, limit):
    sizes = RESNET18_LIKE
    scores = _skewed_scores(sizes, seed=round_to)
    unlimited = PruningSchedule(
        sizes, 0.3, interval=2, max_per_step=300, round_to=round_to, round_mode=round_mode
    )
    _run(unlimited, scores)
    # without the limit the ranking does take the last groups beyond it (the test means something)
    assert any(n - w > _most_pruned(n, limit) for n, w in zip(sizes, _widths(unlimited), strict=True))
    limited = PruningSchedule(
        sizes,
        0.3,
        interval=2,
        max_per_step=300,
        round_to=round_to,
        round_mode=round_mode,
        max_layer_prune=limit,
    )
    history = _run(limited, scores)
    for widths in history:
        for n, width in zip(sizes, widths, strict=True):
            assert n - width <= _most_pruned(n, limit), (widths, n)
    final = history[-1]
    if round_to > 1:
        assert all(w % round_to == 0 for w in final)
        assert abs(sum(final) - limited.target) <= round_to // 2 * len(sizes)
    else:
        assert sum(final) == limited.target


def test_the_global_ranking_is_followed_within_the_limits():
    """One step, fixed scores: the channels removed are those of the lowest-first ranking where every
    group stops at its limit, computed here by brute force over the per-group counts."""
    import itertools

    sizes, limit = [6, 5, 8], 0.5
    scores = torch.tensor(
        [0.1, 0.2, 0.3, 0.9, 1.0, 1.1, 0.05, 0.15, 0.5, 0.6, 0.7, 0.01, 0.02, 0.03, 0.04, 2, 3, 4, 5],
        dtype=torch.float64,
    )
    schedule = PruningSchedule(sizes, 0.5, interval=1, max_per_step=100, max_layer_prune=limit)
    schedule.observe(scores)
    schedule.step()
    needed = sum(sizes) - schedule.target
    best = None
    for counts in itertools.product(*(range(_most_pruned(n, limit) + 1) for n in sizes)):
        if sum(counts) != needed:
            continue
        start, cost = 0, 0.0
        for n, c in zip(sizes, counts, strict=True):
            cost += float(scores[start : start + n].sort().values[:c].sum())
            start += n
        best = cost if best is None else min(best, cost)
    assert float(scores[~schedule.alive].sum()) == pytest.approx(best)
    assert _widths(schedule) == [3, 3, 4]


def test_a_limit_of_one_changes_nothing():
    scores = _skewed_scores(RESNET18_LIKE, seed=3)
    plain = PruningSchedule(RESNET18_LIKE, 0.3, interval=1, max_per_step=300, round_to=8)
    one = PruningSchedule(RESNET18_LIKE, 0.3, interval=1, max_per_step=300, round_to=8, max_layer_prune=1.0)
    _run(plain, scores), _run(one, scores)
    assert torch.equal(plain.alive, one.alive)


def test_an_unreachable_target_is_one_error_naming_what_would_work():
    with pytest.raises(ConfigError) as caught:
        PruningSchedule([64, 512], 0.3, max_layer_prune=0.5)
    message = str(caught.value)
    assert "\n" not in message
    assert "at least 288 of 576 filters remain, more than the 173" in message
    assert "max_layer_prune 0.71 or more, or keep_ratio 0.5 or more" in message
    PruningSchedule([64, 512], 0.3, max_layer_prune=0.71)  # the least share it names works,
    with pytest.raises(ConfigError):
        PruningSchedule([64, 512], 0.3, max_layer_prune=0.70)  # and one point less does not
    PruningSchedule([64, 512], 0.5, max_layer_prune=0.5)
    with pytest.raises(ValueError, match="max_layer_prune must be in"):
        PruningSchedule([64, 512], 0.5, max_layer_prune=0.0)


def test_run_ids_without_a_limit_are_unchanged_and_a_limit_changes_them():
    pinned = "8e60a205d1e5"  # tests/test_sweep.py's pin of the default run
    assert build_config(overrides={"target": "0"}).run_id() == pinned
    for sets in (["prune.max_layer_prune=null"], ["prune.max_layer_prune=1"], ["prune.max_layer_prune=1.0"]):
        assert build_config(overrides={"target": "0"}, sets=sets).run_id() == pinned
    limited = build_config(overrides={"target": "0"}, sets=["prune.max_layer_prune=0.9"])
    assert limited.prune.max_layer_prune == 0.9
    other = build_config(overrides={"target": "0"}, sets=["prune.max_layer_prune=0.8"])
    assert len({pinned, limited.run_id(), other.run_id()}) == 3
    assert limited.pretrain_id() == build_config(overrides={"target": "0"}).pretrain_id()  # same model
    with pytest.raises(ConfigError, match="max_layer_prune"):
        build_config(sets=["prune.max_layer_prune=1.5"])


def test_a_sweep_grid_varies_it():
    from dgprune.experiments.sweep import expand_grid

    configs = expand_grid({}, [{"target": "0", "prune.max_layer_prune": [None, 0.9]}])
    assert sorted(str(c.prune.max_layer_prune) for c in configs) == ["0.9", "None"]
    assert len({c.run_id() for c in configs}) == 2 and len({c.pretrain_id() for c in configs}) == 1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    pre = tmp_path_factory.mktemp("layer_limit") / "pre"
    result = run_cli(
        "pretrain", "--out", str(pre), "--target", "0", "--steps", "3", "--set", "pretrain.eval_every=3",
        "--device", "cpu", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return pre


def test_prune_command_holds_the_limit_and_records_it(tmp_path, pretrained):
    pre = pretrained
    out = tmp_path / "pruned"
    result = run_cli(
        "prune", "--pretrained", str(pre), "--out", str(out), "--target", "0", "--criterion", "taylor",
        "--keep-ratio", "0.3", "--max-layer-prune", "0.72", "--steps", "4", "--set", "prune.interval=1",
        "--set", "prune.max_per_step=400", "--device", "cpu", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["prune"]["max_layer_prune"] == 0.72
    assert json.loads((out / "run.json").read_text())["config"]["prune"]["max_layer_prune"] == 0.72
    from dgprune.models import build_model
    from dgprune.pruning.measure import conv_widths
    from dgprune.pruning.surgery import load_compressed

    compressed, _ = load_compressed(out, build_model)
    dense = conv_widths(build_model("mnist_cnn", 10, in_channels=1))
    kept = conv_widths(compressed)
    assert sum(dense.values()) - sum(kept.values()) == 448 - round(0.3 * 448)
    for conv, width in kept.items():  # every conv of the model, each at most 72% pruned
        assert dense[conv] - width <= _most_pruned(dense[conv], 0.72), (conv, width, dense[conv])
    [record] = json.loads((out / "results.json").read_text())
    assert record["filters_kept"] == round(0.3 * 448)


def test_prune_command_refuses_an_unreachable_target_before_training(tmp_path, pretrained):
    pre = pretrained
    out = tmp_path / "pruned"
    result = run_cli(
        "prune", "--pretrained", str(pre), "--out", str(out), "--target", "0", "--keep-ratio", "0.3",
        "--max-layer-prune", "0.5", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error:") and "prune.max_layer_prune 0.5" in line
    assert "max_layer_prune 0.71 or more" in line  # the least that reaches keep 0.3 on MNIST_CNN
    assert "prune step" not in result.stdout + result.stderr  # no fine-tuning step ran
    assert not (out / "model.safetensors").exists()
