"""Models: MaskableGroupNorm (masking == pruning), MnistCnn, build_model and weights loading."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from safetensors.torch import save_file
from torch import nn

from dgprune.errors import ConfigError, WeightsError
from dgprune.models import CUSTOM_PRUNERS, MODEL_NAMES, MaskableGroupNorm, MnistCnn, build_model


def randomised_norm(groups: int, channels: int) -> MaskableGroupNorm:
    norm = MaskableGroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def reference_alive_norm(x: torch.Tensor, norm: MaskableGroupNorm) -> torch.Tensor:
    """Normalise each alive channel with the statistics of its group's alive channels, by hand."""
    out = torch.full_like(x, float("nan"))  # dead channels stay NaN: they are not compared
    for n in range(x.shape[0]):
        for g in range(norm.num_groups):
            chans = [c for c in range(norm.num_channels) if norm.group_index[c] == g and norm.alive[c] > 0]
            if not chans:
                continue
            values = x[n, chans]
            mean, var = values.mean(), values.var(unbiased=False)
            for c in chans:
                out[n, c] = (x[n, c] - mean) / torch.sqrt(var + norm.eps) * norm.weight[c] + norm.bias[c]
    return out


# ---------------------------------------------------------------- MaskableGroupNorm


def test_all_alive_is_exactly_group_norm() -> None:
    torch.manual_seed(0)
    norm = randomised_norm(4, 16)
    plain = nn.GroupNorm(4, 16)
    plain.load_state_dict({"weight": norm.weight, "bias": norm.bias})
    x = torch.randn(3, 16, 5, 5, requires_grad=True)
    assert norm.is_plain()
    assert torch.equal(norm(x), plain(x))


def test_general_path_agrees_with_group_norm_values_and_gradients() -> None:
    torch.manual_seed(0)
    norm = randomised_norm(4, 16)
    x = torch.randn(3, 16, 5, 5, requires_grad=True)
    y_fast = norm(x)
    y_general = norm._alive_group_norm(x)  # the masked/pruned code path, on an unpruned layer
    torch.testing.assert_close(y_general, y_fast, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(y_fast)
    grads_fast = torch.autograd.grad(y_fast, (x, norm.weight, norm.bias), upstream)
    grads_general = torch.autograd.grad(y_general, (x, norm.weight, norm.bias), upstream)
    for a, b in zip(grads_fast, grads_general, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_masked_channels_are_left_out_of_statistics() -> None:
    torch.manual_seed(0)
    norm = randomised_norm(4, 16)
    alive = torch.ones(16, dtype=torch.bool)
    alive[[0, 1, 5, 9]] = False
    alive[12:16] = False  # group 3 entirely dead
    norm.set_alive(alive)
    assert not norm.is_plain()
    x = torch.randn(2, 16, 3, 3) * 3 + 1
    y = norm(x)
    expected = reference_alive_norm(x, norm)
    torch.testing.assert_close(y[:, alive], expected[:, alive], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(y).all()  # dead channels and the empty group: anything finite


def test_masked_statistics_stay_float32_under_autocast() -> None:
    torch.manual_seed(0)
    norm = randomised_norm(4, 16)
    norm.set_alive(torch.arange(16) % 5 != 0)
    x = torch.randn(2, 16, 3, 3) * 10 + 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, norm(x), atol=1e-5, rtol=1e-5)


def test_set_alive_checks_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        MaskableGroupNorm(2, 8).set_alive(torch.ones(7))


def gated(model: MnistCnn, layer: str, dead: list[int]) -> MnistCnn:
    """Masked copy: channels `dead` of `layer`'s norm are left out of statistics and zeroed after it."""
    masked = copy.deepcopy(model)
    norm: MaskableGroupNorm = getattr(masked, layer)
    keep = torch.ones(norm.num_channels)
    keep[dead] = 0
    norm.set_alive(keep)
    norm.register_forward_hook(lambda _m, _i, out: out * keep.view(1, -1, 1, 1))
    return masked


def test_pruned_mnist_cnn_equals_masked() -> None:
    torch.manual_seed(0)
    model = MnistCnn(1, 10).eval()
    x = torch.randn(5, 1, 8, 8)
    dead1 = [0, 1, 2, 3, 4, 5, 6, 7, 13, 40]  # empties group 0 of norm1 completely
    dead3 = [3, 17, 18, 100]
    masked = gated(gated(model, "norm1", dead1), "norm3", dead3)

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, customized_pruners=CUSTOM_PRUNERS)
    graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, dead1).prune()
    graph.get_pruning_group(model.conv3, tp.prune_conv_out_channels, dead3).prune()

    assert model.conv1.out_channels == model.norm1.num_channels == model.conv2.in_channels == 54
    assert model.norm3.num_channels == model.conv4.in_channels == 124
    assert model.norm1.num_groups == 8 and model.norm1.group_index.shape == (54,)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=0)

    # A graph built on the already-pruned model (general path traced) still prunes correctly.
    masked = gated(model, "norm1", [0, 20])
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, customized_pruners=CUSTOM_PRUNERS)
    graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, [0, 20]).prune()
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=0)


