"""Run a sweep's units on a Ray cluster, with the same unit function as the local workers.

Design (see docs/experiments.md):

- The **driver** (the `dgprune sweep --ray ...` process) owns the SQLite database: it claims units,
  keeps their heartbeat fresh while their task is in flight, and writes every result. SQLite is
  never opened on another node, so the database may stay on the driver's local disk.
- Each unit is one Ray task (``num_cpus`` = ``cpus_per_task``) that calls the sweep's unit
  function (:func:`dgprune.experiments.sweep.execute_unit`) with a list sink and returns it, with
  its started / done / failed events, which the driver replays into the database.
- This module imports nothing of ``experiments.sweep`` (which calls it): the sweep hands it the
  unit function and the database steps it needs as a :class:`RayUnits`.
- A task lost with its worker or node (a node that dies, a worker killed for memory) is run again
  by Ray (``max_retries`` = :data:`RAY_TASK_RETRIES`) on a live node; the driver still holds the
  unit meanwhile, and records the events of the one attempt that returns, so every run is recorded
  exactly once. A task that fails even so fails its unit, with Ray's error.
- Between tasks the driver also takes back units that other sweep processes on the same database
  hold under a dead claim, and waits for the ones they hold alive (as local workers do).
- Model directories and mid-stage checkpoints are written by the task under the sweep directory.
  Results never depend on it, but for a killed sweep to resume *from checkpoints* (rather than
  recompute a unit from scratch, to the same numbers), the sweep directory must be on a file system
  every node shares (NFS, a mounted bucket). On a single machine (``--ray local``) it always is.

Ray is optional: ``pip install 'ray>=2.40'``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dgprune.errors import ConfigError
from dgprune.experiments.config import RunConfig
from dgprune.experiments.store import Store

Echo = Callable[[str], None] | None


@dataclass(frozen=True)
class RayUnits:
    """What the sweep gives the Ray runner: how to run a unit and the steps of the database around it.

    ``execute_unit`` and ``new_sink`` travel to the Ray tasks (module-level callables: Ray pickles
    them by reference); the others run in the driver.
    """

    # (pretrain_config, runs, todo, sweep_dir, sink, device) -> None; reports each run to the sink
    execute_unit: Callable[..., None]
    new_sink: Callable[[], Any]  # a picklable sink that records events and can ``replay(sink)`` them
    store_sink: Callable[[Store, Echo], Any]  # the driver's sink: writes the events into the database
    unit_configs: Callable[[Store, str], tuple[RunConfig, list[RunConfig]]]  # a unit's registered configs
    reclaim_dead: Callable[[Store, Echo], None]  # take back units whose worker is gone
    error_text: Callable[[BaseException], str]  # what a failed unit stores


# Ray re-runs a task whose worker process or node died (not one that raised: units report their own
# errors as events). A retried unit resumes from its checkpoints when the sweep directory is shared.
RAY_TASK_RETRIES = 3


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'ray>=2.40' (or run without --ray)") from None
    return ray


def connect(address: str, num_cpus: int | None = None) -> Any:
    """Connect to (or start) Ray: ``auto``/``host:port``/``ray://...`` join a cluster, ``local`` starts one.

    An already initialised Ray (e.g. ``ray.init(num_cpus=2)`` by the caller) is used as it is.
    """
    ray = _import_ray()
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(
                f"cannot connect to Ray at {address!r} ({err}); start a cluster (`ray start --head`) "
                "or use --ray local"
            ) from None
    return ray


def unit_task(
    execute_unit: Callable[..., None],
    new_sink: Callable[[], Any],
    pretrain_config: dict[str, Any],
    runs: list[dict[str, Any]],
    todo: list[str],
    sweep_dir: str,
    device: str | None,
    threads: int,
) -> Any:
    """The body of one Ray task: run the unit, return the sink with its events (plain picklable data)."""
    torch.set_num_threads(threads)
    sink = new_sink()
    execute_unit(
        RunConfig.model_validate(pretrain_config),
        [RunConfig.model_validate(r) for r in runs],
        set(todo),
        Path(sweep_dir),
        sink,
        device,
    )
    return sink


def run_units_ray(
    units: RayUnits,
    db_path: Path,
    sweep_dir: Path,
    address: str,
    device: str | None = None,
    heartbeat_s: float = 10.0,
    poll_s: float = 5.0,
    cpus_per_task: int = 1,
    quiet: bool = False,
    only: list[str] | None = None,
) -> int:
    """Run every pending unit of the (registered) sweep in ``db_path`` as Ray tasks; returns how many ran.

    Returns once no unit (of ``only``) is pending or running, as the sweep's local workers do.
    ``device`` overrides every run's device; ``heartbeat_s``/``poll_s`` as the sweep's options.
    """
    ray = connect(address)
    remote = ray.remote(num_cpus=cpus_per_task, max_retries=RAY_TASK_RETRIES)(unit_task)
    echo = None if quiet else (lambda line: print(f"[ray] {line}", flush=True))
    in_flight: dict[Any, str] = {}
    held: set[str] = set()
    stop = threading.Event()
    ran = 0

    def beat() -> None:  # the driver vouches for the units its tasks hold
        with Store(db_path) as beat_store:
            while not stop.wait(heartbeat_s):
                with contextlib.suppress(Exception):  # a missed beat is harmless
                    beat_store.heartbeat(list(held))

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        with Store(db_path) as store:
            sink = units.store_sink(store, echo)
            while True:
                units.reclaim_dead(store, echo)
                # Asked each round: nodes that join (or die) change how many tasks can run at once.
                capacity = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))
                while len(in_flight) < capacity and (claim := store.claim("ray", only=only)) is not None:
                    pretrain_config, runs = units.unit_configs(store, claim.unit_id)
                    store.mark_running(claim.run_ids)
                    ref = remote.remote(
                        units.execute_unit,
                        units.new_sink,
                        pretrain_config.model_dump(mode="json"),
                        [r.model_dump(mode="json") for r in runs],
                        claim.run_ids,
                        str(sweep_dir.resolve()),
                        device,
                        cpus_per_task,
                    )
                    in_flight[ref] = claim.unit_id
                    held.add(claim.unit_id)
                if not in_flight:
                    if not store.count_units("running", only):
                        break
                    time.sleep(poll_s)  # units held by another sweep process
                    continue
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll_s)
                for ref in ready:
                    unit_id = in_flight.pop(ref)
                    try:
                        recorded = ray.get(ref)
                    except Exception as err:  # lost even after Ray's retries, or could not start
                        store.fail_unit(unit_id, f"ray task failed: {units.error_text(err)}")
                    else:
                        recorded.replay(sink)
                        store.finish_unit(unit_id)
                    held.discard(unit_id)
                    ran += 1
    finally:
        stop.set()
        beater.join()
    return ran
