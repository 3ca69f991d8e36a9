"""dgprune's criteria as a Torch-Pruning importance (docs/torch_pruning.md).

The reference is dgprune's own path: masks (GateSet), the paper's schedule (PruningSchedule) and
compress(). Under settings where both must agree (global pruning, no round_to, no group pruned to its
last channel, a pruning_ratio that removes exactly k channels per step) the Torch-Pruning path must
remove the same channels and end with the same weights.
"""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch_pruning as tp

from dgprune.errors import ConfigError
from dgprune.integrations.torch_pruning import DomainImportance
from dgprune.models import CUSTOM_PRUNERS, build_model
from dgprune.pruning import (
    CRITERIA,
    GateSet,
    PruningSchedule,
    ScoreInputs,
    compress,
    find_channel_groups,
    make_criterion,
    per_domain_forward_backward,
    remove_channels,
)
from dgprune.pruning.criteria import REGISTRY
from dgprune.pruning.scoring import gate_gradients

DOMAIN_SIZES = (2, 3, 4)  # unequal on purpose
LR = 0.05


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: extra intra-op threads only add contention (several times slower on a busy CPU).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(name: str, pixels: int, steps: int, dtype: torch.dtype = torch.float64):
    model = build_model(name, num_classes=4, in_channels=2, small_input=True).to(dtype)
    model.train()  # BatchNorm in the mode training uses
    example = torch.randn(1, 2, pixels, pixels, dtype=dtype)
    stream = [
        [(torch.randn(n, 2, pixels, pixels, dtype=dtype), torch.randint(0, 4, (n,))) for n in DOMAIN_SIZES]
        for _ in range(steps)
    ]
    return model, example, stream


def _dgprune_path(model, example, stream, criterion_name, k_per_step, k_total, interval):
    """dgprune's own loop: masked model, PruningSchedule, then compress. Returns model and removals."""
    groups = find_channel_groups(model, example)
    gates = GateSet(model, groups).attach()
    criterion = make_criterion(criterion_name)
    schedule = PruningSchedule(
        gates.sizes, (gates.total - k_total) / gates.total, interval, max_per_step=k_per_step, momentum=0.9
    )
    assert schedule.target == gates.total - k_total
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for batches in stream:
        optimizer.zero_grad()
        out = per_domain_forward_backward(model, gates, batches)
        schedule.observe(criterion.score(ScoreInputs(gates.flat_gates(), out.domain_grads, out.risks)))
        optimizer.step()
        chosen = schedule.step()
        if chosen is not None:
            gates.prune(chosen)
    assert schedule.done
    pruned = compress(model, gates, example)
    return model, {name: idxs for name, idxs in pruned.items() if idxs}, schedule


def _tp_path(model, example, stream, criterion_name, iterative_steps, k_total, interval):
    """The user's loop: DomainImportance fed every step, tp.pruner.MetaPruner every `interval` steps."""
    total = sum(g.size for g in find_channel_groups(model, example))
    importance = DomainImportance(model, example, criterion_name)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        global_pruning=True,
        # int() in Torch-Pruning's "keep int(total * (1 - ratio))": half a channel below k is exact
        pruning_ratio=(k_total - 0.5) / total,
        iterative_steps=iterative_steps,
        ignored_layers=[model.fc],
        customized_pruners=CUSTOM_PRUNERS,
    )
    model.train()  # Torch-Pruning's tracing leaves the model in eval mode
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step, batches in enumerate(stream, start=1):
        optimizer.zero_grad()
        importance.update(batches)
        optimizer.step()
        if step % interval == 0:
            pruner.step()
            optimizer = torch.optim.SGD(model.parameters(), lr=LR)  # pruning replaced the parameters
    return model, pruner, importance


