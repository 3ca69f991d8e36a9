"""DomainBed's MNIST_CNN featurizer plus a linear classifier `fc`, as one module."""

from __future__ import annotations

import torch
from torch import nn

from dgprune.models.group_norm import MaskableGroupNorm


class MnistCnn(nn.Module):
    """Four 3x3 convs (64, 128 stride 2, 128, 128), each conv -> ReLU -> GroupNorm(8), global average
    pooling, then `fc`. The norms are `MaskableGroupNorm`, so masked and pruned models agree."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1)
        self.relu1 = nn.ReLU()
        self.norm1 = MaskableGroupNorm(8, 64)
        self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.norm2 = MaskableGroupNorm(8, 128)
        self.conv3 = nn.Conv2d(128, 128, 3, stride=1, padding=1)
        self.relu3 = nn.ReLU()
        self.norm3 = MaskableGroupNorm(8, 128)
        self.conv4 = nn.Conv2d(128, 128, 3, stride=1, padding=1)
        self.relu4 = nn.ReLU()
        self.norm4 = MaskableGroupNorm(8, 128)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The featurizer's output [N, width of conv4] (what DomainBed's CORAL aligns)."""
        x = self.norm1(self.relu1(self.conv1(x)))
        x = self.norm2(self.relu2(self.conv2(x)))
        x = self.norm3(self.relu3(self.conv3(x)))
        x = self.norm4(self.relu4(self.conv4(x)))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
