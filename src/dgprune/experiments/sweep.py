"""Sweeps: a config file declares a grid of runs; workers execute them, resumably, into a database.

A sweep file (YAML/TOML/JSON) has three sections::

    base:  {data: {...}, model: {...}, pretrain: {...}, prune: {...}}   # a partial RunConfig
    grid:                                 # one mapping, or a list of mappings (their union)
      target: all                         # every domain of the dataset
      seed: [0, 1, 2]
      prune.criterion: [taylor, ior]
      prune.keep_ratio: [0.5, 0.3]
    sweep: {workers: auto, db: results.sqlite, dir: null}

Each grid mapping is a Cartesian product over its keys (dotted paths into RunConfig; a scalar is a
one-value list). Every combination is resolved into a validated RunConfig; its id (``run_id()``) is
the hash of the whole resolved config, so it depends neither on key order nor on how the value was
given. Normalisations keep equivalent runs single: a criterion parameter that the grid varies
(``prune.criterion_params.alpha: [1, 2]``, or the older ``prune.alpha``) applies to the grid's
criteria that take it and is left out for the others (Taylor runs are not split by IoR's alpha), and
``prune.finetune_algorithm: same`` means the pretraining algorithm.

Runs that share a pretrained model (same ``pretrain_id()``) form one *unit*: a worker claims the
unit, pretrains once (or reuses the finished pretraining), then runs every pruning of it. Stages
checkpoint every 50 steps and a finished stage is marked by its metrics.json, so a killed sweep
resumes with the same command and gives the same numbers.

Layout: ``<dir>/pretrained/<pretrain_id>/``, ``<dir>/runs/<run_id>/``, ``<dir>/<db>``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from dgprune.data import MultiDomainDataset
from dgprune.errors import ConfigError
from dgprune.experiments.config import (
    SET_OPTION,
    RunConfig,
    apply_set_overrides,
    build_config,
    check_sections,
    format_validation_error,
    read_mapping,
    set_override_keys,
)
from dgprune.experiments.pipeline import (
    METRICS_FILE,
    load_experiment_dataset,
    make_context,
    run_pretrain,
    run_prune,
)
from dgprune.experiments.records import ResultRecord
from dgprune.experiments.store import Claim, RunResult, RunSpec, Store, pid_alive, this_host
from dgprune.models import build_model
from dgprune.pruning.criteria import REGISTRY, criterion_label, criterion_param_names
from dgprune.pruning.surgery import STRUCTURE_FILE, WEIGHTS_FILE
from dgprune.training.checkpoint import CHECKPOINT_FILE
from dgprune.training.settings import PruneSettings

PRESETS_DIR = Path(__file__).parent / "presets"
SAME_AS_PRETRAIN = "same"
DEFAULT_CRITERION: str = PruneSettings.model_fields["criterion"].default
DEFAULT_STALE_AFTER_S = 120.0
# A running sweep fails a unit whose worker died on this attempt (e.g. killed for memory each time)
# rather than hand it to the next worker: one bad unit must not take down every worker in turn.
MAX_UNIT_ATTEMPTS = 3
MODEL_DIR_FILES = (WEIGHTS_FILE, STRUCTURE_FILE, METRICS_FILE)  # a finished model directory has them all


class SweepOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int | Literal["auto"] = Field("auto", description="worker processes (auto: fits the machine)")
    threads: int | Literal["auto"] = Field(
        "auto", description="torch threads per worker (auto: cores // workers); fix it to compare numbers"
    )
    db: str = Field("results.sqlite", description="SQLite file, relative to the sweep directory")
    dir: str | None = Field(None, description="sweep directory, relative to the config file")
    heartbeat_s: float = Field(10.0, gt=0, description="seconds between a worker's liveness updates")
    stale_after_s: float = Field(
        DEFAULT_STALE_AFTER_S,
        gt=0,
        description="a running unit whose heartbeat is older than this is taken back (its worker is "
        "presumed dead; a dead process on this host is noticed at once)",
    )

    @model_validator(mode="after")
    def _stale_after_beats(self) -> SweepOptions:
        # Shorter, and a live worker's unit (one late beat) would be taken back and run twice at once.
        if self.stale_after_s <= 2 * self.heartbeat_s:
            raise ValueError(
                f"stale_after_s ({self.stale_after_s:g}) must be more than twice heartbeat_s "
                f"({self.heartbeat_s:g})"
            )
        return self

    @property
    def poll_s(self) -> float:
        return poll_interval(self.heartbeat_s, self.stale_after_s)


def poll_interval(heartbeat_s: float, stale_after_s: float) -> float:
    """How often an idle worker looks again for work and for units of dead workers."""
    return min(heartbeat_s, stale_after_s / 4, 5.0)


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, Any] | list[dict[str, Any]] = Field(default_factory=dict)
    sweep: SweepOptions = SweepOptions()


@dataclass
class Unit:
    """One pretrained model and every pruning run of it: the job a worker claims."""

    unit_id: str
    pretrain_config: RunConfig  # any run of the unit: its prune section does not matter here
    runs: list[RunConfig]

    def specs(self) -> list[RunSpec]:
        first = self.pretrain_config
        dense_config = first.model_dump(mode="json", exclude={"prune"})
        specs = [RunSpec(self.unit_id, self.unit_id, "dense", dense_config, _labels(first, dense=True))]
        specs += [
            RunSpec(c.run_id(), self.unit_id, "pruned", c.model_dump(mode="json"), _labels(c))
            for c in self.runs
        ]
        return specs


@dataclass
class Sweep:
    name: str
    directory: Path
    base: dict[str, Any]
    grids: list[dict[str, Any]]
    options: SweepOptions
    device: str | None = None  # overrides every config's device (not part of the ids)
    _configs: list[RunConfig] | None = field(default=None, repr=False)

    @property
    def db_path(self) -> Path:
        return self.directory / self.options.db

    def configs(self) -> list[RunConfig]:
        if self._configs is None:
            self._configs = expand_grid(self.base, self.grids)
        return self._configs

    def units(self) -> list[Unit]:
        return group_units(self.configs())

    def run_ids(self) -> list[str]:
        """Every row id of the sweep: the dense model of each unit, then its pruning runs."""
        return [spec.run_id for unit in self.units() for spec in unit.specs()]


def resolve_sweep_path(config: str) -> Path:
    """A sweep file path, or the name of a preset (e.g. ``paper_digits``)."""
    path = Path(config)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{config}.yaml"
    if preset.is_file():
        return preset
    names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
    raise ConfigError(f"sweep config not found: {config} (not a file, nor a preset: {names})")


def load_sweep(
    config: str | Path, out: Path | None = None, device: str | None = None, sets: Sequence[str] | None = None
) -> Sweep:
    """Read and validate a sweep file (or preset name); expands nothing yet. ``sets``: ``--set KEY=VALUE``
    items that update the file's ``base``, which reaches the grid mappings that do not set the key
    themselves (a key that every grid mapping sets is an error: the grid would always win)."""
    path = resolve_sweep_path(str(config))
    try:
        spec = SweepFile.model_validate(read_mapping(path))
    except ValidationError as err:
        raise ConfigError(f"{path}: invalid sweep file:\n{format_validation_error(err)}") from None
    check_sections(spec.base, f"{path}: base")
    grids = spec.grid if isinstance(spec.grid, list) else [spec.grid]
    if sets:
        for key in set_override_keys(sets):
            # The base reaches only the grid mappings that do not set the key themselves; a key that
            # every mapping sets would change nothing, so it is refused rather than ignored.
            clashes = [_clashing_key(grid, key) for grid in grids]
            if all(clashes):
                raise ConfigError(
                    f"{SET_OPTION} {key}: the grid of {path} sets {clashes[0]} for every run; "
                    "change it in the grid (or a copy of the file) instead"
                )
        spec.base = apply_set_overrides(spec.base, sets)
    if out is not None:
        directory = out
    elif spec.sweep.dir is not None:
        directory = path.parent / spec.sweep.dir
    elif path.parent == PRESETS_DIR:  # never write into the installed package
        directory = Path(f"{path.stem}-sweep")
    else:
        directory = path.parent / f"{path.stem}-sweep"
    return Sweep(path.stem, directory, spec.base, grids, spec.sweep, device)


def _clashing_key(grid: dict[str, Any], key: str) -> str | None:
    """The grid key that overrides (or lies inside) the dotted ``key``, if the grid mapping has one."""
    inside = (g for g in sorted(grid) if g == key or g.startswith(key + ".") or key.startswith(g + "."))
    return next(inside, None)


# -- grid expansion ------------------------------------------------------------------------------


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.get(key)
        if child is not None and not isinstance(child, dict):  # `data: pacs` with `data.name`: say so
            raise ConfigError(f"grid key {dotted!r}: {key} is {child!r}, not a mapping")
        if child is None:
            child = node[key] = {}
        node = child
    node[leaf] = value


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(tree))


_dataset_cache: dict[str, MultiDomainDataset] = {}


def _dataset_of(config: RunConfig) -> MultiDomainDataset:
    key = json.dumps(config.data.model_dump(mode="json"), sort_keys=True)
    if key not in _dataset_cache:
        _dataset_cache[key] = load_experiment_dataset(config)
    return _dataset_cache[key]


_PARAMS_KEY = "prune.criterion_params"


def _criterion_param(key: str) -> str | None:
    """The criterion parameter a grid key sets: ``prune.criterion_params.X``, or the older ``prune.alpha``."""
    if key == "prune.alpha":
        return "alpha"
    return key.removeprefix(_PARAMS_KEY + ".") if key.startswith(_PARAMS_KEY + ".") else None


def _foreign_param(param: str, criterion: Any, grid_criteria: list[str]) -> bool:
    """A parameter the grid varies for some of its criteria, but not one of ``criterion``'s."""
    if criterion not in REGISTRY or param in criterion_param_names(criterion):
        return False
    return any(param in criterion_param_names(c) for c in grid_criteria)


