"""Logits together with the classifier's input features, from one ordinary forward pass."""

from __future__ import annotations

import torch
from torch import nn


def find_classifier(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` (in ``modules()`` order): the classifier whose outputs are the
    classes. Feature-alignment algorithms (CORAL) use its input; pruning must never remove its outputs."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no nn.Linear classifier; dgprune needs one (its input are the features)")
    return linears[-1]


def forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, features)`` of ``model(x)``; features = the classifier's input, flattened to [B, D].

    A forward pre-hook on the classifier records its input, so any model whose last ``nn.Linear`` is its
    head works unchanged (and gate hooks elsewhere in the model still apply). The hook is removed before
    returning, also when the forward raises. If the classifier runs several times in one forward, the
    last call's input is returned.
    """
    classifier = find_classifier(model)
    captured: list[torch.Tensor] = []

    def record_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0])

    handle = classifier.register_forward_pre_hook(record_input)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError("the model's last nn.Linear was not called during forward; it is not the classifier")
    features = captured[-1]
    # Keep the batch axis: a [B, ..., D] input becomes [B, prod(...) * D].
    return logits, features.reshape(features.shape[0], -1)
