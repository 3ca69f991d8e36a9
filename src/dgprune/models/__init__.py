"""Models: torchvision ResNets, DomainBed's MNIST CNN, and a pruning-safe GroupNorm."""

from dgprune.models.factory import (
    MODEL_NAMES,
    MODELS,
    ModelBuilder,
    build_model,
    load_weights,
    read_state_dict,
)
from dgprune.models.features import find_classifier, forward_with_features
from dgprune.models.group_norm import CUSTOM_PRUNERS, MaskableGroupNorm, MaskableGroupNormPruner
from dgprune.models.mnist_cnn import MnistCnn
from dgprune.models.resnet import build_resnet

__all__ = [
    "CUSTOM_PRUNERS",
    "MODELS",
    "MODEL_NAMES",
    "MaskableGroupNorm",
    "MaskableGroupNormPruner",
    "MnistCnn",
    "ModelBuilder",
    "build_model",
    "build_resnet",
    "find_classifier",
    "forward_with_features",
    "load_weights",
    "read_state_dict",
]
