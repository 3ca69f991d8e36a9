"""Mid-stage checkpoints, so an interrupted training loop resumes where it stopped.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only: it is written atomically
(temporary file, then rename, so a kill during the write leaves the previous checkpoint intact) and
read back with ``torch.load(weights_only=True)``, which never executes pickled code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"


class Checkpointer:
    def __init__(self, directory: Path | None, every: int = 50) -> None:
        self.path = directory / CHECKPOINT_FILE if directory is not None else None
        self.every = every

    def due(self, step: int) -> bool:
        return self.path is not None and step % self.every == 0

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        if self.path is not None and self.path.is_file():
            self.path.unlink()


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