def _assert_same_model(tp_model, dg_model):
    tp_state, dg_state = tp_model.state_dict(), dg_model.state_dict()
    assert tp_state.keys() == dg_state.keys()
    for key, value in dg_state.items():
        assert tp_state[key].shape == value.shape, key
        torch.testing.assert_close(tp_state[key], value, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize(
    ("name", "pixels", "dtype", "criterion", "k"),
    # float32 keeps ResNet-18 fast; both paths run the very same operations up to the pruning step
    [("mnist_cnn", 8, torch.float64, "ior", 40), ("resnet18", 16, torch.float32, "taylor", 60)],
)
def test_one_pruning_step_removes_what_dgprune_schedule_removes(name, pixels, dtype, criterion, k):
    model, example, stream = _setup(name, pixels, steps=2, dtype=dtype)
    dg_model, dg_pruned, schedule = _dgprune_path(copy.deepcopy(model), example, stream, criterion, k, k, 2)
    tp_model, pruner, importance = _tp_path(copy.deepcopy(model), example, stream, criterion, 1, k, 2)
    # the same scores, in dgprune's flat channel order
    torch.testing.assert_close(importance.scores, schedule.ema, rtol=1e-9, atol=0)

    tp_pruned = {root: sorted(idxs) for root, _, idxs in pruner.pruning_history() if len(idxs)}
    assert all(is_out for _, is_out, _ in pruner.pruning_history())
    assert tp_pruned == {root: sorted(idxs) for root, idxs in dg_pruned.items()}
    assert sum(len(v) for v in tp_pruned.values()) == k
    assert len(tp_pruned) >= 2  # the ranking is global: several groups lose channels
    _assert_same_model(tp_model, dg_model)


def test_every_gradient_criterion_scores_as_dgprune():
    """Any gradient criterion of the registry (new ones too) gives dgprune's own flat scores."""
    model, example, stream = _setup("mnist_cnn", 8, steps=2)
    reference = copy.deepcopy(model)
    gates = GateSet(reference, find_channel_groups(reference, example)).attach()
    out = per_domain_forward_backward(reference, gates, stream[0])
    val_risks, val_grads = gate_gradients(reference, gates, stream[1])  # held-out batches for ior_val
    inputs = ScoreInputs(
        gates.flat_gates(), out.domain_grads, out.risks, val_domain_grads=val_grads, val_risks=val_risks
    )
    specs = {n: REGISTRY[n] for n in CRITERIA}  # specs: target_entropy cannot be made without its sign
    names = [n for n, spec in specs.items() if spec.needs_gradients and not spec.needs_loss_changes]
    assert {"taylor", "ior"} <= set(names)
    for name in names:
        importance = DomainImportance(copy.deepcopy(model), example, name)
        val = stream[1] if importance.criterion.needs_val_gradients else None
        importance.update(stream[0], val_batches=val)
        importance._end_interval()
        expected = make_criterion(name).score(inputs).double()
        torch.testing.assert_close(importance.scores, expected, rtol=1e-9, atol=1e-15, msg=name)


def test_iterative_steps_follow_the_schedule_and_its_moving_average():
    """Two pruning steps: the second ranks the surviving channels of a physically pruned model by the
    EMA carried over from the first interval, like dgprune's masked schedule."""
    model, example, stream = _setup("mnist_cnn", 8, steps=4)
    dg_model, _, schedule = _dgprune_path(copy.deepcopy(model), example, stream, "ior", 24, 48, interval=2)
    tp_model, _, importance = _tp_path(copy.deepcopy(model), example, stream, "ior", 2, 48, interval=2)
    _assert_same_model(tp_model, dg_model)
    assert torch.equal(importance.alive, schedule.alive)  # which channels are left, in dgprune's order
    alive = schedule.alive
    torch.testing.assert_close(importance.scores[alive], schedule.ema[alive], rtol=1e-6, atol=0)


def test_round_to_and_per_domain_losses_plug_in():
    """Torch-Pruning's own round_to (per layer, rounds the width down) works unchanged; the losses
    path (domains/observe) scores exactly as update() does."""
    import torch.nn.functional as F

    model, example, stream = _setup("mnist_cnn", 8, steps=2)
    by_losses = DomainImportance(copy.deepcopy(model), example, "ior")
    by_batches = DomainImportance(model, example, "ior")
    for batches in stream:
        by_batches.update(batches)
        with by_losses.domains(len(batches)) as domain:
            risks = []
            for i, (x, y) in enumerate(batches):
                with domain(i):
                    risks.append(F.cross_entropy(by_losses.model(x), y))
            by_losses.observe(risks)
        torch.stack(risks).mean().backward()
    by_batches._end_interval(), by_losses._end_interval()
    torch.testing.assert_close(by_losses.scores, by_batches.scores, rtol=1e-9, atol=0)

    pruner = tp.pruner.MetaPruner(
        model, example, by_batches, global_pruning=True, pruning_ratio=0.3, round_to=8,
        iterative_steps=2, ignored_layers=[model.fc], customized_pruners=CUSTOM_PRUNERS,
    )  # fmt: skip
    model.train()
    for batches in stream:
        by_batches.update(batches)
        pruner.step()
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths) and sum(widths) < 448
    assert int(by_batches.alive.sum()) == sum(widths)


