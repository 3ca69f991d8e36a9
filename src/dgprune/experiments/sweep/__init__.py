"""Sweeps: a config file declares a grid of runs; workers execute them, resumably, into a database.

- ``spec``: the sweep file (schema, ``base_preset``, presets), grid expansion into validated runs,
  units (one pretrained model and its pruning runs);
- ``execute``: one unit, its stages, and the sinks its results go to;
- ``workers``: ``run_sweep``, local workers with heartbeats (claiming, taking back the units of
  dead workers, processes) and the hand-over to Ray;
- ``status``: counts, ETA and the finished records.

Stages checkpoint every 50 steps and a finished stage is marked by its metrics.json, so a killed
sweep resumes with the same command and gives the same numbers. Layout:
``<dir>/pretrained/<pretrain_id>/``, ``<dir>/runs/<run_id>/``, ``<dir>/<db>``. See docs/experiments.md.
"""

from dgprune.experiments.sweep.execute import (
    MODEL_DIR_FILES,
    ListSink,
    ResultSink,
    StageHooks,
    StoreSink,
    describe_result,
    error_text,
    execute_unit,
    model_dir,
    unit_configs,
)
from dgprune.experiments.sweep.spec import (
    DEFAULT_CRITERION,
    DEFAULT_STALE_AFTER_S,
    PRESETS_DIR,
    SAME_AS_PRETRAIN,
    Sweep,
    SweepFile,
    SweepOptions,
    Unit,
    dataset_of,
    expand_grid,
    group_units,
    load_sweep,
    poll_interval,
    preset_file,
    preset_names,
    read_sweep_file,
    resolve_sweep_path,
    run_labels,
)
from dgprune.experiments.sweep.status import SweepStatus, sweep_records, sweep_status
from dgprune.experiments.sweep.workers import (
    MAX_UNIT_ATTEMPTS,
    Heartbeat,
    SweepOutcome,
    claim_next,
    cuda_gpus,
    default_workers,
    reclaim_dead,
    register_sweep,
    requeue_missing_models,
    resolve_threads,
    resolve_workers,
    run_sweep,
    worker_loop,
)
from dgprune.pruning.measure import measure_latency_ms  # its old home (dgprune.cli imports it from here)

__all__ = [
    "DEFAULT_CRITERION",
    "DEFAULT_STALE_AFTER_S",
    "MAX_UNIT_ATTEMPTS",
    "MODEL_DIR_FILES",
    "PRESETS_DIR",
    "SAME_AS_PRETRAIN",
    "Heartbeat",
    "ListSink",
    "ResultSink",
    "StageHooks",
    "StoreSink",
    "Sweep",
    "SweepFile",
    "SweepOptions",
    "SweepOutcome",
    "SweepStatus",
    "Unit",
    "claim_next",
    "cuda_gpus",
    "dataset_of",
    "default_workers",
    "describe_result",
    "error_text",
    "execute_unit",
    "expand_grid",
    "group_units",
    "load_sweep",
    "measure_latency_ms",
    "model_dir",
    "poll_interval",
    "preset_file",
    "preset_names",
    "read_sweep_file",
    "reclaim_dead",
    "register_sweep",
    "requeue_missing_models",
    "resolve_sweep_path",
    "resolve_threads",
    "resolve_workers",
    "run_labels",
    "run_sweep",
    "sweep_records",
    "sweep_status",
    "unit_configs",
    "worker_loop",
]
