"""Progress events of long training loops; the library emits them, a front end prints them.

The loops emit one event per step (cheap: numbers they already have). What a person sees is the
front end's choice: a rich progress bar on a terminal (:class:`RichProgress`), plain periodic lines
otherwise (:class:`LinePrinter`: CI, log files), nothing with ``--quiet``. The model directory's
``history.jsonl`` and TensorBoard are fed from the same events (training.history).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn


@dataclass
class ProgressEvent:
    stage: str  # "pretrain" or "prune"
    step: int
    total_steps: int
    loss: float
    filters_alive: int | None = None
    filters_total: int | None = None
    val_acc: float | None = None  # set on the steps that were evaluated
    elapsed_s: float = 0.0  # since the stage started (in this process: a resumed stage starts again)
    risks: dict[str, float] | None = None  # per source domain (pruning stage)
    variance_share: float | None = None  # of the pruning score, on the steps that were scored
    stats: dict[str, float] | None = None  # the algorithm's other statistics (pretraining: e.g. penalty)
    # On evaluated steps: domain -> split -> accuracy (training.evaluation.Evaluator), never selected on.
    domain_acc: dict[str, dict[str, float]] | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def fan_out(*callbacks: ProgressCallback | None) -> ProgressCallback | None:
    """One callback calling each given one in turn (None when none is given)."""
    chosen = [c for c in callbacks if c is not None]
    if not chosen:
        return None
    if len(chosen) == 1:
        return chosen[0]

    def call_all(event: ProgressEvent) -> None:
        for callback in chosen:
            callback(event)

    return call_all


class _Rate:
    """Seconds per step since the first event of the stage seen here (a resumed stage starts late)."""

    def __init__(self) -> None:
        self.key: tuple[str, int] | None = None
        self.first_step = 1

    def eta_s(self, event: ProgressEvent) -> float:
        key = (event.stage, event.total_steps)
        if key != self.key or event.step < self.first_step:
            self.key, self.first_step = key, event.step
        done = max(event.step - self.first_step + 1, 1)
        return event.elapsed_s / done * (event.total_steps - event.step)


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class LinePrinter:
    """Plain lines for logs: the first step, every ``every`` steps or ``every_s`` seconds, every
    evaluation and the last step; each with the loss, filters alive, val accuracy and the stage's ETA."""

    def __init__(
        self, prefix: str = "", stream: TextIO | None = None, every: int = 25, every_s: float = 30.0
    ) -> None:
        self.prefix = prefix
        self.stream = stream
        self.every = max(1, every)
        self.every_s = every_s
        self._rate = _Rate()
        self._last_printed = -float("inf")

    def __call__(self, event: ProgressEvent) -> None:
        eta = self._rate.eta_s(event)
        now = time.monotonic()
        due = (
            event.step == self._rate.first_step
            or event.step % self.every == 0
            or event.step == event.total_steps
            or event.val_acc is not None
            or now - self._last_printed >= self.every_s
        )
        if not due:
            return
        self._last_printed = now
        parts = [
            f"{self.prefix}{event.stage} step {event.step}/{event.total_steps}",
            f"loss {event.loss:.3f}",
        ]
        if event.filters_alive is not None:
            parts.append(f"filters {event.filters_alive}/{event.filters_total}")
        if event.val_acc is not None:
            parts.append(f"val {100 * event.val_acc:.1f}%")
        parts.append(f"ETA {eta:.0f}s")
        print(" | ".join(parts), file=self.stream or sys.stderr, flush=True)


class ProgressFrontEnd(Protocol):
    """What a command holds while it runs: ``callback(label)`` gives each stage its callback."""

    def __enter__(self) -> ProgressFrontEnd: ...
    def __exit__(self, *exc: object) -> None: ...
    def callback(self, label: str = "") -> ProgressCallback | None: ...


class NoProgress:
    """``--quiet``."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def callback(self, label: str = "") -> ProgressCallback | None:
        return None


class PlainProgress(NoProgress):
    """One :class:`LinePrinter` per stage, on ``stream``."""

    def __init__(self, stream: TextIO | None = None, every: int = 25, every_s: float = 30.0) -> None:
        self.stream, self.every, self.every_s = stream, every, every_s

    def callback(self, label: str = "") -> ProgressCallback | None:
        return LinePrinter(label, self.stream, self.every, self.every_s)


@dataclass
class _StageTask:
    task: TaskID
    rate: _Rate
    last_val: float | None = None
    best_val: float | None = None


class RichProgress:
    """Progress bars on a terminal: one per running stage (label, stage, step, loss, filters alive,
    val accuracy, ETA), shown from the first step; a finished stage leaves one summary line."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
        )

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def callback(self, label: str = "") -> ProgressCallback:
        tasks: dict[str, _StageTask] = {}

        def on_event(event: ProgressEvent) -> None:
            stage = tasks.get(event.stage)
            first = stage is None
            if stage is None:
                task = self.progress.add_task(
                    f"{label}{event.stage}", total=event.total_steps, completed=event.step - 1, info=""
                )
                stage = tasks[event.stage] = _StageTask(task, _Rate())
            if event.val_acc is not None:
                stage.last_val = event.val_acc
                stage.best_val = max(stage.best_val or 0.0, event.val_acc)
            eta = stage.rate.eta_s(event)
            self.progress.update(
                stage.task,
                completed=event.step,
                total=event.total_steps,
                info=f"{_numbers(event, 'val', stage.last_val)} | ETA {_clock(eta)}",
            )
            if event.step >= event.total_steps:
                self.progress.remove_task(stage.task)
                self.progress.refresh()  # else the line below would be printed over a stale bar
                del tasks[event.stage]
                self.progress.console.print(
                    f"{label}{event.stage} done: {event.total_steps} steps in {_clock(event.elapsed_s)}"
                    f" | {_numbers(event, 'best val', stage.best_val)}",
                    markup=False,
                    highlight=False,
                )
            elif first or event.val_acc is not None:
                self.progress.refresh()  # show the first step (and evaluations) at once

        return on_event


def _numbers(event: ProgressEvent, val_name: str, val: float | None) -> str:
    parts = [f"loss {event.loss:.3f}"]
    if event.filters_alive is not None:
        parts.append(f"filters {event.filters_alive}/{event.filters_total}")
    if val is not None:
        parts.append(f"{val_name} {100 * val:.1f}%")
    return " | ".join(parts)


def progress_front_end(
    quiet: bool = False, console: Console | None = None, every: int = 25, every_s: float = 30.0
) -> ProgressFrontEnd:
    """Bars when ``console`` (default: stderr) is a terminal, plain lines when it is not, none if quiet."""
    if quiet:
        return NoProgress()
    console = console or Console(stderr=True)
    if console.is_terminal:
        return RichProgress(console)
    return PlainProgress(console.file, every, every_s)

