"""`dgprune export` and `dgprune prune --round-mode` as a user runs them."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from dgprune.models import build_model
from dgprune.pruning.surgery import load_compressed, remove_channels, save_compressed

ORT_MISSING = "onnxruntime is not installed (it is in the dev extra: pip install -e '.[dev]')"


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        ({"name": "mnist_cnn", "num_classes": 10, "in_channels": 1, "small_input": False}, (1, 28, 28)),
        ({"name": "resnet18", "num_classes": 7, "in_channels": 3, "small_input": True}, (3, 32, 32)),
    ],
)
def test_exported_onnx_equals_the_compressed_torch_model(tmp_path, spec, shape):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
    ort = pytest.importorskip("onnxruntime", reason=ORT_MISSING)
    torch.manual_seed(0)
    model = build_model(**spec).eval()
    for module in model.modules():  # non-trivial normalisation statistics, so that BN folding is tested
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    first_conv = next(name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    widths = {name: m.out_channels for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    pruned = {first_conv: list(range(0, widths[first_conv], 3))}
    remove_channels(model, pruned, torch.zeros(1, *shape))
    save_compressed(tmp_path / "model", model, pruned, spec, shape)

    result = run_cli("export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.onnx").is_file()

    reloaded, _ = load_compressed(tmp_path / "model", build_model)
    reloaded.eval()
    x = torch.randn(4, *shape)  # batch 4: the exported batch axis is dynamic
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = reloaded(x)
    assert onnx_logits.shape == tuple(expected.shape)
    assert float((torch.from_numpy(onnx_logits) - expected).abs().max()) < 1e-4


def test_prune_refuses_an_unknown_round_mode_naming_the_valid_ones(tmp_path):
    result = run_cli(
        "prune", "--pretrained", str(tmp_path / "pre"), "--out", str(tmp_path / "out"),
        "--round-mode", "nearest",
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "prune.round_mode" in result.stderr and "'budget' or 'per_layer'" in result.stderr
    assert "nearest" in result.stderr
