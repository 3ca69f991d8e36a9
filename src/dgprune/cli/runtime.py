"""What a training command sets up while it runs: its progress display and TensorBoard folders."""

from __future__ import annotations

from pathlib import Path

from dgprune.training.history import require_tensorboard
from dgprune.training.progress import ProgressCallback, ProgressFrontEnd, progress_front_end

# The command's progress display (bars on a terminal, plain lines otherwise), started at its first stage.
_front_end: list[ProgressFrontEnd] = []


def progress(quiet: bool, prefix: str = "") -> ProgressCallback | None:
    if quiet:
        return None
    if not _front_end:
        _front_end.append(progress_front_end().__enter__())
    return _front_end[0].callback(prefix)


def stop_progress() -> None:
    """End the progress display (the app calls it when a command ends, whatever way it ends)."""
    while _front_end:
        _front_end.pop().__exit__(None, None, None)


def checked_tensorboard(folder: Path | None) -> Path | None:
    """--tensorboard: checked before any work (the package is an optional extra)."""
    if folder is not None:
        require_tensorboard()
    return folder


def tensorboard_run(folder: Path | None, out: Path) -> Path | None:
    """A pretrain/prune command's TensorBoard run: named after its --out directory."""
    return checked_tensorboard(folder) / out.resolve().name if folder is not None else None
