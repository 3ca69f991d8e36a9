"""Running a sweep: registering its runs, local workers with heartbeats (claim, reclaim, processes), Ray.

A worker claims one unit at a time from the database and keeps its heartbeat fresh while it runs
it; the units of dead workers are taken back. ``run_sweep`` registers the grid and runs every
pending unit in this process (one worker), in worker processes, or as Ray tasks
(``experiments/ray_runner.py``, given the unit function and the database operations it needs).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dgprune.errors import ConfigError
from dgprune.experiments.pipeline import METRICS_FILE
from dgprune.experiments.store import Claim, Store, this_host
from dgprune.experiments.sweep.execute import (
    MODEL_DIR_FILES,
    ListSink,
    StageHooks,
    StoreSink,
    error_text,
    execute_unit,
    model_dir,
    unit_configs,
)
from dgprune.experiments.sweep.spec import DEFAULT_STALE_AFTER_S, Sweep, poll_interval

# A running sweep fails a unit whose worker died on this attempt (e.g. killed for memory each time)
# rather than hand it to the next worker: one bad unit must not take down every worker in turn.
MAX_UNIT_ATTEMPTS = 3


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


def register_sweep(store: Store, sweep: Sweep) -> int:
    return store.register((unit.unit_id, unit.specs()) for unit in sweep.units())


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
    hooks: StageHooks | None = None,
) -> int:
    """Claim units (of ``only``, if given) until all are done or failed; returns how many this ran.

    Between units it takes back the units of dead workers (:func:`claim_next`); when nothing is
    pending it waits for the units other workers hold. ``gpu``: the CUDA device this worker's runs
    use (workers are spread over the GPUs). ``hooks``: progress and TensorBoard of each stage (in
    this process only)."""
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
                execute_unit(pretrain_config, runs, set(claim.run_ids), Path(sweep_dir), sink, device, hooks)
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
    hooks: StageHooks | None = None,
) -> SweepOutcome:
    """Register the grid, reclaim units of dead workers, run everything pending; resumable.

    Local: ``workers`` processes (1 runs in this process), each with cores // workers torch threads.
    Ray: the same unit function as Ray tasks (see ray_runner.py). Finished runs whose model
    directory is gone run again. Returns once no unit of the sweep is pending or running: units
    that other sweep processes hold are waited for, and taken back if their worker dies.
    ``hooks`` (progress, TensorBoard) need the work done in this process: one worker, no Ray.
    """
    started = time.monotonic()
    gpus = cuda_gpus(sweep)
    count = resolve_workers(workers if workers is not None else sweep.options.workers, gpus)
    if hooks is not None and (count > 1 or ray_address is not None):
        raise ValueError("stage hooks run in this process: use one local worker")
    sweep.directory.mkdir(parents=True, exist_ok=True)
    with Store(sweep.db_path) as store:
        register_sweep(store, sweep)
        store.rows(run_ids=sweep.run_ids())  # a damaged row of the sweep: one error now, not in a worker
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
        _run_on_ray(sweep, ray_address, threads, quiet, unit_ids)
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
            hooks,
        )
    elif count > 1:
        _run_processes(sweep, count, threads, quiet, unit_ids, gpus)
    with Store(sweep.db_path) as store:
        rows = store.rows(run_ids=sweep.run_ids())
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pending", "running", "done", "failed")}
    failed = [r for r in rows if r["status"] == "failed"]
    return SweepOutcome(counts, time.monotonic() - started, failed, rerun)


def _run_on_ray(sweep: Sweep, address: str, threads: int, quiet: bool, only: list[str]) -> None:
    # ray_runner knows nothing of this package: it is given the unit function and the database steps.
    from dgprune.experiments.ray_runner import RayUnits, run_units_ray

    units = RayUnits(
        execute_unit=execute_unit,
        new_sink=ListSink,
        store_sink=StoreSink,
        unit_configs=unit_configs,
        reclaim_dead=lambda store, echo: reclaim_dead(
            store, sweep.options.stale_after_s, echo, MAX_UNIT_ATTEMPTS
        ),
        error_text=error_text,
    )
    # On Ray each task asks for as many CPUs as it uses threads (auto: 1 each).
    cpus = 1 if sweep.options.threads == "auto" else threads
    run_units_ray(
        units,
        sweep.db_path,
        sweep.directory,
        address,
        device=sweep.device,
        heartbeat_s=sweep.options.heartbeat_s,
        poll_s=sweep.options.poll_s,
        cpus_per_task=cpus,
        quiet=quiet,
        only=only,
    )


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
