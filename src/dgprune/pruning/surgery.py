"""Physical removal of pruned channels (Torch-Pruning), and saving/loading compressed models.

A compressed model is stored as ``model.safetensors`` plus ``structure.json``: how to build the
dense architecture and which channels of which group were removed. Loading rebuilds the dense
model, replays the same removals and loads the tensors: no pickled code is ever executed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from safetensors.torch import load_file, save_file
from torch import nn

from dgprune.errors import DgpruneError, WeightsError
from dgprune.pruning.gates import GateSet
from dgprune.pruning.groups import build_dependency_graph
from dgprune.pruning.measure import ModelCost, model_cost  # noqa: F401  (their old home: re-exported)

STRUCTURE_FILE = "structure.json"
WEIGHTS_FILE = "model.safetensors"

PathLike = str | os.PathLike[str]  # a model directory: a str path or a Path


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
    directory: PathLike,
    model: nn.Module,
    pruned: dict[str, list[int]],
    build_spec: dict[str, Any],
    input_shape: tuple[int, ...] | None = None,
) -> None:
    """Write the compressed ``model`` with what is needed to rebuild its architecture.

    ``input_shape`` (C, H, W) lets the model be traced again without its dataset.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights_path = directory / WEIGHTS_FILE
    save_file(state, str(weights_path))
    # safetensors writes through a private temporary file (mode 0600) renamed into place: give the
    # weights the mode of any new file, as their sibling files get, so that they can be shared alike.
    os.chmod(weights_path, _new_file_mode())
    structure = {
        "format": "dgprune.compressed/1",
        "build": build_spec,
        "input_shape": list(input_shape) if input_shape else None,
        "pruned_channels": pruned,
    }
    (directory / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1))


# The arguments of build_model that a structure.json may give (never `weights`: the file holds them).
BUILD_KEYS: dict[str, type] = {
    "name": str,
    "num_classes": int,
    "in_channels": int,
    "small_input": bool,
}
_REQUIRED_BUILD_KEYS = ("name", "num_classes", "in_channels")


def load_compressed(
    directory: PathLike, build_model: Callable[..., nn.Module], example_input: torch.Tensor | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by :func:`save_compressed` (``directory``: a str or a Path); returns it,
    in training mode on the CPU, and its structure description.

    A damaged directory (missing or truncated files, a structure.json that does not describe this
    model, weights of other shapes) raises WeightsError naming the file and the problem.
    """
    directory = Path(directory)
    structure_path = directory / STRUCTURE_FILE
    structure = _read_structure_file(structure_path)
    if example_input is None:
        if not structure.get("input_shape"):
            raise WeightsError(f"{structure_path}: no input_shape recorded; pass example_input")
        example_input = torch.zeros(1, *structure["input_shape"])
    if example_input.shape[1] != structure["build"]["in_channels"]:
        raise WeightsError(
            f"{structure_path}: the model takes {structure['build']['in_channels']}-channel images, "
            f"the data has {example_input.shape[1]} channels"
        )
    try:
        model = build_model(**structure["build"])
    except DgpruneError as err:  # e.g. an unknown model name: say which file asked for it
        raise WeightsError(f"{structure_path}: build: {err}") from None
    _check_pruned_channels(structure_path, model, structure["pruned_channels"])
    remove_channels(model, structure["pruned_channels"], example_input)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise WeightsError(f"{weights_path}: missing (the model directory is incomplete)")
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        detail = " ".join(str(err).split()) or type(err).__name__
        raise WeightsError(f"{weights_path}: not a readable safetensors file ({detail})") from None
    _check_state_fits(weights_path, model, state)
    model.load_state_dict(state)
    return model, structure


def _read_structure_file(path: Path) -> dict[str, Any]:
    """structure.json, checked field by field: nothing in it reaches build_model unchecked."""
    if not path.is_file():
        raise WeightsError(f"{path}: missing (not a dgprune model directory)")
    try:
        structure = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(structure, dict):
        raise WeightsError(f"{path}: expected a JSON object with build, input_shape and pruned_channels")
    build = structure.get("build")
    if not isinstance(build, dict):
        raise WeightsError(f"{path}: build: expected an object of {', '.join(BUILD_KEYS)}, got {build!r}")
    unknown = sorted(set(build) - set(BUILD_KEYS))
    if unknown:
        valid = ", ".join(BUILD_KEYS)
        raise WeightsError(f"{path}: build: unknown key(s) {', '.join(unknown)}; valid: {valid}")
    for key in _REQUIRED_BUILD_KEYS:
        if key not in build:
            raise WeightsError(f"{path}: build: missing {key!r}")
    for key, value in build.items():
        expected = BUILD_KEYS[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise WeightsError(f"{path}: build.{key}: expected a {expected.__name__}, got {value!r}")
    shape = structure.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)
    ):
        raise WeightsError(f"{path}: input_shape: expected positive integers [C, H, W], got {shape!r}")
    pruned = structure.get("pruned_channels", {})
    if not isinstance(pruned, dict) or not all(
        isinstance(idxs, list) and all(type(i) is int for i in idxs) for idxs in pruned.values()
    ):
        raise WeightsError(f"{path}: pruned_channels: expected an object of layer name -> list of integers")
    structure["pruned_channels"] = pruned
    return structure


def saved_input_shape(directory: PathLike) -> tuple[int, ...]:
    """The (C, H, W) input recorded in a model directory's structure.json: what traces the model
    without its dataset (ONNX export)."""
    path = Path(directory) / STRUCTURE_FILE
    shape = _read_structure_file(path).get("input_shape")
    if not shape:
        raise WeightsError(f"{path}: no input_shape recorded: cannot trace the model")
    return tuple(shape)


def _new_file_mode() -> int:
    """The mode a newly created file gets here: 0o666 less the process umask."""
    mask = os.umask(0o077)  # reading the umask sets it: set a strict one for that instant
    os.umask(mask)
    return 0o666 & ~mask


def _check_pruned_channels(path: Path, model: nn.Module, pruned: dict[str, list[int]]) -> None:
    """Every pruned index names an existing output channel of a conv of the model, at most once."""
    modules = dict(model.named_modules())
    for layer, idxs in pruned.items():
        if not idxs:
            continue
        conv = modules.get(layer)
        if not isinstance(conv, nn.Conv2d):
            raise WeightsError(f"{path}: pruned_channels: {layer!r} is not a convolution of the model")
        width = conv.out_channels
        bad = [i for i in idxs if not 0 <= i < width]
        if bad:
            raise WeightsError(
                f"{path}: pruned_channels: {layer}: channel index {bad[0]} is out of range "
                f"(the layer has {width} channels, 0..{width - 1})"
            )
        if len(set(idxs)) != len(idxs):
            raise WeightsError(f"{path}: pruned_channels: {layer}: a channel index is listed twice")
        if len(idxs) >= width:
            raise WeightsError(f"{path}: pruned_channels: {layer}: removes all {width} channels")


def _check_state_fits(path: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """One line on the first mismatch, instead of load_state_dict's multi-line RuntimeError."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        extra = len(missing) + len(unexpected) - 1
        raise WeightsError(
            f"{path}: tensors do not match the architecture in {STRUCTURE_FILE}: {what}"
            + (f" (and {extra} more)" if extra else "")
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, but the architecture in "
                f"{STRUCTURE_FILE} needs {tuple(tensor.shape)}"
            )


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
        verbose=False,  # not its eight "[torch.onnx] ..." progress lines; failures still raise
    )
    model.train(was_training)
    return path