def expand_grid(base: dict[str, Any], grids: list[dict[str, Any]]) -> list[RunConfig]:
    """Every run of the grids (union of Cartesian products), validated and deduplicated by id.

    The order is canonical (seed, data, model, algorithm, target, keep ratio, criterion, ...), so it
    does not depend on the order of keys or values in the file.
    """
    by_id: dict[str, RunConfig] = {}
    for number, grid in enumerate(grids):
        keys = sorted(grid)
        values = [v if isinstance(v, list) else [v] for v in (grid[k] for k in keys)]
        for key, options in zip(keys, values, strict=True):
            if not options:
                raise ConfigError(f"grid {number}: {key!r} has an empty list of values")
        listed = values[keys.index("prune.criterion")] if "prune.criterion" in keys else []
        grid_criteria = [c for c in listed if c in REGISTRY]
        for combo in itertools.product(*values):
            tree = _deep_copy(base)
            targets: list[str] | None = None
            for key, value in zip(keys, combo, strict=True):
                if key == "target":
                    targets = None if value == "all" else [str(value)]
                    continue
                if key != _PARAMS_KEY and _criterion_param(key) is None:
                    _set_dotted(tree, key, value)
            criterion = (tree.get("prune") or {}).get("criterion", DEFAULT_CRITERION)
            for key, value in zip(keys, combo, strict=True):  # criterion parameters, once it is known
                if key == _PARAMS_KEY and isinstance(value, dict):
                    value = {
                        k: v for k, v in value.items() if not _foreign_param(k, criterion, grid_criteria)
                    }
                elif (param := _criterion_param(key)) is None or _foreign_param(
                    param, criterion, grid_criteria
                ):
                    continue
                _set_dotted(tree, key, value)
            if tree.get("target") is not None:
                tree["target"] = str(tree["target"])
            prune = tree.get("prune") or {}
            if prune.get("finetune_algorithm") == SAME_AS_PRETRAIN:
                prune["finetune_algorithm"] = (tree.get("pretrain") or {}).get("algorithm", "erm")
            config = build_config(base=tree)
            if targets is None and config.target is None:  # `target: all` (or no target at all)
                targets = _dataset_of(config).domain_names
            for target in targets or [config.target]:
                resolved = build_config(base=config.model_dump(), overrides={"target": target})
                dataset = _dataset_of(resolved)
                if target not in dataset.domain_names:
                    raise ConfigError(
                        f"grid {number}: unknown target domain {target!r} of {dataset.name}; "
                        f"valid: {', '.join(dataset.domain_names)}"
                    )
                by_id.setdefault(resolved.run_id(), resolved)
    return sorted(by_id.values(), key=_canonical_key)


