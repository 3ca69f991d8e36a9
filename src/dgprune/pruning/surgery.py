"""Physical removal of pruned channels (Torch-Pruning), and saving/loading compressed models.

A compressed model is stored as ``model.safetensors`` plus ``structure.json``: how to build the
dense architecture and which channels of which group were removed. Loading rebuilds the dense
model, replays the same removals and loads the tensors: no pickled code is ever executed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from safetensors.torch import load_file, save_file
from torch import nn

from dgprune.pruning.gates import GateSet
from dgprune.pruning.groups import build_dependency_graph

STRUCTURE_FILE = "structure.json"
WEIGHTS_FILE = "model.safetensors"


def remove_channels(model: nn.Module, pruned: dict[str, list[int]], example_input: torch.Tensor) -> nn.Module:
    """Physically delete ``pruned[root_conv_name]`` output channels (and everything coupled), in place.

    The model must carry no gate hooks (Torch-Pruning traces it). Rebuild any optimizer afterwards:
    the pruned parameters are new tensors.
    """
    was_training = model.training
    model.eval()
    graph = build_dependency_graph(model, example_input)
    modules = dict(model.named_modules())
    for root_name, idxs in pruned.items():
        if not idxs:
            continue
        group = graph.get_pruning_group(modules[root_name], tp.prune_conv_out_channels, idxs=sorted(idxs))
        group.prune()
    model.train(was_training)
    return model


def compress(model: nn.Module, gates: GateSet, example_input: torch.Tensor) -> dict[str, list[int]]:
    """Remove the gate hooks, then physically delete every pruned channel; returns what was removed."""
    gates.detach()  # Torch-Pruning must trace the bare model
    pruned = gates.pruned_positions()
    remove_channels(model, pruned, example_input)
    return pruned


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


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` (eval mode) with each BatchNorm folded into the conv before it.

    One op fewer per conv: the compressed ResNet-18 gets closer to its MACs ratio on CPU
    (docs/benchmarks.md). Uses torch.fx (the model must be symbolically traceable, as torchvision's
    ResNets are); GroupNorm is left as it is. The result is for running, not for saving or pruning.
    """
    from torch.fx.experimental.optimization import fuse

    was_training = model.training
    folded = fuse(model.eval())  # a deep copy
    model.train(was_training)
    return folded


def save_compressed(
    directory: Path,
    model: nn.Module,
    pruned: dict[str, list[int]],
    build_spec: dict[str, Any],
    input_shape: tuple[int, ...] | None = None,
) -> None:
    """Write the compressed ``model`` with what is needed to rebuild its architecture.

    ``input_shape`` (C, H, W) lets the model be traced again without its dataset.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    structure = {
        "format": "dgprune.compressed/1",
        "build": build_spec,
        "input_shape": list(input_shape) if input_shape else None,
        "pruned_channels": pruned,
    }
    (directory / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1))


def load_compressed(
    directory: Path, build_model: Callable[..., nn.Module], example_input: torch.Tensor | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by :func:`save_compressed`; returns it and its structure description."""
    structure = json.loads((directory / STRUCTURE_FILE).read_text())
    if example_input is None:
        if not structure.get("input_shape"):
            raise ValueError(f"{directory}: no input_shape recorded; pass example_input")
        example_input = torch.zeros(1, *structure["input_shape"])
    model = build_model(**structure["build"])
    remove_channels(model, structure["pruned_channels"], example_input)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model, structure


def export_onnx(model: nn.Module, path: Path, example_input: torch.Tensor) -> Path:
    """Export a (compressed) model to ONNX with torch's exporter, batch size dynamic.

    Needs the ``onnx`` extra (onnx + onnxscript). MaskableGroupNorm exports as plain tensor ops.
    """
    try:
        import onnx  # noqa: F401  (torch's exporter needs it; fail with a clear message)
    except ImportError as err:
        raise ImportError("ONNX export needs `pip install 'dgprune[onnx]'`") from err
    was_training = model.training
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (example_input[:1],),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        external_data=False,
    )
    model.train(was_training)
    return path
