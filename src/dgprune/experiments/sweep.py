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
given. Normalisations keep equivalent runs single: α is set to its default for every criterion but
IoR (α is IoR's weight only), and ``prune.finetune_algorithm: same`` means the pretraining algorithm.

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
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from dgprune.data import MultiDomainDataset
from dgprune.errors import ConfigError
from dgprune.experiments.config import RunConfig, _read_mapping, build_config, format_validation_error
from dgprune.experiments.pipeline import (
    load_experiment_dataset,
    make_context,
    run_pretrain,
    run_prune,
)
from dgprune.experiments.records import ResultRecord
from dgprune.experiments.store import RunResult, RunSpec, Store, pid_alive, this_host
from dgprune.models import build_model
from dgprune.pruning.surgery import STRUCTURE_FILE
from dgprune.training.checkpoint import CHECKPOINT_FILE
from dgprune.training.settings import PruneSettings

PRESETS_DIR = Path(__file__).parent / "presets"
SAME_AS_PRETRAIN = "same"
DEFAULT_ALPHA: float = PruneSettings.model_fields["alpha"].default


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
        120.0, gt=0, description="a running unit whose heartbeat is older than this is reclaimed"
    )


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


def load_sweep(config: str | Path, out: Path | None = None, device: str | None = None) -> Sweep:
    """Read and validate a sweep file (or preset name); expands nothing yet."""
    path = resolve_sweep_path(str(config))
    try:
        spec = SweepFile.model_validate(_read_mapping(path))
    except ValidationError as err:
        raise ConfigError(f"{path}: invalid sweep file:\n{format_validation_error(err)}") from None
    grids = spec.grid if isinstance(spec.grid, list) else [spec.grid]
    if out is not None:
        directory = out
    elif spec.sweep.dir is not None:
        directory = path.parent / spec.sweep.dir
    elif path.parent == PRESETS_DIR:  # never write into the installed package
        directory = Path(f"{path.stem}-sweep")
    else:
        directory = path.parent / f"{path.stem}-sweep"
    return Sweep(path.stem, directory, spec.base, grids, spec.sweep, device)


# -- grid expansion ------------------------------------------------------------------------------


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
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


def _normalise(config: RunConfig) -> RunConfig:
    """Equivalent runs get one id: α only weighs IoR's variance term."""
    if config.prune.criterion != "ior" and config.prune.alpha != DEFAULT_ALPHA:
        payload = config.model_dump()
        payload["prune"]["alpha"] = DEFAULT_ALPHA
        return RunConfig.model_validate(payload)
    return config


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
        for combo in itertools.product(*values):
            tree = _deep_copy(base)
            targets: list[str] | None = None
            for key, value in zip(keys, combo, strict=True):
                if key == "target":
                    targets = None if value == "all" else [str(value)]
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
                resolved = _normalise(resolved)
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
        c.prune.alpha,
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
        "alpha": None if dense or config.prune.criterion != "ior" else config.prune.alpha,
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
    what = "dense" if r.criterion == "none" else f"{r.criterion} keep {r.keep_ratio:g}"
    if r.alpha not in (None, DEFAULT_ALPHA):
        what += f" α={r.alpha:g}"
    if r.finetune_algorithm not in (None, "erm"):
        what += f" ft {r.finetune_algorithm}"
    return (
        f"done {r.run_id}: {r.dataset} target {r.target_domain} seed {r.seed} {r.algorithm} {what}: "
        f"intra {100 * r.intra_acc:.2f}% cross {100 * r.cross_acc:.2f}% ({r.wall_time_s:.1f} s)"
    )


def _error_text(err: BaseException) -> str:
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
        error = f"pretraining failed: {_error_text(err)}"
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
            sink.failed(run_id, _error_text(err))


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
) -> int:
    """Claim units (of ``only``, if given) until none is pending; returns how many this worker ran.

    ``gpu``: the CUDA device this worker's runs use (workers are spread over the GPUs)."""
    torch.set_num_threads(threads)
    if gpu is not None:
        torch.cuda.set_device(gpu)
    echo = None if quiet else (lambda line: print(f"[{worker}] {line}", flush=True))
    done = 0
    with Store(db_path) as store, Heartbeat(Path(db_path), heartbeat_s) as beat:
        sink = StoreSink(store, echo)
        while (claim := store.claim(worker, only=only)) is not None:
            beat.units = {claim.unit_id}
            try:
                pretrain_config, runs = unit_configs(store, claim.unit_id)
                execute_unit(pretrain_config, runs, set(claim.run_ids), Path(sweep_dir), sink, device)
            except Exception as err:
                store.fail_unit(claim.unit_id, _error_text(err))
            store.finish_unit(claim.unit_id)
            beat.units = set()
            done += 1
    return done


@dataclass
class SweepOutcome:
    counts: dict[str, int]
    wall_s: float
    failed: list[dict[str, Any]]


def run_sweep(
    sweep: Sweep,
    workers: int | str | None = None,
    ray_address: str | None = None,
    retry_failed: bool = True,
    quiet: bool = False,
) -> SweepOutcome:
    """Register the grid, reclaim units of dead workers, run everything pending; resumable.

    Local: ``workers`` processes (1 runs in this process), each with cores // workers torch threads.
    Ray: the same unit function as Ray tasks (see ray_runner.py).
    """
    started = time.monotonic()
    gpus = cuda_gpus(sweep)
    count = resolve_workers(workers if workers is not None else sweep.options.workers, gpus)
    sweep.directory.mkdir(parents=True, exist_ok=True)
    with Store(sweep.db_path) as store:
        register_sweep(store, sweep)
        store.reclaim_stale(sweep.options.stale_after_s)
        unit_ids = [unit.unit_id for unit in sweep.units()]
        mine = set(unit_ids)
        if retry_failed:
            store.reset_failed(unit_ids)
        pending = sum(u["status"] == "pending" and u["unit_id"] in mine for u in store.units())
    threads = resolve_threads(sweep.options.threads, count)
    count = min(count, pending)  # no idle workers (and none at all when everything is done)
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
        )
    elif count > 1:
        _run_processes(sweep, count, threads, quiet, unit_ids, gpus)
    with Store(sweep.db_path) as store:
        rows = store.rows(run_ids=sweep.run_ids())
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pending", "running", "done", "failed")}
    return SweepOutcome(counts, time.monotonic() - started, [r for r in rows if r["status"] == "failed"])


def _run_processes(
    sweep: Sweep, count: int, threads: int, quiet: bool, only: list[str], gpus: int = 0
) -> None:
    # spawn, not fork: a forked child would inherit torch's thread pools and this process's state.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=worker_loop,
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
