"""Mixed-BatchNorm scoring (issue 18.5): the per-domain gate gradients of one concatenated forward,
taken in ONE batched backward (``mixed_grads="batched"``, torch.func.vmap), equal the per-domain loop
(the reference kept in the library) and an independent brute force (own hooks on fresh leaves, one
``autograd.grad`` per domain); where vmap cannot batch a backward, the loop takes over."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgprune.models import build_model
from dgprune.pruning import GateSet, find_channel_groups
from dgprune.pruning.scoring import (
    _batched_risk_gradients,
    _gated_forward,
    _risk_gradients,
    gate_gradients,
    per_domain_forward_backward,
)

DOMAIN_SIZES = (2, 3, 4)  # unequal on purpose


def _problem(name: str, pixels: int, dtype: torch.dtype = torch.float64):
    torch.manual_seed(11)  # the weights too: float32 rounding depends on them
    model = build_model(name, num_classes=4, in_channels=2, small_input=True).to(dtype).train()
    batches = _batches(pixels, dtype, seed=11)
    groups = find_channel_groups(model, batches[0][0][:1], scope="all")
    return model, batches, groups


def _batches(pixels: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 2, pixels, pixels, dtype=dtype, generator=generator),
            torch.randint(0, 4, (n,), generator=generator),
        )
        for n in DOMAIN_SIZES
    ]


def _brute_force(model: nn.Module, groups, alive: list[torch.Tensor], batches) -> torch.Tensor:
    """[N, M]: own gate hooks (one shared leaf per group), one concatenated forward, N autograd.grad."""
    modules = dict(model.named_modules())
    dtype = next(model.parameters()).dtype
    leaves = [a.to(dtype).clone().requires_grad_(True) for a in alive]
    handles = []
    for leaf, group in zip(leaves, groups, strict=True):
        for site in group.gate_sites:
            assert list(site.channel_index) == list(range(group.size))  # identity order for these models
            hook = lambda m, i, out, leaf=leaf: out * leaf.view(1, -1, 1, 1)  # noqa: E731
            handles.append(modules[site.module_name].register_forward_hook(hook))
    try:
        logits = model(torch.cat([x for x, _ in batches])).split([len(y) for _, y in batches])
        risks = [F.cross_entropy(lg, y) for lg, (_, y) in zip(logits, batches, strict=True)]
        return torch.stack([torch.cat(torch.autograd.grad(r, leaves, retain_graph=True)) for r in risks])
    finally:
        for handle in handles:
            handle.remove()


def _shared_risks(model, gates: GateSet, batches) -> torch.Tensor:
    """The mixed forward: all sources as one batch through ONE gate copy (as bn_mode mixed does)."""
    gates.begin_scoring(1)
    return torch.stack([F.cross_entropy(o.logits, o.y) for o in _gated_forward(model, gates, batches, True)])


@pytest.mark.parametrize(("name", "pixels"), [("mnist_cnn", 8), ("resnet18", 8)])
def test_batched_gradients_equal_the_loop_and_brute_force(name, pixels):
    """float64: the batched backward equals the loop and the brute force to 1e-6 (relative).
    MNIST_CNN (GroupNorm) is forced through one shared gate copy so that it takes the batched path."""
    model, batches, groups = _problem(name, pixels)
    gates = GateSet(model, groups)
    gates.prune([m for m in range(gates.total) if m % 5 == 2])  # pruned channels too
    reference = _brute_force(model, groups, [a.clone() for a in gates.alive], batches)
    gates.attach()
    state = copy.deepcopy(model.state_dict())
    loop = _risk_gradients(_shared_risks(model, gates, batches), gates, True, False, "loop")
    model.load_state_dict(state)  # the same BatchNorm statistics for the second forward
    batched = _batched_risk_gradients(_shared_risks(model, gates, batches), gates.domain_gate_tensors())
    gates.end_scoring()
    assert batched is not None  # these models' backward passes batch (no fallback)
    assert batched.shape == (len(DOMAIN_SIZES), gates.total)
    atol = 1e-12 * reference.abs().max()
    torch.testing.assert_close(batched, reference, rtol=1e-6, atol=atol)
    torch.testing.assert_close(batched, loop, rtol=1e-6, atol=atol)


def test_float32_batched_is_as_accurate_as_the_loop():
    """In float32 both ways differ from the float64 truth by rounding only: batching adds no error."""
    model64, batches64, groups = _problem("resnet18", 8)
    truth = _brute_force(model64, groups, [torch.ones(g.size) for g in groups], batches64)
    model = copy.deepcopy(model64).float()
    batches = [(x.float(), y) for x, y in batches64]
    gates = GateSet(model, groups).attach()
    grads = {
        mode: gate_gradients(model, gates, batches, "mixed", mode)[1].double() for mode in ("loop", "batched")
    }

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / truth.abs().max())

    loop_error = error(grads["loop"], truth)
    assert loop_error < 1e-4  # float32 rounding through BatchNorm on 9 samples, not a wrong gradient
    assert error(grads["batched"], truth) <= 2 * loop_error
    assert error(grads["batched"], grads["loop"]) <= 2 * loop_error


def test_training_step_and_held_out_gradients_are_unchanged_by_batching():
    """The public entry points with mixed_grads="batched": the same risks, loss, per-domain gradients,
    parameter gradients and BatchNorm statistics as the loop (the default)."""
    model, train, groups = _problem("resnet18", 8)
    val = _batches(8, torch.float64, seed=12)
    models = {"loop": model, "batched": copy.deepcopy(model)}
    out, val_out, params, buffers = {}, {}, {}, {}
    for mode, net in models.items():
        gates = GateSet(net, groups).attach()
        out[mode] = per_domain_forward_backward(net, gates, train, bn_mode="mixed", mixed_grads=mode)
        before = copy.deepcopy(dict(net.named_buffers()))
        val_out[mode] = gate_gradients(net, gates, val, "mixed", mode)
        for key, value in net.named_buffers():  # held-out batches do not move BatchNorm statistics
            assert torch.equal(value, before[key]), key
        params[mode] = torch.cat([p.grad.flatten() for p in net.parameters()])
        buffers[mode] = torch.cat([b.double().flatten() for b in net.buffers()])
    loop, batched = out["loop"], out["batched"]
    assert batched.loss == loop.loss and torch.equal(batched.risks, loop.risks)
    scale = loop.domain_grads.abs().max()
    torch.testing.assert_close(batched.domain_grads, loop.domain_grads, rtol=1e-6, atol=1e-12 * scale)
    assert torch.equal(params["batched"], params["loop"])  # the parameter backward is the same graph
    assert torch.equal(buffers["batched"], buffers["loop"])
    assert torch.equal(val_out["batched"][0], val_out["loop"][0])
    val_scale = val_out["loop"][1].abs().max()
    torch.testing.assert_close(val_out["batched"][1], val_out["loop"][1], rtol=1e-6, atol=1e-12 * val_scale)


class _FiniteCheck(torch.autograd.Function):
    """Identity whose backward reads a tensor's value (.item()): vmap cannot batch that."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(grad).all().item():
            raise FloatingPointError("non-finite gradient")
        return grad


