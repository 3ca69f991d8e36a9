"""Issue 18.4: what you ship is what was measured. `dgprune export --int8` (static quantisation calibrated
on source-domain images only) and `dgprune evaluate --onnx` (the exported file under ONNX Runtime)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from dgprune.data import Domain, probe_batch
from dgprune.experiments import deploy
from dgprune.experiments.pipeline import load_model_dir, make_context, model_dir_config

ORT_MISSING = "onnxruntime is not installed (it is in the onnx extra: pip install -e '.[onnx]')"
ONNX_MISSING = "onnx is not installed (it is in the onnx extra: pip install -e '.[onnx]')"
ACCURACY_KEYS = ("intra_acc", "cross_acc", "worst_source_acc", "per_domain_acc", "domain_split_acc")


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory) -> Path:
    """A tiny pretrained + pruned MNIST_CNN on the rotated digits (target 45), through the CLI."""
    pytest.importorskip("onnx", reason=ONNX_MISSING)
    pytest.importorskip("onnxruntime", reason=ORT_MISSING)
    root = tmp_path_factory.mktemp("deploy")
    common = ("--device", "cpu", "-q")
    pre = run_cli(
        "pretrain", "--out", str(root / "pre"), "--target", "45", "--steps", "10",
        "--set", "pretrain.eval_every=10", *common,
    )  # fmt: skip
    assert pre.returncode == 0, pre.stderr
    pruned = run_cli(
        "prune", "--pretrained", str(root / "pre"), "--out", str(root / "pruned"), "--criterion", "taylor",
        "--keep-ratio", "0.5", "--steps", "6", "--set", "prune.interval=2", "--set", "prune.eval_every=6",
        *common,
    )  # fmt: skip
    assert pruned.returncode == 0, pruned.stderr
    return root / "pruned"


@pytest.fixture(scope="module")
def exported(pruned_dir) -> tuple[Path, Path]:
    fp32, int8 = pruned_dir.parent / "m.onnx", pruned_dir.parent / "m.int8.onnx"
    result = run_cli("export", "--model", str(pruned_dir), "--out", str(fp32), "--int8", str(int8))
    assert result.returncode == 0, result.stderr
    assert f"wrote {int8} (int8; calibrated on 256 train images of the sources" in result.stdout
    assert "target 45 unseen" in result.stdout
    return fp32, int8


def _evaluate(*args: str) -> dict:
    result = run_cli("evaluate", *args, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_evaluate_onnx_of_the_fp32_export_equals_evaluate_of_the_saved_model(pruned_dir, exported):
    fp32, _ = exported
    saved = _evaluate("--model", str(pruned_dir))
    shipped = _evaluate("--model", str(pruned_dir), "--onnx", str(fp32))
    for key in ACCURACY_KEYS:  # exactly: the same predictions on every sample
        assert shipped[key] == saved[key], key
    assert saved["latency_runtime"] == "torch" and shipped["latency_runtime"] == "onnxruntime"
    assert shipped["onnx"] == str(fp32) and shipped["onnx_bytes"] == fp32.stat().st_size
    assert shipped["latency_ms"]["batch_1"] > 0 and shipped["latency_device"] == "cpu"


def test_the_fp32_export_predicts_what_the_saved_model_predicts(pruned_dir, exported):
    fp32, _ = exported
    ctx = make_context(model_dir_config(pruned_dir))
    batch = probe_batch([*ctx.split.val, ctx.split.target])  # every domain, target included
    with torch.no_grad():
        expected = load_model_dir(pruned_dir).eval()(batch)
    logits = deploy.OnnxModel(fp32)(batch)
    assert torch.equal(logits.argmax(dim=1), expected.argmax(dim=1))
    assert float((logits - expected).abs().max()) < 1e-4


def test_the_int8_export_is_evaluated_and_reported(pruned_dir, exported):
    fp32, int8 = exported
    report = _evaluate("--model", str(pruned_dir), "--onnx", str(int8), "--latency-batch", "8")
    # Reported, not asserted equal to fp32: quantisation may change some predictions.
    for key in ("intra_acc", "cross_acc"):
        assert 0.0 <= report[key] <= 1.0
    assert set(report["per_domain_acc"]) == {"0", "15", "30", "45", "60", "75"}
    assert set(report["latency_ms"]) == {"batch_1", "batch_8"}
    assert report["latency_runtime"] == "onnxruntime"
    assert report["onnx_bytes"] < fp32.stat().st_size  # int8 weights
    ops = _op_types(int8)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "QuantizeLinear" not in _op_types(fp32)


def _op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


class _Trap:
    """An ImageStore whose images must never be read."""

    def __init__(self, name: str, n: int, shape: tuple[int, ...]) -> None:
        self.name, self.n, self._shape = name, n, shape

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, *self._shape))

    def __len__(self) -> int:
        return self.n

    def select(self, indices: torch.Tensor) -> _Trap:
        return _Trap(self.name, len(indices), self._shape)

    def load(self, indices: torch.Tensor) -> torch.Tensor:
        raise AssertionError(f"int8 calibration read images of {self.name}")

    def prefetch(self, indices: torch.Tensor) -> None:
        raise AssertionError(f"int8 calibration read images of {self.name}")


def _trapped(domain: Domain, what: str) -> Domain:
    return Domain(domain.name, _Trap(f"{what} {domain.name}", len(domain), tuple(domain.images.shape[1:])),
                  domain.labels)  # fmt: skip


def test_int8_calibration_reads_no_target_and_no_val_image(pruned_dir, exported, tmp_path, monkeypatch):
    """The export's own code path (`export_int8`, as the CLI calls it), with the target and the val
    splits replaced by domains that raise when an image is read: only the sources' train parts feed it."""
    fp32, _ = exported
    real_make_context = deploy.make_context

    def booby_trapped(config, dataset=None):
        ctx = real_make_context(config, dataset)
        ctx.split.target = _trapped(ctx.split.target, "the target")
        ctx.split.val = [_trapped(d, "the val split of") for d in ctx.split.val]
        return ctx

    monkeypatch.setattr(deploy, "make_context", booby_trapped)
    config = model_dir_config(pruned_dir)
    calibration = deploy.export_int8(fp32, tmp_path / "trap.int8.onnx", config, 50)
    assert calibration.target == "45" and "45" not in calibration.sources
    assert calibration.sources == ("0", "15", "30", "60", "75") and calibration.images == 50
    assert (tmp_path / "trap.int8.onnx").is_file()


