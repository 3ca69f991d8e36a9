"""What a model costs as a function of its channel groups' widths: parameters and MACs, exactly.

A budget in the user's units (``prune.budget``, docs/method.md "Budgets") needs the cost of the model the
schedule *would* leave, at every pruning event, without compressing it. The cost follows from the
channel structure (pruning/groups.py): every convolution and linear layer has its output channels in a
group or fixed, and its input channels in a group (``ChannelGroup.consumers``) or fixed; every
normalisation layer of a group has a fixed number of parameters per channel. So

- params = fixed + sum over layers (w_in x w_out x k + bias x w_out) + sum over norms (per channel x w);
- MACs (batch 1) = sum over convs (P x (w_in x w_out x k + bias x w_out)) + linear (w_in x w_out + bias x
  w_out), P the conv's output positions: the convolutions and linear layers, counted as Torch-Pruning's
  counter counts them. The element-wise layers (normalisation, ReLU, pooling: under 0.4% of MNIST_CNN's
  and ResNet-18's MACs) are left out.

``fixed`` is every parameter that no group's width changes (measured on the dense model). Tested equal
to the parameters and the conv/linear MACs of the compressed models (tests/test_budgets.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dgprune.errors import ConfigError
from dgprune.pruning.groups import ChannelGroup

COUNTED = (nn.Conv2d, nn.Linear)  # the layers whose MACs a budget counts


@dataclass(frozen=True)
class LayerShape:
    """One convolution or linear layer: where its input and output widths come from, and its shape."""

    name: str
    kind: str  # "conv" or "linear"
    in_group: int | None  # the group whose channels are its input, None: fixed at in_dense
    in_dense: int  # input channels (conv) or features (linear) of the dense layer
    in_per_channel: int  # input features per group channel (a linear layer after a flatten of H x W)
    out_group: int | None
    out_dense: int
    kernel: tuple[int, ...]  # (k_h, k_w); () for a linear layer
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    bias: bool
    in_hw: tuple[int, int]  # input height and width (batch 1); (1, 1) for a linear layer
    out_positions: int  # output height x width; 1 for a linear layer

    @property
    def kernel_size(self) -> int:
        size = 1
        for k in self.kernel:
            size *= k
        return size


@dataclass(frozen=True)
class NormShape:
    name: str
    group: int
    params_per_channel: int


class ChannelStructure:
    """The cost-relevant structure of a model whose prunable channels are ``groups``."""

    def __init__(
        self,
        group_sizes: list[int],
        layers: list[LayerShape],
        norms: list[NormShape],
        fixed_params: int,
        model_name: str = "",
    ) -> None:
        self.group_sizes = list(group_sizes)
        self.layers = layers
        self.norms = norms
        self.fixed_params = fixed_params
        self.model_name = model_name

    @classmethod
    def of(
        cls, model: nn.Module, groups: Sequence[ChannelGroup], example_input: torch.Tensor
    ) -> ChannelStructure:
        """Read the structure of the dense ``model`` (one forward of ``example_input[:1]``, eval mode,
        no gradients; the caller's modes are restored)."""
        modules = dict(model.named_modules())
        out_group: dict[str, int] = {}
        in_group: dict[str, tuple[int, int]] = {}  # name -> (group, input features per channel)
        norms: list[NormShape] = []
        for index, group in enumerate(groups):
            for member in group.convs:
                out_group[member.module_name] = index
            for member in group.consumers:
                in_group[member.module_name] = (index, max(len(member.channel_index) // group.size, 1))
            for member in group.norms:
                count = sum(p.numel() for p in modules[member.module_name].parameters(recurse=False))
                norms.append(NormShape(member.module_name, index, count // group.size))
        shapes = _io_shapes(model, example_input[:1])
        layers: list[LayerShape] = []
        for name, module in modules.items():
            if not isinstance(module, COUNTED) or name not in shapes:
                continue
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise ConfigError(
                    f"prune.budget: layer {name} is a grouped convolution (groups {module.groups}); "
                    "budgets in params, macs or latency price ordinary convolutions only"
                )
            group, per_channel = in_group.get(name, (None, 1))
            in_shape, out_shape = shapes[name]
            conv = isinstance(module, nn.Conv2d)
            layers.append(
                LayerShape(
                    name=name,
                    kind="conv" if conv else "linear",
                    in_group=group,
                    in_dense=module.in_channels if conv else module.in_features,
                    in_per_channel=per_channel,
                    out_group=out_group.get(name),
                    out_dense=module.out_channels if conv else module.out_features,
                    kernel=tuple(module.kernel_size) if conv else (),
                    stride=tuple(module.stride) if conv else (),
                    padding=tuple(module.padding) if conv else (),  # type: ignore[arg-type]
                    dilation=tuple(module.dilation) if conv else (),
                    bias=module.bias is not None,
                    in_hw=(in_shape[-2], in_shape[-1]) if conv else (1, 1),
                    out_positions=out_shape[-2] * out_shape[-1] if conv else 1,
                )
            )
        total = sum(p.numel() for p in model.parameters())
        structure = cls([g.size for g in groups], layers, norms, 0, type(model).__name__)
        structure.fixed_params = total - structure.variable_params(structure.group_sizes)
        return structure

    def in_width(self, layer: LayerShape, widths: Sequence[int]) -> int:
        if layer.in_group is None:
            return layer.in_dense
        return widths[layer.in_group] * layer.in_per_channel

    def out_width(self, layer: LayerShape, widths: Sequence[int]) -> int:
        return layer.out_dense if layer.out_group is None else widths[layer.out_group]

    def variable_params(self, widths: Sequence[int]) -> int:
        """The parameters of the layers and norms that the widths change."""
        total = 0
        for layer in self.layers:
            w_in, w_out = self.in_width(layer, widths), self.out_width(layer, widths)
            total += w_in * w_out * layer.kernel_size + (w_out if layer.bias else 0)
        return total + sum(norm.params_per_channel * widths[norm.group] for norm in self.norms)

    def params(self, widths: Sequence[int]) -> int:
        return self.fixed_params + self.variable_params(widths)

    def macs(self, widths: Sequence[int]) -> int:
        """MACs of the convolutions and linear layers for one input (batch 1)."""
        total = 0
        for layer in self.layers:
            w_in, w_out = self.in_width(layer, widths), self.out_width(layer, widths)
            total += layer.out_positions * (w_in * w_out * layer.kernel_size + (w_out if layer.bias else 0))
        return total

    def activations(self, widths: Sequence[int]) -> int:
        """Output elements of the convolutions for one input: what the element-wise layers after them
        (normalisation, activation, addition) touch, the latency the convolutions' table leaves out."""
        return sum(
            self.out_width(layer, widths) * layer.out_positions
            for layer in self.layers
            if layer.kind == "conv"
        )

    def fingerprint(self) -> str:
        """A hash of the architecture as the costs see it (layers, shapes, groups): two models with the
        same fingerprint cost the same at the same widths."""
        payload = {
            "groups": self.group_sizes,
            "layers": [asdict(layer) for layer in self.layers],
            "norms": [asdict(norm) for norm in self.norms],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def counted_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """The MACs of ``model``'s convolutions and linear layers as Torch-Pruning's counter counts them
    (batch 1): what ``ChannelStructure.macs`` predicts, counted independently on a real model."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, _, per_layer, _ = tp.utils.count_ops_and_params(model, example_input[:1], layer_wise=True)
    model.train(was_training)
    return int(sum(f for m, f in per_layer.items() if isinstance(m, COUNTED) and f is not None))


def _io_shapes(
    model: nn.Module, example_input: torch.Tensor
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shapes of every conv and linear layer in one forward (first call of each)."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, COUNTED):

            def record(mod: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> None:
                shapes.setdefault(name, (tuple(args[0].shape), tuple(output.shape)))

            handles.append(module.register_forward_hook(record))
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    return shapes
