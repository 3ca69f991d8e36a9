"""Progress events of long training loops; the library emits them, a front end prints them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ProgressEvent:
    stage: str  # "pretrain" or "prune"
    step: int
    total_steps: int
    loss: float
    filters_alive: int | None = None
    filters_total: int | None = None
    val_acc: float | None = None
    elapsed_s: float = 0.0  # since the stage started


ProgressCallback = Callable[[ProgressEvent], None]


class LinePrinter:
    """Prints one line per event with the ETA of the current stage, on stderr."""

    def __init__(self, prefix: str = "", stream=None) -> None:
        self.prefix = prefix
        self.stream = stream or sys.stderr

    def __call__(self, event: ProgressEvent) -> None:
        eta = event.elapsed_s / max(event.step, 1) * (event.total_steps - event.step)
        parts = [
            f"{self.prefix}{event.stage} step {event.step}/{event.total_steps}",
            f"loss {event.loss:.3f}",
        ]
        if event.filters_alive is not None:
            parts.append(f"filters {event.filters_alive}/{event.filters_total}")
        if event.val_acc is not None:
            parts.append(f"val {100 * event.val_acc:.1f}%")
        parts.append(f"ETA {eta:.0f}s")
        print(" | ".join(parts), file=self.stream, flush=True)