def _canonical_key(c: RunConfig) -> tuple:
    domains = _dataset_of(c).domain_names
    return (
        c.seed,
        json.dumps(c.data.model_dump(mode="json"), sort_keys=True),
        json.dumps(c.model.model_dump(mode="json"), sort_keys=True),
        c.pretrain.algorithm,
        json.dumps(c.pretrain.model_dump(mode="json"), sort_keys=True),
        domains.index(c.target) if c.target in domains else len(domains),
        -c.prune.keep_ratio,
        c.prune.criterion,
        c.prune.finetune_algorithm,
        tuple(sorted(c.prune.criterion_params.items())),
        c.run_id(),
    )


def group_units(configs: list[RunConfig]) -> list[Unit]:
    """Runs grouped by pretrained model, in the order of their first run."""
    units: dict[str, Unit] = {}
    for config in configs:
        unit_id = config.pretrain_id()
        if unit_id not in units:
            units[unit_id] = Unit(unit_id, config, [])
        units[unit_id].runs.append(config)
    return list(units.values())


def _labels(config: RunConfig, dense: bool = False) -> dict[str, Any]:
    return {
        "dataset": config.data.name,
        "target_domain": config.target,
        "model": config.model.name,
        "algorithm": config.pretrain.algorithm,
        "finetune_algorithm": None if dense else config.prune.finetune_algorithm,
        "criterion": "none" if dense else config.prune.criterion,
        "criterion_params": {} if dense else dict(config.prune.criterion_params),
        "keep_ratio": 1.0 if dense else config.prune.keep_ratio,
        "seed": config.seed,
    }