def test_clear_errors():
    model, example, stream = _setup("mnist_cnn", 8, steps=1)
    importance = DomainImportance(model, example, "taylor")
    pruner = tp.pruner.MetaPruner(
        model, example, importance, global_pruning=True, pruning_ratio=0.2,
        ignored_layers=[model.fc], customized_pruners=CUSTOM_PRUNERS,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"no per-domain data yet.*importance\.update\("):
        pruner.step()

    # the classifier's outputs are not a channel group: the pruner must ignore it
    unignored = tp.pruner.MetaPruner(
        model, example, importance, global_pruning=True, pruning_ratio=0.2, customized_pruners=CUSTOM_PRUNERS
    )
    model.train()
    importance.update(stream[0])
    with pytest.raises(ConfigError, match=r"rooted at 'fc' \(Linear\).*ignored_layers"):
        unignored.step()

    # pruned behind its back (a dependency graph it never saw): a clear error, not silent misranking
    remove_channels(model, {"conv2": [0, 1]}, example)
    with pytest.raises(
        ConfigError, match=r"'conv2' has 126 output channels but DomainImportance expects 128"
    ):
        importance.update(stream[0])

    with pytest.raises(ConfigError, match="one forward per channel"):
        DomainImportance(model, example, "oracle")
    with pytest.raises(ConfigError, match="nope"):
        DomainImportance(model, example, "nope")


def test_docs_example_runs(capsys):
    """The example at the top of docs/torch_pruning.md (the README's) runs as written."""
    doc = (Path(__file__).parents[1] / "docs" / "torch_pruning.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc, flags=re.S)[0]
    assert len(code.strip().splitlines()) <= 20
    exec(compile(code, "docs/torch_pruning.md", "exec"), {})
    macs, params = (
        float(v) for v in re.findall(r"MACs, params: \(([\d.]+), (\d+)\)", capsys.readouterr().out)[0]
    )
    dense = build_model("mnist_cnn", 10, in_channels=1)
    dense_macs, dense_params = tp.utils.count_ops_and_params(dense, torch.zeros(1, 1, 8, 8))
    assert macs < 0.5 * dense_macs and params < 0.6 * dense_params  # half the filters: ~1/4 of the MACs


def test_update_says_what_it_expected_and_what_it_got():
    """A wrong argument to update() is refused before any forward, naming what came; the errors are
    ConfigErrors and also the built-in TypeError / ValueError."""
    from dgprune.errors import ArgumentTypeError, ArgumentValueError

    model, example, stream = _setup("mnist_cnn", 8, steps=1)
    batches = stream[0]
    (x, y), *_ = batches
    ior = DomainImportance(model, example, "ior")
    cases = [
        (
            (x, y),
            ArgumentTypeError,
            r"got one \(x, y\) pair of tensors; for a single domain pass \[\(x, y\)\]",
        ),
        (
            x,
            ArgumentTypeError,
            r"expected a list of \(x, y\) mini-batches.*got a tensor of shape \(2, 2, 8, 8\)",
        ),
        (iter(batches), ArgumentTypeError, r"expected a list .*got a list_iterator"),
        ([], ArgumentValueError, r"got an empty list"),
        (
            [(x, y, y)],
            ArgumentTypeError,
            r"batches\[0\]: expected an \(x, y\) pair of tensors, got a tuple of 3",
        ),
        ([(x, y.tolist())], ArgumentTypeError, r"batches\[0\]: y must be a tensor, got a list"),
        ([(x, y[:1]), (x, y)], ArgumentValueError, r"batches\[0\]: x holds 2 inputs but y 1 labels"),
        (
            [(x, y), (x, y.float())],
            ArgumentValueError,
            r"batches\[1\]: y must be the \[B\] integer class labels",
        ),
        (
            [(x[0], y)],
            ArgumentValueError,
            r"x must be a non-empty batch of 4-dimensional inputs \[B, \.\.\.\] as the example "
            r"inputs, got shape \(2, 8, 8\)",
        ),
        ([(x, y)], ArgumentValueError, r"criterion 'ior' compares the source domains .* at least 2, got 1"),
    ]
    before = [p.clone() for p in model.parameters()]
    for wrong, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            ior.update(wrong)
        assert isinstance(caught.value, ConfigError)
        assert isinstance(caught.value, TypeError if error is ArgumentTypeError else ValueError)
    assert all(p.grad is None for p in model.parameters())  # refused before any forward or backward
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with (
        pytest.raises(ArgumentValueError, match=r"num_domains >= 2 \(criterion 'ior' compares"),
        ior.domains(1),
    ):
        pass

    taylor = DomainImportance(model, example, "taylor")
    taylor.update([(x, y)])  # one domain is enough for a criterion that does not compare them
    assert taylor._count == 1
    with pytest.raises(ConfigError, match="does not use val_batches"):
        taylor.update(batches, val_batches=batches)
    ior_val = DomainImportance(model, example, "ior_val")
    with pytest.raises(
        ArgumentValueError, match=r"one mini-batch per domain of batches.*got 2 for 3 domains"
    ):
        ior_val.update(batches, val_batches=batches[:2])
    with pytest.raises(ConfigError, match="needs update\\(batches, val_batches"):
        ior_val.update(batches)
