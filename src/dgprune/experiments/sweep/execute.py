"""Executing one unit: pretrain once (or reuse it), prune every run of it, report each to a sink.

The same function runs in a local worker (its sink writes the database) and in a Ray task (its sink
collects events that the driver replays into the database, see ``experiments/ray_runner.py``).
Stages checkpoint every 50 steps and a finished stage is marked by its metrics.json, so a killed
unit resumes and gives the same numbers.

Layout: ``<dir>/pretrained/<pretrain_id>/``, ``<dir>/runs/<run_id>/``.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from dgprune.errors import ConfigError
from dgprune.experiments.config import RunConfig
from dgprune.experiments.pipeline import METRICS_FILE, make_context, run_pretrain, run_prune
from dgprune.experiments.records import ResultRecord, describe_run
from dgprune.experiments.store import RunResult, Store
from dgprune.experiments.sweep.spec import dataset_of
from dgprune.models import build_model
from dgprune.pruning.measure import layer_widths, measure_latency_ms
from dgprune.pruning.surgery import STRUCTURE_FILE, WEIGHTS_FILE
from dgprune.training.checkpoint import CHECKPOINT_FILE
from dgprune.training.progress import ProgressCallback

MODEL_DIR_FILES = (WEIGHTS_FILE, STRUCTURE_FILE, METRICS_FILE)  # a finished model directory has them all


def model_dir(sweep_dir: Path, kind: str, run_id: str) -> Path:
    """Where a run's model lives: ``pretrained/<id>`` for a dense row, ``runs/<id>`` for a pruned one."""
    return sweep_dir / ("pretrained" if kind == "dense" else "runs") / run_id


class ResultSink(Protocol):
    """Where a unit's progress goes: the database (local workers) or a list (Ray tasks)."""

    def started(self, run_id: str) -> None: ...
    def done(self, run_id: str, result: RunResult) -> None: ...
    def failed(self, run_id: str, error: str) -> None: ...


@dataclass
class StoreSink:
    store: Store
    echo: Callable[[str], None] | None = None
    configs: dict[str, RunConfig] = field(default_factory=dict)

    def started(self, run_id: str) -> None:
        self.store.mark_running([run_id])

    def done(self, run_id: str, result: RunResult) -> None:
        self.store.record_done(run_id, result)
        if self.echo:
            self.echo(describe_result(result.record))

    def failed(self, run_id: str, error: str) -> None:
        self.store.mark_failed(run_id, error)
        if self.echo:
            self.echo(f"FAILED {run_id}: {error.strip().splitlines()[-1]}")


@dataclass
class ListSink:
    events: list[tuple[str, str, Any]] = field(default_factory=list)

    def started(self, run_id: str) -> None:
        self.events.append(("started", run_id, None))

    def done(self, run_id: str, result: RunResult) -> None:
        self.events.append(("done", run_id, result))

    def failed(self, run_id: str, error: str) -> None:
        self.events.append(("failed", run_id, error))

    def replay(self, sink: ResultSink) -> None:
        for event, run_id, payload in self.events:
            getattr(sink, event)(run_id, *([] if payload is None else [payload]))


def _no_progress(config: RunConfig, dense: bool) -> ProgressCallback | None:
    return None


def _no_tensorboard(config: RunConfig, dense: bool) -> Path | None:
    return None


@dataclass(frozen=True)
class StageHooks:
    """Extras of a unit run in this process (the demo's progress lines and TensorBoard runs).

    Each is called with a run's config and whether the stage is its unit's pretraining (``dense``).
    Not picklable in general: worker processes and Ray tasks run without them.
    """

    progress_for: Callable[[RunConfig, bool], ProgressCallback | None] = _no_progress
    tensorboard_for: Callable[[RunConfig, bool], Path | None] = _no_tensorboard