def register_sweep(store: Store, sweep: Sweep) -> int:
    return store.register((unit.unit_id, unit.specs()) for unit in sweep.units())


# -- executing one unit --------------------------------------------------------------------------


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


def describe_result(r: ResultRecord) -> str:
    label = criterion_label(r.criterion, r.criterion_params)
    what = "dense" if r.criterion == "none" else f"{label} keep {r.keep_ratio:g}"
    if r.finetune_algorithm not in (None, "erm"):
        what += f" ft {r.finetune_algorithm}"
    return (
        f"done {r.run_id}: {r.dataset} target {r.target_domain} seed {r.seed} {r.algorithm} {what}: "
        f"intra {100 * r.intra_acc:.2f}% cross {100 * r.cross_acc:.2f}% ({r.wall_time_s:.1f} s)"
    )


def error_text(err: BaseException) -> str:
    """The end of ``err``'s traceback, as stored with a failed unit or run."""
    text = "".join(traceback.format_exception(err))
    return text[-4000:]  # the end of a traceback says most


def _drop_leftover_checkpoint(directory: Path) -> None:
    """A kill between writing metrics.json and deleting the checkpoint leaves both: the stage is done."""
    (directory / CHECKPOINT_FILE).unlink(missing_ok=True)


def measure_latency_ms(
    model: nn.Module, example_input: torch.Tensor, reps: int = 20, warmup: int = 3
) -> float:
    """Median wall time of one batch-1 forward pass in eval mode, in milliseconds.

    Measured while other workers may be running: compare latencies within one sweep only.
    """
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            start = time.perf_counter()
            model(example_input)
            if example_input.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def layer_widths(compressed: nn.Module, structure_dir: Path) -> list[list]:
    """[conv name, output channels kept, dense output channels] for every conv, in module order."""
    structure = json.loads((structure_dir / STRUCTURE_FILE).read_text())
    dense = conv_widths(build_model(**structure["build"]))
    return [[name, kept, dense.get(name, kept)] for name, kept in conv_widths(compressed).items()]


