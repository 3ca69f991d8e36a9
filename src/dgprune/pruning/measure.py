"""Measurements of a (dense or compressed) model: parameters and MACs, latency, layer widths.

What a result record and a sweep row report about a model beyond its accuracy (docs/experiments.md:
``params``, ``macs``, ``latency_ms``, ``layer_widths``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn


@dataclass(frozen=True)
class ModelCost:
    params: int
    macs: int


def model_cost(model: nn.Module, example_input: torch.Tensor) -> ModelCost:
    """Parameters and multiply-accumulates of one forward pass of ``example_input`` (batch 1)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_input[:1])
    model.train(was_training)
    return ModelCost(params=int(params), macs=int(macs))


def measure_latency_ms(
    model: nn.Module, example_input: torch.Tensor, reps: int = 20, warmup: int = 3
) -> float:
    """Median wall time of one forward pass of ``example_input`` in eval mode, in milliseconds.

    Measured while other work may be running (e.g. other sweep workers): compare latencies measured
    in the same conditions only.
    """
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            start = time.perf_counter()
            model(example_input)
            if example_input.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution, by module name, in module order."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def layer_widths(compressed: nn.Module, dense: nn.Module) -> list[list]:
    """[conv name, output channels kept, dense output channels] for every conv of ``compressed``, in
    module order; ``dense`` is the architecture before pruning (a conv it lacks counts as unpruned)."""
    before = conv_widths(dense)
    return [[name, kept, before.get(name, kept)] for name, kept in conv_widths(compressed).items()]