class _CheckedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _FiniteCheck.apply(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_unbatchable_backward_falls_back_to_the_loop():
    torch.manual_seed(0)
    model = _CheckedNet().double().train()
    batches = _batches(5, torch.float64, seed=1)
    groups = find_channel_groups(model, batches[0][0][:1], scope="all")
    reference = _brute_force(model, groups, [torch.ones(g.size) for g in groups], batches)
    gates = GateSet(model, groups).attach()
    risks = _shared_risks(model, gates, batches)
    assert _batched_risk_gradients(risks, gates.domain_gate_tensors()) is None  # vmap refused...
    # ...and left the graph whole: the loop (which frees it) still runs on the same forward
    grads = _risk_gradients(risks, gates, True, False, "batched")
    torch.testing.assert_close(grads, reference, rtol=1e-6, atol=1e-12 * reference.abs().max())
    gates.end_scoring()


def test_unknown_mixed_grads_is_refused():
    model = _CheckedNet().train()
    batches = _batches(5, torch.float32, seed=1)
    gates = GateSet(model, find_channel_groups(model, batches[0][0][:1], scope="all")).attach()
    with pytest.raises(ValueError, match="mixed_grads"):
        gate_gradients(model, gates, batches, "mixed", "vectorised")  # type: ignore[arg-type]
