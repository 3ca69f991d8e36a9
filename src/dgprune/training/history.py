"""Training curves of a stage: ``history.jsonl`` beside the model, and optionally TensorBoard.

Both are fed by the loops' progress events (one per step), so they cost the loops nothing beyond
the numbers they already have. A record (one JSON object a line)::

    {"step": 12, "loss": 0.41, "risks": {"0": 0.39, ...}, "filters_alive": 314, "filters_total": 448,
     "val_acc": 0.93, "acc": {"0": {"train": 0.95, "val": 0.93}, ..., "75": {"target": 0.71, ...}},
     "variance_share": 0.02, "stats": {...}, "seconds": 3.2}

``risks`` (per source domain) in the pruning stage; ``filters_*`` in the pruning stage; ``val_acc``
(the selection metric) and ``acc`` (every domain's accuracy per split, training.evaluation.Evaluator)
on evaluated steps; ``variance_share`` on steps that were scored; ``stats`` the pretraining
algorithm's statistics besides the loss (e.g. IRM's penalty), when it has any; ``seconds`` since the
stage started, counting the time before an interruption.

A resumed stage restarts at the step after its checkpoint: its first event drops the records from
that step on (written after the checkpoint, before the interruption), so the file ends as an
uninterrupted run's would (but for ``seconds``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from dgprune.errors import ConfigError
from dgprune.training.progress import ProgressCallback, ProgressEvent, fan_out

HISTORY_FILE = "history.jsonl"
TENSORBOARD_EXTRA = "pip install 'dgprune[tensorboard]'"


def event_record(event: ProgressEvent) -> dict[str, Any]:
    """The numbers of an event that the history keeps (absent ones left out), without ``seconds``."""
    record: dict[str, Any] = {"step": event.step, "loss": event.loss}
    if event.risks is not None:
        record["risks"] = dict(event.risks)
    if event.filters_alive is not None:
        record["filters_alive"] = event.filters_alive
        record["filters_total"] = event.filters_total
    if event.val_acc is not None:
        record["val_acc"] = event.val_acc
    if event.variance_share is not None:
        record["variance_share"] = event.variance_share
    if event.stats:
        record["stats"] = dict(event.stats)
    if event.domain_acc:
        record["acc"] = {domain: dict(splits) for domain, splits in event.domain_acc.items()}
    return record


def _finite(value: Any) -> Any:
    """JSON without NaN: a non-finite number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _number_map(value: Any) -> bool:
    return isinstance(value, dict) and all(_is_number(v) for v in value.values())


# The checks of a record's keys (others are left alone: a newer dgprune may add some).
_KEY_CHECKS: dict[str, tuple[Any, str]] = {
    "loss": (_is_number, "a number"),
    "val_acc": (_is_number, "a number"),
    "variance_share": (_is_number, "a number"),
    "seconds": (_is_number, "a number"),
    "filters_alive": (lambda v: v is None or (type(v) is int), "a whole number"),
    "filters_total": (lambda v: v is None or (type(v) is int), "a whole number"),
    "risks": (_number_map, "a mapping of domain: number"),
    "stats": (lambda v: isinstance(v, dict), "a mapping"),
    "acc": (lambda v: isinstance(v, dict) and all(map(_number_map, v.values())), "domain: {split: number}"),
}


def record_problem(record: Any) -> str | None:
    """What makes a parsed history line not a record of the format above, or None."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    if type(record.get("step")) is not int:
        return f"step is {record.get('step')!r:.40}, not a whole number"
    for key, (check, expected) in _KEY_CHECKS.items():
        if key in record and not check(record[key]):
            return f"{key} is {record[key]!r:.40}, not {expected}"
    return None


def read_history(path: Path, skip_bad: bool = False) -> list[dict[str, Any]]:
    """The records of a history file, up to its first bad line (a write cut by a kill); with
    ``skip_bad`` (for reading, not resuming) every bad line is skipped with a warning instead."""
    records, skipped = [], []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: unreadable ({err})") from None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            problem = record_problem(record)
        except json.JSONDecodeError:
            problem = "not JSON (a write cut by a kill?)"
        if problem is None:
            records.append(record)
        elif skip_bad:
            skipped.append(f"line {number}: {problem}")
        else:
            break
    if skipped:  # one warning, however many lines
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        shown = "; ".join(skipped[:3])
        warnings.warn(f"{path}: skipped {len(skipped)} bad line(s): {shown}{more}", stacklevel=2)
    return records


class HistoryWriter:
    """A progress callback appending one record per event to ``path``; see the module's docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None
        self._offset_s = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        if self._file is None:
            self._open(event.step)
        record = {**event_record(event), "seconds": round(self._offset_s + event.elapsed_s, 3)}
        self._file.write(json.dumps(_finite(record)) + "\n")  # type: ignore[union-attr]
        self._file.flush()

    def _open(self, first_step: int) -> None:
        """Keep the records before ``first_step`` (a resumed stage's), atomically, then append."""
        kept = [r for r in read_history(self.path) if r["step"] < first_step] if first_step > 1 else []
        if kept:
            self._offset_s = float(kept[-1].get("seconds") or 0.0)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = self.path.open("a")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def require_tensorboard():
    """torch's SummaryWriter, or a ConfigError naming the extra that installs it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            f"--tensorboard needs the tensorboard package, which is not installed: {TENSORBOARD_EXTRA}"
        ) from None
    return SummaryWriter


def tensorboard_scalars(event: ProgressEvent) -> dict[str, float]:
    """The history record's numbers as TensorBoard tags (``<stage>/loss``, ``<stage>/risk/<domain>``,
    ``<stage>/acc/<domain>/<split>``...)."""
    record = event_record(event)
    scalars: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "filters_total"):
            continue
        if key == "acc":  # acc/<domain>/<split>
            scalars.update(
                {f"acc/{d}/{split}": v for d, splits in value.items() for split, v in splits.items()}
            )
        elif isinstance(value, dict):
            prefix = "risk" if key == "risks" else key
            scalars.update({f"{prefix}/{name}": v for name, v in value.items()})
        else:
            scalars[key] = value
    return {f"{event.stage}/{tag}": float(v) for tag, v in scalars.items()}


class TensorBoardLogger:
    """A progress callback logging :func:`tensorboard_scalars` to ``log_dir`` (created on the first
    event; a resumed stage purges the events from its first step on)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._summary_writer = require_tensorboard()  # fail before training, not at its first step
        self._writer = None

    def __call__(self, event: ProgressEvent) -> None:
        if self._writer is None:
            purge = event.step if event.step > 1 else None
            self._writer = self._summary_writer(str(self.log_dir), purge_step=purge)
        for tag, value in tensorboard_scalars(event).items():
            self._writer.add_scalar(tag, value, event.step)  # type: ignore[union-attr]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class StageLog:
    """For one stage: the history file, TensorBoard (with ``tensorboard_dir``) and the front end's
    ``progress``, as one callback; closes the files on exit."""

    def __init__(
        self, model_dir: Path, progress: ProgressCallback | None = None, tensorboard_dir: Path | None = None
    ) -> None:
        self.history = HistoryWriter(model_dir / HISTORY_FILE)
        self.tensorboard = TensorBoardLogger(tensorboard_dir) if tensorboard_dir is not None else None
        self.callback = fan_out(self.history, self.tensorboard, progress)

    def __enter__(self) -> ProgressCallback:
        assert self.callback is not None  # the history writer is always there
        return self.callback

    def __exit__(self, *exc: object) -> None:
        self.history.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
