"""`build_model`: the one entry point that turns a model name (and optional weights file) into a module.

The model registry (``MODELS``) maps each name to a builder ``(num_classes, in_channels, small_input) ->
nn.Module``; adding a model is one builder plus its registry line (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from dgprune.errors import ConfigError, WeightsError
from dgprune.models.mnist_cnn import MnistCnn
from dgprune.models.resnet import build_resnet
from dgprune.registry import Registry

# (num_classes, in_channels, small_input) -> the dense model, its classifier an nn.Linear named `fc`.
ModelBuilder = Callable[[int, int, bool], nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")


def _mnist_cnn(num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
    return MnistCnn(in_channels, num_classes)  # always a small-input model


MODELS.register("mnist_cnn", _mnist_cnn)
MODELS.register("resnet18", partial(build_resnet, "resnet18"))
MODELS.register("resnet50", partial(build_resnet, "resnet50"))

MODEL_NAMES: tuple[str, ...] = MODELS.names()  # the built-in models

# torchvision's ImageNet checkpoints (IMAGENET1K_V1), looked up in torch's hub cache for weights="imagenet".
IMAGENET_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-11ad3fa6.pth"}

# Parameters that legitimately differ from a pretrained file: the class head and the input stem.
_REPLACEABLE_PREFIXES = ("fc.", "conv1.")
# State that a file may lack: derived or bookkeeping buffers that keep their initial values.
_OPTIONAL_SUFFIXES = (".num_batches_tracked", ".group_index", ".alive")


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    small_input: bool = False,
    weights: str | Path | None = None,
) -> nn.Module:
    """Build a model by name; the classifier is always the `fc` attribute (an `nn.Linear`).

    `small_input` applies to ResNets (mnist_cnn is always a small-input model). `weights` is a local
    file (a torch-saved state_dict or `.safetensors`), or "imagenet" for torchvision's ImageNet file in
    torch's hub cache. The head and stem are skipped when their shapes differ from the file's.
    """
    name = MODELS.resolve(name)  # ConfigError listing the valid names
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    model = MODELS[name](num_classes, in_channels, small_input)
    if weights is not None:
        load_weights(model, resolve_weights(name, weights))
    return model


def imagenet_weights_help(name: str) -> str:
    file = IMAGENET_FILES.get(name, "<torchvision file>")
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"For ImageNet weights of {name}, get torchvision's IMAGENET1K_V1 file {file} "
        f"(https://download.pytorch.org/models/{file}) and put it in {hub} "
        "(weights: imagenet) or pass its path as weights."
    )


def resolve_weights(name: str, weights: str | Path) -> Path:
    """The file to load: "imagenet" means torchvision's file in torch's hub cache, else a path."""
    if str(weights).lower() == "imagenet":
        if name not in IMAGENET_FILES:
            raise ConfigError(f"no ImageNet weights for {name!r}; they exist for {', '.join(IMAGENET_FILES)}")
        path = Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILES[name]
    else:
        path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}. {imagenet_weights_help(name)}")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file or a torch file, without unpickling code (weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickled code, wrong format: all mean "cannot use this file"
        raise WeightsError(f"cannot read weights from {path}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the state_dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    # Saved from nn.DataParallel / DistributedDataParallel: drop the wrapper's prefix.
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state_dict leniently for the head and stem, strictly for everything else."""
    state = read_state_dict(path)
    own = model.state_dict()
    skipped, problems = [], []
    for key, value in state.items():
        if key not in own:
            problems.append(f"unexpected {key}")
        elif value.shape != own[key].shape:
            if key.startswith(_REPLACEABLE_PREFIXES):
                skipped.append(key)
            else:
                problems.append(f"{key}: file {tuple(value.shape)}, model {tuple(own[key].shape)}")
    for key in own:
        optional = key.startswith(_REPLACEABLE_PREFIXES) or key.endswith(_OPTIONAL_SUFFIXES)
        if key not in state and not optional:
            problems.append(f"missing {key}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise WeightsError(f"weights in {path} do not fit {type(model).__name__}: {shown}")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
