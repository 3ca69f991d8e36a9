"""The oracle (paper Eq. 1) vs an independent computation: the model with the channel physically removed."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dgprune.data import load_dataset, make_lodo_split
from dgprune.models import build_model
from dgprune.pruning import GateSet, ScoreInputs, find_channel_groups, make_criterion, remove_channels
from dgprune.pruning.oracle import loss_changes
from dgprune.training import PruneSettings, prune_and_finetune


@torch.no_grad()
def _mean_risk_per_domain_forward(model, batches) -> float:
    return float(torch.stack([F.cross_entropy(model(x), y) for x, y in batches]).mean())


@pytest.mark.parametrize(("name", "pixels"), [("mnist_cnn", 8), ("resnet18", 16)])
def test_loss_changes_equal_physical_removal(name, pixels):
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, in_channels=2, small_input=True).double().train()
    batches = [
        (torch.randn(n, 2, pixels, pixels, dtype=torch.float64), torch.randint(0, 4, (n,))) for n in (3, 5, 7)
    ]
    example = batches[0][0][:1]
    bare = copy.deepcopy(model)
    groups = find_channel_groups(model, example)
    gates = GateSet(model, groups).attach()
    gates.prune([1])  # one channel already pruned: its change must be 0 (it is gone already)
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    offsets = torch.tensor([0, *gates.sizes]).cumsum(0)
    checked = {0: 2, len(groups) // 2: 3, len(groups) - 1: 2}  # group index -> channel
    positions = None if name == "mnist_cnn" else [int(offsets[g]) + c for g, c in checked.items()]
    changes = loss_changes(model, gates, batches, positions)

    assert changes.shape == (gates.total,) and changes[1] == 0
    for k, v in model.named_buffers():  # BatchNorm running statistics untouched
        assert torch.equal(v, buffers[k]), k
    assert gates.flat_alive().sum() == gates.total - 1  # masks restored
    reference = copy.deepcopy(bare)
    remove_channels(reference, {groups[0].name: [1]}, example)
    reference.train()
    base = _mean_risk_per_domain_forward(reference, batches)
    for group_idx, channel in checked.items():
        removed = copy.deepcopy(bare)
        extra = [1, channel] if group_idx == 0 else [channel]
        pruned = {groups[0].name: [1], groups[group_idx].name: extra}
        remove_channels(removed, pruned, example)
        removed.train()
        expected = base - _mean_risk_per_domain_forward(removed, batches)
        actual = float(changes[offsets[group_idx] + channel])
        assert actual == pytest.approx(expected, rel=1e-6, abs=1e-10), (group_idx, actual, expected)
    assert changes.abs().max() > 0


def test_oracle_criterion_squares_the_loss_change_of_alive_channels():
    gates = torch.tensor([1.0, 1.0, 0.0])
    inputs = ScoreInputs(gates=gates, loss_change=torch.tensor([-0.5, 0.25, 0.0], dtype=torch.float64))
    criterion = make_criterion("oracle")
    assert criterion.needs_loss_changes
    torch.testing.assert_close(criterion.score(inputs), torch.tensor([0.25, 0.0625, 0.0]))


def test_pruning_with_the_oracle_reaches_the_target():
    split = make_lodo_split(load_dataset("rotated_digits"), target="45", seed=1)
    model = build_model("mnist_cnn", 10, 1)
    settings = PruneSettings(
        criterion="oracle", keep_ratio=0.8, interval=1, steps=2, batch_size=8, eval_every=1
    )
    outcome = prune_and_finetune(
        model, split, settings, seed=0, device=torch.device("cpu"), example_input=torch.zeros(1, 1, 8, 8)
    )
    assert outcome.gates.num_alive() == round(0.8 * 448)