def test_stock_group_norm_pruner_is_detected() -> None:
    model = MnistCnn(1, 10)
    x = torch.randn(2, 1, 8, 8)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)  # forgot CUSTOM_PRUNERS
    graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, list(range(8))).prune()
    with pytest.raises(RuntimeError, match="CUSTOM_PRUNERS"):
        model(x)


# ---------------------------------------------------------------- build_model


@pytest.mark.parametrize(
    ("name", "in_channels", "small_input", "size"),
    [
        ("mnist_cnn", 1, False, 8),
        ("resnet18", 1, True, 16),
        ("resnet18", 3, False, 32),
        ("resnet50", 3, True, 8),
    ],
)
def test_build_model_logits(name: str, in_channels: int, small_input: bool, size: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels, small_input=small_input).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 7)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 7
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_small_input_stem() -> None:
    default = build_model("resnet18", 10, 3)
    small = build_model("resnet18", 10, 3, small_input=True)
    gray = build_model("resnet18", 10, 1)
    assert default.conv1.kernel_size == (7, 7) and default.conv1.stride == (2, 2)
    assert isinstance(default.maxpool, nn.MaxPool2d)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert gray.conv1.in_channels == 1 and gray.conv1.kernel_size == (7, 7)


def test_resnet_is_prunable_by_dependency_graph() -> None:
    model = build_model("resnet18", 5, 3, small_input=True).eval()
    x = torch.randn(1, 3, 16, 16)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    graph.get_pruning_group(model.layer1[0].conv1, tp.prune_conv_out_channels, [0, 1, 2]).prune()
    assert model.layer1[0].conv1.out_channels == 61
    assert model(x).shape == (1, 5)


def assert_same_state(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if not key.startswith(skip):
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    source = build_model("mnist_cnn", 10, 1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = build_model("mnist_cnn", 10, 1, weights=path)
    assert_same_state(source, loaded)


def test_pretrained_weights_into_new_head_and_stem(tmp_path: Path) -> None:
    imagenet_like = build_model("resnet18", 1000, 3)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(imagenet_like.state_dict(), path)
    model = build_model("resnet18", 7, 3, weights=path)
    assert model.fc.out_features == 7
    assert_same_state(imagenet_like.layer1, model.layer1)
    assert torch.equal(model.conv1.weight, imagenet_like.conv1.weight)
    small = build_model("resnet18", 7, 3, small_input=True, weights=str(path))  # conv1 3x3: kept as built
    assert small.conv1.kernel_size == (3, 3)
    assert torch.equal(small.layer4[1].bn2.weight, imagenet_like.layer4[1].bn2.weight)


def test_weights_mismatch_outside_head_is_an_error(tmp_path: Path) -> None:
    state = build_model("resnet18", 10, 3).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"layer2\.0\.conv1\.weight"):
        build_model("resnet18", 10, 3, weights=path)
    del state["layer2.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing layer2\.0\.conv1\.weight"):
        build_model("resnet18", 10, 3, weights=path)
    with pytest.raises(WeightsError, match="do not fit"):
        build_model("resnet50", 10, 3, weights=path)


def test_missing_weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth") as info:
        build_model("resnet18", 7, 3, weights=path)
    assert str(path) in str(info.value)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=r"resnet50-11ad3fa6\.pth"):
        build_model("resnet50", 7, 3, weights="imagenet")


def test_unreadable_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        build_model("mnist_cnn", 10, 1, weights=path)


def test_unknown_model_name() -> None:
    with pytest.raises(ConfigError, match="resnet18") as info:
        build_model("vgg16", 10, 3)
    assert all(name in str(info.value) for name in MODEL_NAMES)
