"""Gates, criteria, schedule and surgery: the paper's method (docs/method.md: gates, scores, compression)."""

from dgprune.pruning.criteria import CRITERIA, Criterion, ScoreInputs, make_criterion
from dgprune.pruning.gates import GateSet
from dgprune.pruning.groups import SCOPES, ChannelGroup, find_channel_groups
from dgprune.pruning.measure import ModelCost, measure_latency_ms, model_cost
from dgprune.pruning.schedule import PruningSchedule, target_channels
from dgprune.pruning.scoring import DomainStep, per_domain_forward_backward
from dgprune.pruning.surgery import (
    compress,
    export_onnx,
    fold_batchnorm,
    load_compressed,
    remove_channels,
    save_compressed,
)

__all__ = [
    "CRITERIA",
    "SCOPES",
    "ChannelGroup",
    "Criterion",
    "DomainStep",
    "GateSet",
    "ModelCost",
    "PruningSchedule",
    "ScoreInputs",
    "compress",
    "export_onnx",
    "find_channel_groups",
    "fold_batchnorm",
    "load_compressed",
    "make_criterion",
    "measure_latency_ms",
    "model_cost",
    "per_domain_forward_backward",
    "remove_channels",
    "save_compressed",
    "target_channels",
]
