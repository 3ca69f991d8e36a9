"""Out-of-distribution importance (`dgprune analyze`): the oracles against physical removal, the
statistics against hand computations, and the command as a user runs it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from dgprune.errors import ConfigError
from dgprune.experiments.analysis import analyze_model
from dgprune.experiments.pipeline import model_dir_config
from dgprune.models import build_model
from dgprune.pruning import GateSet, find_channel_groups, remove_channels
from dgprune.pruning.ood_importance import (
    TARGET_NOTE,
    agreement,
    criterion_variants,
    lowest_k_overlap,
    measure_ood_importance,
    pruned_count,
    sample_positions,
    spearman,
)
from dgprune.pruning.oracle import loss_changes, removable_positions


@torch.no_grad()
def _risk(model, batch) -> float:
    x, y = batch
    return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize(("name", "pixels"), [("mnist_cnn", 8), ("resnet18", 8)])
def test_oracles_equal_physical_removal(name, pixels):
    """Each analysed channel's target and per-source rises = the risk of the model with the channel
    physically removed (eval mode) minus the risk of the model without it removed."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, in_channels=2, small_input=True).double().train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics, so eval mode differs from train
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)

    def batch(n):
        return torch.randn(n, 2, pixels, pixels, dtype=torch.float64), torch.randint(0, 3, (n,))

    sources, target = [batch(3), batch(5), batch(4)], batch(6)
    example = target[0][:1]
    bare = copy.deepcopy(model)
    groups = find_channel_groups(model, example)
    gates = GateSet(model, groups).attach()
    gates.prune([1])  # a partly pruned model: channel 1 of the first group is gone
    offsets = torch.tensor([0, *gates.sizes]).cumsum(0).tolist()
    checked = {0: 2, len(groups) // 2: 3, len(groups) - 1: 0}  # group index -> channel
    positions = [offsets[g] + c for g, c in checked.items()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    # One gradient criterion on the small model (its backward must leave nothing behind); the ResNet
    # is scored by weights only, to keep float64 backwards out of this test.
    variants = [("taylor", None)] if name == "mnist_cnn" else [("l1", None)]
    result = measure_ood_importance(
        model, gates, sources, ["a", "b", "c"], target, "T", positions, variants=variants
    )

    assert model.training and gates.flat_alive().sum() == gates.total - 1  # mode and masks restored
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert result.positions == positions and result.removable == gates.total - 1
    reference = copy.deepcopy(bare)
    remove_channels(reference, {groups[0].name: [1]}, example)
    reference.eval()
    base_target = _risk(reference, target)
    base_sources = [_risk(reference, b) for b in sources]
    assert result.risks_now["T"] == pytest.approx(base_target, rel=1e-9)
    for j, (group_idx, channel) in enumerate(checked.items()):
        removed = copy.deepcopy(bare)
        extra = [1, channel] if group_idx == 0 else [channel]
        remove_channels(removed, {groups[0].name: [1], groups[group_idx].name: extra}, example)
        removed.eval()
        expected = _risk(removed, target) - base_target
        assert float(result.target_rise[j]) == pytest.approx(expected, rel=1e-6, abs=1e-12), (j, name)
        for i, b in enumerate(sources):
            expected_i = _risk(removed, b) - base_sources[i]
            assert float(result.source_rises[i, j]) == pytest.approx(expected_i, rel=1e-6, abs=1e-12)
    assert result.target_rise.abs().max() > 0
    # The signed source oracle is the rise of the mean source risk: minus the 'oracle' loss change.
    model.eval()
    changes = loss_changes(model, gates, sources, positions)[positions]
    torch.testing.assert_close(result.signals["source oracle, signed (mean over sources)"], -changes)
    torch.testing.assert_close(result.signals["source oracle^2 (Eq. 1)"], changes**2)


def test_rows_and_criteria_on_a_tiny_model():
    torch.manual_seed(1)
    model = build_model("mnist_cnn", num_classes=3, in_channels=1)
    sources = [(torch.rand(n, 1, 8, 8), torch.randint(0, 3, (n,))) for n in (4, 6)]
    val = [(torch.rand(3, 1, 8, 8), torch.randint(0, 3, (3,))) for _ in range(2)]
    target = (torch.rand(5, 1, 8, 8), torch.randint(0, 3, (5,)))
    gates = GateSet(model, find_channel_groups(model, torch.zeros(1, 1, 8, 8))).attach()
    positions = sample_positions(removable_positions(gates), 24, seed=0)
    result = measure_ood_importance(model, gates, sources, ["a", "b"], target, "T", positions, val)

    names = [r.name for r in result.rows]
    assert "oracle" not in names and "taylor" in names and "ior (alpha=100)" in names
    assert {"source oracle^2 (Eq. 1)", "min over sources", "max over sources", "source a", "source b"} <= set(
        names
    )
    assert not result.skipped, result.skipped  # val gradients given: every criterion is scored
    assert len(names) == len(criterion_variants()) + 6
    for row in result.rows:  # each row is the statistics of its own signal
        again = agreement(
            row.name,
            row.kind,
            result.signals[row.name],
            result.target_rise,
            result.signals["source oracle^2 (Eq. 1)"],
        )
        # NaN (a constant signal, e.g. bn_scale at initialisation) compares unequal to itself: use repr.
        assert repr(again) == repr(row)
    mins = result.source_rises.min(dim=0).values
    torch.testing.assert_close(result.signals["min over sources"], mins)
    payload = result.to_dict()
    json.dumps(payload, allow_nan=False)  # NaN (a constant signal) is written as null
    assert payload["note"] == TARGET_NOTE and payload["chance_overlap"]["0.5"] == 12 / 24


def _average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their positions (written out the slow, obvious way)."""
    ordered = sorted(values)
    return [
        sum(i + 1 for i, w in enumerate(ordered) if w == v) / sum(1 for w in ordered if w == v)
        for v in values
    ]


def test_spearman_with_ties_is_pearson_of_average_ranks():
    a = [1.0, 2.0, 2.0, 3.0]
    assert spearman(a, [4.0, 3.0, 3.0, 1.0]) == pytest.approx(-1.0)
    assert np.isnan(spearman(a, [5.0] * 4))  # a constant signal ranks nothing
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, 30).astype(float).tolist()  # many ties
    y = (np.array(x) + rng.integers(0, 3, 30)).tolist()
    rx, ry = np.array(_average_ranks(x)), np.array(_average_ranks(y))
    expected = float(np.corrcoef(rx, ry)[0, 1])
    assert spearman(x, y) == pytest.approx(expected, rel=1e-12)
    assert spearman(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, rel=1e-12)


def test_lowest_k_overlap_hand_example():
    score = [0.1, 0.5, 0.2, 0.9, 0.3]
    reference = [0.3, 0.1, 0.2, 0.8, 0.9]
    assert lowest_k_overlap(score, reference, 2) == 0.5  # {0, 2} vs {1, 2}
    assert lowest_k_overlap(score, reference, 3) == pytest.approx(2 / 3)  # {0, 2, 4} vs {0, 1, 2}
    assert lowest_k_overlap(score, score, 4) == 1.0
    assert pruned_count(448, 0.5) == 224 and pruned_count(448, 0.7) == 314 and pruned_count(1, 0.5) == 1


def test_sample_positions():
    candidates = list(range(10, 110))
    assert sample_positions(candidates, None, 0) == candidates
    assert sample_positions(candidates, 500, 0) == candidates
    chosen = sample_positions(candidates, 20, 3)
    assert len(set(chosen)) == 20 and set(chosen) <= set(candidates) and chosen == sorted(chosen)
    assert chosen == sample_positions(candidates, 20, 3) and chosen != sample_positions(candidates, 20, 4)


def test_analyze_command_on_a_pretrained_model(tmp_path):
    pre, config = tmp_path / "pre", tmp_path / "run.yaml"
    config.write_text("pretrain: {batch_size: 8, eval_every: 10}\n")
    done = run_cli(
        "pretrain", "--config", str(config), "--data", "rotated_digits", "--target", "30", "--steps", "10",
        "--seed", "3", "--device", "cpu", "--out", str(pre), "-q",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = tmp_path / "analysis.json"
    # No --target, no --seed: the model directory's own settings (run.json) give data, target and split.
    done = run_cli(
        "analyze", "--model", str(pre), "--channels", "12", "--batch-size", "6", "--device", "cpu",
        "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "analysis only" in done.stdout and "criterion taylor" in done.stdout
    payload = json.loads(out.read_text())
    assert payload["target_domain"] == "30" and payload["seed"] == 3 and payload["channels_analysed"] == 12
    assert "sample" in payload["channel_selection"] and payload["note"] == TARGET_NOTE
    assert {r["name"] for r in payload["rows"]} >= {"taylor", "ior", "source oracle^2 (Eq. 1)"}
    cfg = model_dir_config(pre, None, {"device": "cpu"})
    assert cfg.target == "30" and cfg.seed == 3 and cfg.data.name == "rotated_digits"
    with pytest.raises(ConfigError, match="--channels"):
        analyze_model(pre, cfg, channels=1)
    with pytest.raises(ConfigError, match="not a dgprune model directory"):
        model_dir_config(tmp_path, None, {})
