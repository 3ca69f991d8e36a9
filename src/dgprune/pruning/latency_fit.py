"""The latency table calibrated on whole models (docs/method.md "Budgets", docs/benchmarks.md §8).

The table times each convolution alone. A whole model also spends time in the element-wise layers
between them (normalisation, activation, addition), whose cost shrinks with the widths, and its
convolutions may run faster or slower inside the graph than alone (caches, fused layers, layout
changes). So the prediction is fitted to real measurements of the model itself, dense and narrowed:

    predicted ms = conv_scale * (sum of the table's entries)
                   + ms_per_kilo_activation * (conv output elements / 1000)
                   + constant_ms

``conv_scale`` and ``ms_per_kilo_activation`` are kept >= 0, so removing a channel never adds predicted
latency. The calibration models are the dense one, every group at its floor, and every group at
1/4, 1/2 and 3/4 of its width (rounded to ``round_to``, not below the floor): each built for real
(Torch-Pruning removes the channels) and timed like any model in the budget's conditions. Budgets are
ratios to the dense model, so the fit goes through the dense model exactly (the constant) and
minimises the squared *relative* error of the narrowed ones.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dgprune.pruning.cost_model import ChannelStructure

CALIBRATION_FRACTIONS = (0.25, 0.5, 0.75)  # besides the dense widths and the floors


@dataclass
class LatencyFit:
    conv_scale: float
    ms_per_kilo_activation: float
    constant_ms: float
    # each calibration model: its widths' share of the filters, measured and fitted ms
    points: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, conv_ms: float, activations: float) -> float:
        return self.conv_scale * conv_ms + self.ms_per_kilo_activation * activations / 1000 + self.constant_ms


def calibration_widths(group_sizes: Sequence[int], floors: Sequence[int], round_to: int) -> list[list[int]]:
    """The narrowed widths to measure: the floors, then each group at every CALIBRATION_FRACTIONS
    share of its size; distinct, the dense widths left out (measured anyway)."""
    q = max(round_to, 1)
    candidates = [list(floors)]
    for fraction in CALIBRATION_FRACTIONS:
        candidates.append(
            [
                min(n, max(low, q * round(fraction * n / q)))
                for n, low in zip(group_sizes, floors, strict=True)
            ]
        )
    distinct: list[list[int]] = []
    for widths in candidates:
        if widths != list(group_sizes) and widths not in distinct:
            distinct.append(widths)
    return distinct


def narrowed_copy(
    model: nn.Module, structure: ChannelStructure, widths: Sequence[int], example_input: torch.Tensor
) -> nn.Module:
    """A CPU copy of the dense ``model`` with each group cut to ``widths`` (its last channels removed,
    with everything coupled to them): which channels go does not change the latency."""
    from dgprune.pruning.surgery import remove_channels

    first_conv: dict[int, str] = {}
    for layer in structure.layers:
        if layer.kind == "conv" and layer.out_group is not None:
            first_conv.setdefault(layer.out_group, layer.name)
    pruned = {
        first_conv[group]: list(range(width, size))
        for group, (width, size) in enumerate(zip(widths, structure.group_sizes, strict=True))
        if width < size
    }
    narrowed = copy.deepcopy(model).cpu()
    return remove_channels(narrowed, pruned, example_input.cpu()[:1]).eval()


def fit_to_samples(
    structure: ChannelStructure,
    conv_ms: Callable[[Sequence[int]], float],
    samples: Sequence[tuple[Sequence[int], float]],
) -> LatencyFit:
    """The fit to measured ``samples`` (widths, ms) of whole models; ``conv_ms(widths)``: the table's
    sum of entries. The fit keeps every sample with its measured and fitted latency."""
    features = [(conv_ms(widths), structure.activations(widths)) for widths, _ in samples]
    fit = fit_latency(features, [ms for _, ms in samples])
    total = sum(structure.group_sizes)
    fit.points = [
        {"filters": sum(widths) / total, "measured_ms": ms, "fitted_ms": fit(*feature)}
        for (widths, ms), feature in zip(samples, features, strict=True)
    ]
    return fit


def fit_latency(features: Sequence[tuple[float, float]], measured: Sequence[float]) -> LatencyFit:
    """The fit through the first sample (the dense model) exactly, since budgets are ratios to it:
    the constant is what makes it exact, and conv_scale, ms_per_kilo_activation >= 0 minimise the
    squared relative error of the other samples (the unconstrained fit when it obeys the signs, else
    the better of the two with one of them at 0). No other sample, or no slope >= 0 that fits: the
    uncalibrated prediction (conv_scale 1, the constant the dense model's latency minus its entries)."""
    conv = np.array([f[0] for f in features], dtype=float)
    kilo = np.array([f[1] for f in features], dtype=float) / 1000
    target = np.array(measured, dtype=float)
    # with the dense sample exact: measured_i - measured_0 = a (conv_i - conv_0) + b (kilo_i - kilo_0)
    columns = {"conv": (conv[1:] - conv[0]) / target[1:], "act": (kilo[1:] - kilo[0]) / target[1:]}
    rhs = (target[1:] - target[0]) / target[1:]
    best: tuple[float, dict[str, float]] | None = None
    for size in (2, 1):
        for names in itertools.combinations(("conv", "act"), size):
            if len(names) > len(rhs):
                continue
            design = np.column_stack([columns[n] for n in names])
            solution, *_ = np.linalg.lstsq(design, rhs, rcond=None)
            if np.any(solution < 0):
                continue
            error = float(np.sum((design @ solution - rhs) ** 2))
            if best is None or error < best[0] - 1e-12:
                best = (error, dict(zip(names, solution.tolist(), strict=True)))
        if best is not None:
            break  # the richest model that obeys the signs
    slopes = best[1] if best is not None else {"conv": 1.0}
    a, b = slopes.get("conv", 0.0), slopes.get("act", 0.0)
    return LatencyFit(a, b, float(target[0] - a * conv[0] - b * kilo[0]))
