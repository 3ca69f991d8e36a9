"""Domain-generalisation training algorithms: one update step over per-domain mini-batches."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Minibatches = list[tuple[torch.Tensor, torch.Tensor]]


class Algorithm:
    """Owns the model's optimiser; ``update`` performs one training step and returns its losses."""

    name = "base"

    def __init__(self, model: nn.Module, lr: float, weight_decay: float = 0.0) -> None:
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
