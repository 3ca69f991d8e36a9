"""torchvision ResNet-18/50 with a head for `num_classes`, any input channels, and a small-input stem."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import ResNet

_ARCHS = {"resnet18": resnet18, "resnet50": resnet50}


def build_resnet(arch: str, num_classes: int, in_channels: int = 3, small_input: bool = False) -> ResNet:
    """A randomly initialised torchvision ResNet.

    `small_input=True` (for images of 64 px or less): a 3x3 stride-1 first conv and no max-pool, so an
    8-32 px image is not reduced to 1-2 px before the first residual stage.
    """
    model = _ARCHS[arch](weights=None, num_classes=num_classes)
    if in_channels != 3 or small_input:
        kernel, stride, padding = (3, 1, 1) if small_input else (7, 2, 3)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel, stride=stride, padding=padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
    if small_input:
        model.maxpool = nn.Identity()
    # In-place ReLU overwrites the tensor that gate hooks and per-sample gradient hooks look at; a
    # plain ReLU costs a little memory and keeps the graph simple for Torch-Pruning and autograd.
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model