def execute_unit(
    pretrain_config: RunConfig,
    runs: list[RunConfig],
    todo: set[str],
    sweep_dir: Path,
    sink: ResultSink,
    device: str | None = None,
) -> None:
    """Pretrain once (or reuse it), then prune for every run in ``todo``; report each to ``sink``.

    A failing pruning run is reported and the others go on; a failing pretraining fails them all.
    """
    if device is not None:
        pretrain_config = pretrain_config.model_copy(update={"device": device})
        runs = [r.model_copy(update={"device": device}) for r in runs]
    unit_id = pretrain_config.pretrain_id()
    pretrained_dir = sweep_dir / "pretrained" / unit_id
    try:
        dataset = _dataset_of(pretrain_config)
        ctx = make_context(pretrain_config, dataset)
        if unit_id in todo:
            sink.started(unit_id)
        dense = run_pretrain(ctx, pretrained_dir)
        _drop_leftover_checkpoint(pretrained_dir)
        if unit_id in todo:
            model = ctx.load_model_dir(pretrained_dir)
            latency = measure_latency_ms(model, ctx.example_input)
            sink.done(unit_id, RunResult(dense, latency, layer_widths(model, pretrained_dir)))
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
        out_dir = sweep_dir / "runs" / run_id
        try:
            run_ctx = make_context(config, dataset)
            record = run_prune(run_ctx, pretrained_dir, out_dir)
            _drop_leftover_checkpoint(out_dir)
            model = run_ctx.load_model_dir(out_dir)
            latency = measure_latency_ms(model, run_ctx.example_input)
            sink.done(run_id, RunResult(record, latency, layer_widths(model, out_dir), dense))
        except Exception as err:
            sink.failed(run_id, error_text(err))


def unit_configs(store: Store, unit_id: str) -> tuple[RunConfig, list[RunConfig]]:
    """The unit's configs as registered in the database (the database is the source of truth)."""
    rows = store.runs_of_unit(unit_id)
    pruned = [RunConfig.model_validate(json.loads(r["config"])) for r in rows if r["kind"] == "pruned"]
    if not pruned:
        raise ConfigError(f"unit {unit_id} has no pruning runs")
    return pruned[0], pruned


# -- local workers -------------------------------------------------------------------------------


class Heartbeat:
    """A thread that keeps the held units' heartbeat fresh (its own database connection)."""

    def __init__(self, db_path: Path, every_s: float) -> None:
        self.db_path, self.every_s = db_path, every_s
        self.units: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with Store(self.db_path) as store:
            while not self._stop.wait(self.every_s):
                with contextlib.suppress(Exception):  # a missed beat is harmless; the next one retries
                    store.heartbeat(list(self.units))


