"""Mid-stage checkpoints, so an interrupted training loop resumes where it stopped.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only: it is written atomically
(temporary file, then rename, so a kill during the write leaves the previous checkpoint intact) and
read back with ``torch.load(weights_only=True)``, which never executes pickled code.

Given the run's identity (see identity.py), a checkpoint carries it and is resumed only by the same
run: a leftover checkpoint of other settings is refused with the settings that differ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dgprune.errors import ConfigError
from dgprune.training.identity import Identity, mismatch_error, same_run

CHECKPOINT_FILE = "checkpoint.pt"
IDENTITY_KEY = "identity"


class Checkpointer:
    """Saves and loads one directory's checkpoint; with ``identity``, only that run's checkpoint.

    A checkpoint without an identity (written before identities existed) is accepted only in a
    directory named by the run id (a sweep's layout, where the directory holds that run alone).
    """

    def __init__(self, directory: Path | None, every: int = 50, identity: Identity | None = None) -> None:
        self.path = directory / CHECKPOINT_FILE if directory is not None else None
        self.every = every
        self.identity = identity
        self.saved_step: int | None = None  # step of the checkpoint on disk, once loaded or saved

    def due(self, step: int) -> bool:
        return self.path is not None and step % self.every == 0

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign file: whatever torch says, it is unusable
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"{self.path}: unreadable checkpoint ({reason}); delete it or rerun with --overwrite"
            ) from None
        if not isinstance(state, dict) or "step" not in state:
            raise ConfigError(f"{self.path}: not a dgprune checkpoint; delete it or rerun with --overwrite")
        stored = state.pop(IDENTITY_KEY, None)
        if self.identity is not None:
            if stored is None and self.path.parent.name != self.identity.get("run_id"):
                raise ConfigError(
                    f"{self.path}: checkpoint of unknown settings (written by an older dgprune); "
                    "delete it or rerun with --overwrite, or use another --out"
                )
            if stored is not None and not same_run(stored, self.identity):
                raise mismatch_error(str(self.path), stored, self.identity)
        self.saved_step = int(state["step"])
        return state

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self.identity is not None:
            state = {**state, IDENTITY_KEY: self.identity}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self.saved_step = int(state["step"])

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
