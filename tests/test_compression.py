"""Physical compression: the compressed model equals the masked one, is smaller, and reloads safely."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dgprune.models import build_model
from dgprune.pruning import (
    GateSet,
    compress,
    find_channel_groups,
    fold_batchnorm,
    model_cost,
    remove_channels,
)
from dgprune.pruning.surgery import STRUCTURE_FILE, WEIGHTS_FILE, load_compressed, save_compressed


def _randomise_normalisation(model):
    """Non-trivial BN statistics and affine terms, so a wrong channel mapping shows up."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)


def _prune_half(gates: GateSet, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    alive = []
    for size in gates.sizes:
        keep = torch.zeros(size, dtype=torch.bool)
        keep[torch.randperm(size, generator=gen)[: max(1, size // 2)]] = True
        alive.append(keep)
    gates.set_alive(torch.cat(alive))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mnist_cnn"])
@pytest.mark.parametrize("scope", ["all", "internal"])
def test_compressed_equals_masked_and_is_smaller(name, scope, tmp_path):
    pixels = 8 if name == "mnist_cnn" else 32
    build = {"name": name, "num_classes": 5, "in_channels": 3, "small_input": True}
    model = build_model(**build)
    _randomise_normalisation(model)
    model.eval()
    x = torch.randn(4, 3, pixels, pixels)
    dense = model_cost(model, x)
    groups = find_channel_groups(model, x[:1], scope=scope)
    if scope == "internal" and name.startswith("resnet"):
        assert all(not g.residual for g in groups)
    gates = GateSet(model, groups).attach()
    _prune_half(gates)
    with torch.no_grad():
        masked = model(x)
    gates.detach()
    pruned = gates.pruned_positions()
    remove_channels(model, pruned, x[:1])
    with torch.no_grad():
        compressed = model(x)
    assert (compressed - masked).abs().max() < 1e-4
    cost = model_cost(model, x)
    assert cost.params < dense.params and cost.macs < dense.macs
    kept = sum(g.size - len(pruned[g.name]) for g in groups)
    assert kept == gates.num_alive()

    save_compressed(tmp_path, model, pruned, build)
    structure = json.loads((tmp_path / STRUCTURE_FILE).read_text())
    assert structure["pruned_channels"] == pruned
    load_file(str(tmp_path / WEIGHTS_FILE))  # plain tensors, no pickle
    reloaded, _ = load_compressed(tmp_path, build_model, x[:1])
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), compressed)
    # the state dict alone also round-trips through torch.load(weights_only=True)
    torch.save(reloaded.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    reloaded.load_state_dict(state)


def test_classifier_outputs_never_gated():
    model = build_model("resnet18", num_classes=7, in_channels=3, small_input=True)
    groups = find_channel_groups(model, torch.zeros(1, 3, 16, 16))
    assert all(g.size != 7 or "fc" not in g.name for g in groups)
    names = {m.module_name for g in groups for m in g.convs + g.norms}
    assert "fc" not in names
    # scope=all adds the four residual stages (stem+layer1, layer2, layer3, layer4)
    assert sum(g.residual for g in groups) == 4
    assert sum(g.size for g in groups) == 64 * 3 + 128 * 3 + 256 * 3 + 512 * 3


@pytest.mark.parametrize(("name", "pixels"), [("resnet18", 16), ("mnist_cnn", 8)])
def test_onnx_export_of_compressed_model_matches(tmp_path, name, pixels):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (it is in the dev extra)")
    from dgprune.pruning.surgery import export_onnx

    model = build_model(name, num_classes=5, in_channels=3, small_input=True)
    _randomise_normalisation(model)
    model.eval()
    x = torch.randn(3, 3, pixels, pixels)
    gates = GateSet(model, find_channel_groups(model, x[:1])).attach()
    _prune_half(gates, seed=3)
    gates.detach()
    remove_channels(model, gates.pruned_positions(), x[:1])
    path = export_onnx(model, tmp_path / "m.onnx", x[:1])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"images": x.numpy()})  # batch 3: the batch axis is dynamic
    with torch.no_grad():
        expected = model(x)
    assert abs(torch.from_numpy(onnx_logits) - expected).max() < 1e-4


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_batchnorm_computes_the_same_without_batchnorm(name):
    model = build_model(name, num_classes=5, in_channels=3, small_input=True)
    _randomise_normalisation(model)  # non-trivial running statistics and affine parameters
    model.train()
    x = torch.randn(3, 3, 32, 32)
    gates = GateSet(model, find_channel_groups(model, x[:1])).attach()
    _prune_half(gates)
    compress(model, gates, x[:1])
    folded = fold_batchnorm(model)
    assert model.training, "the caller's mode is restored"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