def default_workers(cores: int | None = None, memory_bytes: int | None = None) -> int:
    """One single-threaded worker per core, with at least 2 GiB of memory each.

    Measured on 2 cores (docs/experiments.md): two 1-thread workers did 8% more MNIST_CNN steps per
    second than one 2-thread worker, since these small convolutions scale poorly across threads.
    """
    cores = cores or os.cpu_count() or 1
    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # not POSIX: no memory cap
            memory_bytes = cores * 2**31
    return max(1, min(cores, memory_bytes // 2**31))


def resolve_workers(workers: int | str | None, gpus: int = 0) -> int:
    """``auto``: one worker per GPU when the sweep runs on CUDA, else ``default_workers()``."""
    if workers in (None, "auto"):
        return gpus or default_workers()
    try:
        count = int(workers)
    except ValueError:
        raise ConfigError(f"workers must be a number or auto, got {workers!r}") from None
    if count < 1:
        raise ConfigError(f"workers must be >= 1, got {count}")
    return count


def resolve_threads(threads: int | str, workers: int) -> int:
    """Torch threads per worker: the cores shared out between the workers unless fixed."""
    if threads == "auto":
        return max(1, (os.cpu_count() or 1) // workers)
    return max(1, int(threads))


def cuda_gpus(sweep: Sweep) -> int:
    """GPUs the sweep's runs will use: 0 unless some run's device resolves to CUDA."""
    if not torch.cuda.is_available():
        return 0
    devices = {sweep.device} if sweep.device is not None else {c.device for c in sweep.configs()}
    return torch.cuda.device_count() if devices & {"cuda", "auto"} else 0


def reclaim_dead(
    store: Store, stale_after_s: float, echo: Callable[[str], None] | None, max_attempts: int | None
) -> None:
    """Take back the units of dead workers (see Store.reclaim_stale), saying so."""
    for unit_id in store.reclaim_stale(stale_after_s, max_attempts=max_attempts):
        if echo:
            echo(f"took back unit {unit_id}: its worker is gone (dead process, or no heartbeat)")


def claim_next(
    store: Store,
    worker: str,
    only: list[str] | None,
    stale_after_s: float,
    poll_s: float,
    echo: Callable[[str], None] | None = None,
) -> Claim | None:
    """The next unit to run, or None once every unit (of ``only``) is done or failed.

    While none is pending but some are held by other workers (peers, other sweep processes), waits:
    a live holder finishes its unit, a dead one's unit is taken back and claimed here, so a sweep
    never ends with a unit left running under a dead claim.
    """
    while True:
        reclaim_dead(store, stale_after_s, echo, MAX_UNIT_ATTEMPTS)
        claim = store.claim(worker, only=only)
        if claim is not None or not store.count_units("running", only):
            return claim
        time.sleep(poll_s)


def worker_loop(
    db_path: str,
    sweep_dir: str,
    worker: str,
    threads: int,
    heartbeat_s: float,
    device: str | None = None,
    quiet: bool = False,
    only: list[str] | None = None,
    gpu: int | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> int:
    """Claim units (of ``only``, if given) until all are done or failed; returns how many this ran.

    Between units it takes back the units of dead workers (:func:`claim_next`); when nothing is
    pending it waits for the units other workers hold. ``gpu``: the CUDA device this worker's runs
    use (workers are spread over the GPUs)."""
    torch.set_num_threads(threads)
    if gpu is not None:
        torch.cuda.set_device(gpu)
    echo = None if quiet else (lambda line: print(f"[{worker}] {line}", flush=True))
    poll_s = poll_interval(heartbeat_s, stale_after_s)
    done = 0
    with Store(db_path) as store, Heartbeat(Path(db_path), heartbeat_s) as beat:
        sink = StoreSink(store, echo)
        while (claim := claim_next(store, worker, only, stale_after_s, poll_s, echo)) is not None:
            beat.units = {claim.unit_id}
            try:
                pretrain_config, runs = unit_configs(store, claim.unit_id)
                execute_unit(pretrain_config, runs, set(claim.run_ids), Path(sweep_dir), sink, device)
            except Exception as err:
                store.fail_unit(claim.unit_id, error_text(err))
            store.finish_unit(claim.unit_id)
            beat.units = set()
            done += 1
    return done


@dataclass
class SweepOutcome:
    counts: dict[str, int]
    wall_s: float
    failed: list[dict[str, Any]]
    rerun: list[str] = field(default_factory=list)  # finished runs whose model directory was gone


def model_dir(sweep_dir: Path, kind: str, run_id: str) -> Path:
    """Where a run's model lives: ``pretrained/<id>`` for a dense row, ``runs/<id>`` for a pruned one."""
    return sweep_dir / ("pretrained" if kind == "dense" else "runs") / run_id


def requeue_missing_models(store: Store, sweep: Sweep) -> list[str]:
    """Finished runs of the sweep whose model directory is gone (or lacks a file) run again.

    Their numbers are in the database, but the model is the product (and a unit's pretrained model
    is also what its pruning runs start from), so the run is recomputed, to the same numbers.
    """
    missing = []
    for row in store.rows("done", run_ids=sweep.run_ids()):
        directory = model_dir(sweep.directory, row["kind"], row["run_id"])
        if not all((directory / name).is_file() for name in MODEL_DIR_FILES):
            missing.append(row["run_id"])
    if not missing:
        return []
    store.requeue(missing)
    requeued = store.rows("pending", run_ids=missing)  # not those of a unit another worker holds
    for row in requeued:  # a leftover metrics.json would mark the stage done: it must run again
        (model_dir(sweep.directory, row["kind"], row["run_id"]) / METRICS_FILE).unlink(missing_ok=True)
    return [row["run_id"] for row in requeued]


def run_sweep(
    sweep: Sweep,
    workers: int | str | None = None,
    ray_address: str | None = None,
    retry_failed: bool = True,
    quiet: bool = False,
) -> SweepOutcome:
    """Register the grid, reclaim units of dead workers, run everything pending; resumable.

    Local: ``workers`` processes (1 runs in this process), each with cores // workers torch threads.
    Ray: the same unit function as Ray tasks (see ray_runner.py). Finished runs whose model
    directory is gone run again. Returns once no unit of the sweep is pending or running: units
    that other sweep processes hold are waited for, and taken back if their worker dies.
    """
    started = time.monotonic()
    gpus = cuda_gpus(sweep)
    count = resolve_workers(workers if workers is not None else sweep.options.workers, gpus)
    sweep.directory.mkdir(parents=True, exist_ok=True)
    with Store(sweep.db_path) as store:
        register_sweep(store, sweep)
        store.reclaim_stale(sweep.options.stale_after_s)
        unit_ids = [unit.unit_id for unit in sweep.units()]
        if retry_failed:
            store.reset_failed(unit_ids)
        rerun = requeue_missing_models(store, sweep)
        pending = store.count_units("pending", unit_ids)
        held = store.count_units("running", unit_ids)  # by another sweep process: wait for them
    if rerun and not quiet:
        print(f"{len(rerun)} finished run(s) lost their model directory; running them again", flush=True)
    threads = resolve_threads(sweep.options.threads, count)
    # No idle workers, and none at all when everything is done; one waits for units held elsewhere.
    count = min(count, max(pending, 1 if held else 0))
    if ray_address is not None:
        from dgprune.experiments.ray_runner import run_units_ray

        # On Ray each task asks for as many CPUs as it uses threads (auto: 1 each).
        cpus = 1 if sweep.options.threads == "auto" else threads
        run_units_ray(sweep, ray_address, cpus_per_task=cpus, quiet=quiet, only=unit_ids)
    elif count == 1:
        worker_loop(
            str(sweep.db_path),
            str(sweep.directory),
            "w0",
            threads,
            sweep.options.heartbeat_s,
            sweep.device,
            quiet,
            unit_ids,
            None,
            sweep.options.stale_after_s,
        )
    elif count > 1:
        _run_processes(sweep, count, threads, quiet, unit_ids, gpus)
    with Store(sweep.db_path) as store:
        rows = store.rows(run_ids=sweep.run_ids())
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pending", "running", "done", "failed")}
    failed = [r for r in rows if r["status"] == "failed"]
    return SweepOutcome(counts, time.monotonic() - started, failed, rerun)


def _worker_process(*args: Any) -> None:
    """A worker process: Ctrl-C reaches every process of the terminal; the parent alone reports it
    (one line), so a worker stops without a traceback. Its unit is reclaimed by the next run."""
    try:
        worker_loop(*args)
    except KeyboardInterrupt:
        sys.exit(130)


def _run_processes(
    sweep: Sweep, count: int, threads: int, quiet: bool, only: list[str], gpus: int = 0
) -> None:
    # spawn, not fork: a forked child would inherit torch's thread pools and this process's state.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_worker_process,
            args=(
                str(sweep.db_path),
                str(sweep.directory),
                f"w{i}",
                threads,
                sweep.options.heartbeat_s,
                sweep.device,
                quiet,
                only,
                i % gpus if gpus else None,
                sweep.options.stale_after_s,
            ),
            name=f"dgprune-worker-{i}",
        )
        for i in range(count)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    crashed = {p.pid: p.exitcode for p in processes if p.exitcode != 0}
    if crashed:  # a worker that died (e.g. out of memory) leaves its unit running: fail it, with why
        with Store(sweep.db_path) as store:
            for unit in store.units():
                if unit["status"] == "running" and unit["pid"] in crashed and unit["host"] == this_host():
                    store.fail_unit(
                        unit["unit_id"],
                        f"worker process {unit['pid']} died (exit code {crashed[unit['pid']]})",
                    )


# -- status --------------------------------------------------------------------------------------


@dataclass
class SweepStatus:
    counts: dict[str, int]
    total: int
    running: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    eta_s: float | None
    parallel: int


def sweep_status(sweep: Sweep, now: float | None = None) -> SweepStatus:
    """Counts per status (runs not yet registered count as pending) and an ETA.

    ETA = remaining work / parallelism: each pending run costs the mean wall time of the finished
    runs of its kind (dense or pruned); a running one, that minus its elapsed time; parallelism is
    the number of live workers (or the configured number when none is running).
    """
    now = time.time() if now is None else now
    ids = sweep.run_ids()
    kinds = {spec.run_id: spec.kind for unit in sweep.units() for spec in unit.specs()}
    rows: dict[str, dict[str, Any]] = {}
    if sweep.db_path.is_file():
        with Store(sweep.db_path) as store:
            rows = {r["run_id"]: r for r in store.rows(run_ids=ids)}
            units = {u["unit_id"]: u for u in store.units()}
    else:
        units = {}
    counts = {"done": 0, "running": 0, "failed": 0, "pending": 0}
    for run_id in ids:
        counts[rows[run_id]["status"] if run_id in rows else "pending"] += 1
    done = [r for r in rows.values() if r["status"] == "done" and r["wall_time_s"] is not None]
    mean_s = {
        kind: statistics.mean(r["wall_time_s"] for r in done if r["kind"] == kind)
        for kind in ("dense", "pruned")
        if any(r["kind"] == kind for r in done)
    }
    running = [r for r in rows.values() if r["status"] == "running"]
    live = {
        (u["host"], u["pid"])
        for u in units.values()
        if u["status"] == "running"
        and u["heartbeat"] is not None
        and now - u["heartbeat"] < sweep.options.stale_after_s
        and (u["host"] != this_host() or pid_alive(u["pid"]))
    }
    parallel = max(1, len(live) or resolve_workers(sweep.options.workers, cuda_gpus(sweep)))
    eta: float | None = 0.0
    for run_id in ids:
        row = rows.get(run_id)
        status = row["status"] if row else "pending"
        if status in ("done", "failed"):
            continue
        kind = kinds[run_id]
        if kind not in mean_s:
            eta = None
            break
        elapsed = now - row["started_at"] if status == "running" and row and row["started_at"] else 0.0
        eta += max(mean_s[kind] - elapsed, 0.0)
    if eta is not None:
        eta /= parallel
    return SweepStatus(
        counts, len(ids), running, [r for r in rows.values() if r["status"] == "failed"], eta, parallel
    )


def sweep_records(sweep: Sweep | None, db_path: Path) -> list[ResultRecord]:
    """The finished records of the sweep (of the whole database when ``sweep`` is None)."""
    if not db_path.is_file():
        raise ConfigError(f"no results database at {db_path}; run `dgprune sweep` first")
    with Store(db_path) as store:
        return store.records(sweep.run_ids() if sweep is not None else None)