def test_calibration_images_are_a_seeded_even_sample_of_the_source_train_parts(pruned_dir):
    split = make_context(model_dir_config(pruned_dir)).split
    images = deploy.calibration_images(split, 12, seed=0)  # 5 sources: 3, 3, 2, 2, 2
    assert images.shape == (12, *split.train[0].images.shape[1:])
    assert torch.equal(images, deploy.calibration_images(split, 12, seed=0))
    # Each image is one of its source's train images, in the sources' order.
    sizes = [3, 3, 2, 2, 2]
    for part, domain in zip(images.split(sizes), split.train, strict=True):
        pool = domain.eval_batch(torch.arange(len(domain))).flatten(1)
        assert all((pool == row).all(dim=1).any() for row in part.flatten(1))


def test_onnx_usage_errors_are_one_line(pruned_dir, exported, tmp_path):
    fp32, _ = exported
    not_onnx = tmp_path / "not.onnx"
    not_onnx.write_text("hello")
    cases = [
        (("evaluate", "--model", str(pruned_dir), "--onnx", str(not_onnx)), "not a model ONNX Runtime"),
        (("evaluate", "--model", str(pruned_dir), "--onnx", str(tmp_path / "none.onnx")), "no such file"),
        (("export", "--model", str(pruned_dir), "--out", str(fp32), "--int8", str(fp32)), "same file"),
    ]
    for args, fragment in cases:
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
        assert fragment in result.stderr


def test_without_onnxruntime_the_error_names_the_extra(monkeypatch):
    from dgprune.errors import ConfigError
    from dgprune.pruning.onnx_runtime import require_onnxruntime

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when absent
    with pytest.raises(ConfigError, match=r"needs onnxruntime: pip install 'dgprune\[onnx\]'"):
        require_onnxruntime()