def describe_result(r: ResultRecord) -> str:
    settings = describe_run(
        target=r.target_domain,
        seed=r.seed,
        algorithm=r.algorithm,
        criterion=r.criterion,
        criterion_params=r.criterion_params,
        keep_ratio=r.keep_ratio,
        finetune_algorithm=r.finetune_algorithm,
        target_access=r.target_access,
    )
    return (
        f"done {r.run_id}: {r.dataset} {settings}: "
        f"intra {100 * r.intra_acc:.2f}% cross {100 * r.cross_acc:.2f}% ({r.wall_time_s:.1f} s)"
    )


def error_text(err: BaseException) -> str:
    """The end of ``err``'s traceback, as stored with a failed unit or run."""
    text = "".join(traceback.format_exception(err))
    return text[-4000:]  # the end of a traceback says most


def _drop_leftover_checkpoint(directory: Path) -> None:
    """A kill between writing metrics.json and deleting the checkpoint leaves both: the stage is done."""
    (directory / CHECKPOINT_FILE).unlink(missing_ok=True)


def execute_unit(
    pretrain_config: RunConfig,
    runs: list[RunConfig],
    todo: set[str],
    sweep_dir: Path,
    sink: ResultSink,
    device: str | None = None,
    hooks: StageHooks | None = None,
) -> None:
    """Pretrain once (or reuse it), then prune for every run in ``todo``; report each to ``sink``.

    A failing pruning run is reported and the others go on; a failing pretraining fails them all.
    """
    hooks = hooks or StageHooks()
    if device is not None:
        pretrain_config = pretrain_config.model_copy(update={"device": device})
        runs = [r.model_copy(update={"device": device}) for r in runs]
    unit_id = pretrain_config.pretrain_id()
    pretrained_dir = model_dir(sweep_dir, "dense", unit_id)
    try:
        dataset = dataset_of(pretrain_config)
        ctx = make_context(pretrain_config, dataset)
        if unit_id in todo:
            sink.started(unit_id)
        dense = run_pretrain(
            ctx,
            pretrained_dir,
            hooks.progress_for(pretrain_config, True),
            tensorboard_dir=hooks.tensorboard_for(pretrain_config, True),
        )
        _drop_leftover_checkpoint(pretrained_dir)
        if unit_id in todo:
            model = ctx.load_model_dir(pretrained_dir)
            latency = measure_latency_ms(model, ctx.example_input)
            widths = layer_widths(model, _dense_architecture(pretrained_dir))
            sink.done(unit_id, RunResult(dense, latency, widths))
    except Exception as err:
        error = f"pretraining failed: {error_text(err)}"
        for run_id in [unit_id, *(r.run_id() for r in runs)]:
            if run_id in todo:
                sink.failed(run_id, error)
        return
    for config in runs:
        run_id = config.run_id()
        if run_id not in todo:
            continue
        sink.started(run_id)
        out_dir = model_dir(sweep_dir, "pruned", run_id)
        try:
            run_ctx = make_context(config, dataset)
            record = run_prune(
                run_ctx,
                pretrained_dir,
                out_dir,
                hooks.progress_for(config, False),
                tensorboard_dir=hooks.tensorboard_for(config, False),
            )
            _drop_leftover_checkpoint(out_dir)
            model = run_ctx.load_model_dir(out_dir)
            latency = measure_latency_ms(model, run_ctx.example_input)
            widths = layer_widths(model, _dense_architecture(out_dir))
            sink.done(run_id, RunResult(record, latency, widths, dense))
        except Exception as err:
            sink.failed(run_id, error_text(err))


def _dense_architecture(directory: Path) -> nn.Module:
    """The unpruned architecture of a saved model (the build arguments of its structure.json)."""
    structure = json.loads((directory / STRUCTURE_FILE).read_text())
    return build_model(**structure["build"])


def unit_configs(store: Store, unit_id: str) -> tuple[RunConfig, list[RunConfig]]:
    """The unit's configs as registered in the database (the database is the source of truth)."""
    rows = store.runs_of_unit(unit_id)
    pruned = [RunConfig.model_validate(r["config"]) for r in rows if r["kind"] == "pruned"]
    if not pruned:
        raise ConfigError(f"unit {unit_id} has no pruning runs")
    return pruned[0], pruned
