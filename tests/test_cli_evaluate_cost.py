"""`dgprune evaluate` reports the model's cost next to its accuracy: params, MACs and measured latency."""

import json

import torch
import torch_pruning as tp
from conftest import run_cli

from dgprune.models import build_model
from dgprune.pruning import remove_channels, save_compressed

BUILD = {"name": "mnist_cnn", "num_classes": 10, "in_channels": 1, "small_input": False}


def test_evaluate_reports_params_macs_and_latency(tmp_path):
    example = torch.zeros(1, 1, 8, 8)  # the embedded rotated_digits images
    dense_macs, dense_params = tp.utils.count_ops_and_params(build_model(**BUILD), example)
    model = build_model(**BUILD)
    pruned = {"conv2": list(range(64))}  # half of conv2's filters
    remove_channels(model, pruned, example)
    save_compressed(tmp_path / "model", model, pruned, BUILD, (1, 8, 8))

    args = ("evaluate", "--model", str(tmp_path / "model"), "--target", "45", "--device", "cpu")
    result = run_cli(*args, "--latency-batch", "4", timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["params"] == sum(p.numel() for p in model.parameters()) < dense_params
    assert 0 < report["macs"] < dense_macs
    assert set(report["latency_ms"]) == {"batch_1", "batch_4"}
    assert all(ms > 0 for ms in report["latency_ms"].values())
    assert report["latency_device"] == "cpu" and report["latency_threads"] >= 1
    assert 0.0 <= report["cross_acc"] <= 1.0

    bad = run_cli(*args, "--latency-batch", "0", timeout=120)
    assert bad.returncode != 0 and "latency-batch" in bad.stderr
