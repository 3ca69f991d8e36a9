"""Budgets in the user's units: ``prune.budget`` (docs/method.md "Budgets").

``filters`` is the share of prunable filters kept (``keep_ratio``, the default schedule); ``params`` and
``macs`` are priced exactly from the channel structure (pruning/cost_model.py); ``latency`` from a
lookup table measured on the deployment runtime (pruning/latency_table.py). The schedule spends the
budget by importance per unit of cost saved (pruning/schedule.py, ``cost``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from dgprune.errors import ConfigError
from dgprune.pruning.cost_model import ChannelStructure, counted_macs
from dgprune.pruning.groups import ChannelGroup
from dgprune.pruning.latency_table import (
    RUNTIMES,
    Conditions,
    LatencyTable,
    Runtime,
    interleaved_ms,
    latency_table,
)

Metric = Literal["filters", "params", "macs", "latency"]
METRICS: tuple[str, ...] = ("filters", "params", "macs", "latency")
# The latency conditions: part of a latency budget, meaningless (and left out of run ids) for the others.
LATENCY_KEYS: dict[str, Any] = {"runtime": "torch", "threads": 1, "batch_size": 1, "grid_points": 8}


class BudgetSettings(BaseModel):
    """``{metric, ratio}`` and, for ``latency``, where it is measured. Also given as text ``METRIC=RATIO``
    (``--budget latency=0.3``, a sweep grid's ``prune.budget: [null, macs=0.5]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Metric = Field(description="filters, params, macs or latency")
    ratio: float = Field(gt=0, le=1, description="share of the dense model's metric that remains")
    runtime: Runtime = Field("torch", description="latency: torch (channels_last) or onnxruntime (CPU)")
    threads: int = Field(1, ge=1, le=1024, description="latency: intra-op threads of the runtime")
    batch_size: int = Field(1, ge=1, le=4096, description="latency: images per forward")
    grid_points: int = Field(
        8, ge=2, le=4096, description="latency: most widths measured per layer axis (interpolated between)"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            return parse_budget(data)
        return data

    @model_validator(mode="after")
    def _latency_keys_only_for_latency(self) -> BudgetSettings:
        if self.metric != "latency":
            given = [key for key, default in LATENCY_KEYS.items() if getattr(self, key) != default]
            if given:
                raise ConfigError(
                    f"prune.budget.{given[0]} is a condition of a latency budget, not of metric {self.metric}"
                )
        return self

    def label(self) -> str:
        return f"{self.metric}={self.ratio:g}"


def parse_budget(text: str) -> dict[str, Any]:
    """``METRIC=RATIO`` (``latency=0.3``) as the mapping ``{metric, ratio}``; ConfigError otherwise."""
    metric, sep, ratio = text.partition("=")
    metric = metric.strip().lower()
    try:
        value = float(ratio)
    except ValueError:
        value = None
    if not sep or metric not in METRICS or value is None:
        raise ConfigError(
            f"budget {text!r}: expected METRIC=RATIO with METRIC one of {', '.join(METRICS)}, "
            "e.g. latency=0.3"
        )
    return {"metric": metric, "ratio": value}


class StructureCost:
    """params or MACs of the widths (exact), for the schedule."""

    def __init__(self, structure: ChannelStructure, metric: str) -> None:
        self.structure, self.metric = structure, metric

    def __call__(self, widths: Sequence[int]) -> float:
        if self.metric == "params":
            return float(self.structure.params(widths))
        return float(self.structure.macs(widths))


class LatencyCost:
    """Predicted latency (ms) of the widths from a measured table, for the schedule."""

    def __init__(self, structure: ChannelStructure, table: LatencyTable) -> None:
        self.structure, self.table = structure, table

    def __call__(self, widths: Sequence[int]) -> float:
        return self.table.predict_ms(self.structure, widths)


def conditions_of(budget: BudgetSettings, input_shape: Sequence[int]) -> Conditions:
    return Conditions(budget.runtime, budget.threads, budget.batch_size, tuple(input_shape))


def budget_cost(
    budget: BudgetSettings | None,
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    example_input: torch.Tensor,
    round_to: int = 1,
    floors: Sequence[int] | None = None,
) -> StructureCost | LatencyCost | None:
    """The schedule's cost for ``budget`` (None: the filters budget, the plain schedule). Call on the
    bare dense model (no gate hooks): a latency table measures it (or reads it from the cache)."""
    if budget is None or budget.metric == "filters":
        return None
    structure = ChannelStructure.of(model, groups, example_input)
    if budget.metric in ("params", "macs"):
        return StructureCost(structure, budget.metric)
    if budget.runtime not in RUNTIMES:  # pragma: no cover - pydantic refuses it first
        raise ConfigError(f"prune.budget.runtime must be one of {', '.join(RUNTIMES)}")
    conditions = conditions_of(budget, example_input.shape[1:])
    table = latency_table(model, structure, conditions, round_to, budget.grid_points, floors)
    return LatencyCost(structure, table)


def measured_ratio(
    budget: BudgetSettings, dense: nn.Module, compressed: nn.Module, example_input: torch.Tensor
) -> float:
    """The budget's metric of the compressed model over the dense one's, measured on the real models:
    parameters and conv/linear MACs counted by Torch-Pruning's counter, latency timed in the budget's
    conditions (latency_table.interleaved_ms: both timed in turn, in rounds)."""
    if budget.metric == "params":
        return sum(p.numel() for p in compressed.parameters()) / sum(p.numel() for p in dense.parameters())
    if budget.metric == "macs":
        return counted_macs(compressed, example_input) / counted_macs(dense, example_input)
    if budget.metric == "latency":
        conditions = conditions_of(budget, example_input.shape[1:])
        compressed_ms, dense_ms = interleaved_ms([compressed, dense], conditions)
        return compressed_ms / dense_ms
    raise ValueError(f"no measured ratio for metric {budget.metric!r}")
