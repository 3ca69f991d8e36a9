"""Stop a diverging training loop at its first non-finite value, before anything of it is saved.

A NaN or infinite loss, risk, score or weight means every later step, the model selection and the
saved model would be garbage (NaN scores even rank channels by position). The loops ask the guard
after each step, before evaluating (selecting) and before writing a checkpoint, so the last
checkpoint on disk is always one of finite weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NoReturn

import torch
from torch import nn

from dgprune.errors import DivergenceError
from dgprune.training.checkpoint import Checkpointer


class DivergenceGuard:
    def __init__(self, stage: str, lr: float, checkpointer: Checkpointer) -> None:
        self.stage, self.lr, self.checkpointer = stage, lr, checkpointer

    def check_stats(self, step: int, stats: Mapping[str, object]) -> None:
        """Every float of a step's statistics (the loss, penalties, ...)."""
        for name, value in stats.items():
            if isinstance(value, float) and not math.isfinite(value):
                self.fail(step, f"{name} is {value}")

    def check_value(self, step: int, name: str, value: float) -> None:
        if not math.isfinite(value):
            self.fail(step, f"{name} is {value}")

    def check_tensor(self, step: int, name: str, values: torch.Tensor) -> None:
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            self.fail(step, f"{int((~finite).sum())} of {finite.numel()} {name} are not finite")

    def check_weights(self, step: int, model: nn.Module) -> None:
        """Parameters and buffers (e.g. BatchNorm statistics); one device sync for them all."""
        tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        if not tensors:
            return
        per_tensor = torch.stack([torch.isfinite(t).all() for t in tensors])
        if not bool(per_tensor.all()):
            bad = int((~per_tensor).sum())
            self.fail(step, f"the weights are not finite ({bad} of {len(tensors)} tensors hold NaN or inf)")

    def fail(self, step: int, what: str) -> NoReturn:
        raise DivergenceError(
            f"{self.stage} diverged at step {step}: {what} (lr {self.lr:g} may be too high); {self._kept()}"
        )

    def _kept(self) -> str:
        path, saved = self.checkpointer.path, self.checkpointer.saved_step
        if path is None:
            return "nothing was saved"
        if saved is None:
            every = self.checkpointer.every
            return f"nothing was saved (no checkpoint yet: one is written every {every} steps)"
        return f"last good checkpoint (step {saved}) kept in {path}"
