"""Sweeps on Ray: a 2-run sweep on a local Ray instance gives the same runs, database and numbers as the
local workers; on a two-node cluster (two `ray start`s on this machine) it survives the second node's
death mid-sweep."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from dgprune.experiments.store import Store
from dgprune.experiments.sweep import load_sweep, run_sweep

ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'ray>=2.40' to run this test")

SWEEP = {
    "base": {
        "data": {"name": "rotated_digits"},
        "model": {"name": "mnist_cnn"},
        "pretrain": {"steps": 6, "batch_size": 16, "eval_every": 3},
        "prune": {"steps": 12, "interval": 2, "batch_size": 16, "eval_every": 4},
        "device": "cpu",
    },
    "grid": {"target": "0", "seed": 0, "prune.criterion": ["taylor", "ior"], "prune.keep_ratio": 0.5},
    "sweep": {"workers": 1, "threads": 1},
}
COMPARED = ("intra_acc", "cross_acc", "per_domain_acc", "filters_kept", "params", "macs", "selected_step")


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_run_sweep_on_local_ray_matches_local_workers(tmp_path, local_ray):
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(SWEEP))
    on_ray = load_sweep(config, tmp_path / "ray")
    outcome = run_sweep(on_ray, ray_address="auto", quiet=True)  # "auto": the Ray this test started
    assert outcome.counts == {"pending": 0, "running": 0, "done": 3, "failed": 0}  # 2 pruned + 1 dense
    threads = torch.get_num_threads()
    try:
        local = run_sweep(load_sweep(config, tmp_path / "local"), quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert local.counts["done"] == 3
    with Store(on_ray.db_path) as a, Store(tmp_path / "local" / "results.sqlite") as b:
        ray_rows = {r["run_id"]: r for r in a.rows()}
        local_rows = {r["run_id"]: r for r in b.rows()}
        assert {u["worker"] for u in a.units()} == {"ray"}
    assert set(ray_rows) == set(local_rows) == set(on_ray.run_ids())
    for run_id, row in ray_rows.items():
        assert {k: row[k] for k in COMPARED} == {k: local_rows[run_id][k] for k in COMPARED}


# -- a two-node cluster on this machine; the second node dies mid-sweep ----------------------------

RAY = Path(sys.executable).parent / "ray"
NODE_SWEEP = {
    "base": {
        **SWEEP["base"],
        "pretrain": {"steps": 12, "batch_size": 8, "eval_every": 6},
        "prune": {"steps": 24, "interval": 2, "batch_size": 8, "eval_every": 12},
    },
    "grid": {"target": "0", "seed": [0, 1], "prune.criterion": "taylor", "prune.keep_ratio": 0.5},
    "sweep": {"workers": 1, "threads": 1},
}
# The GCS declares a silent node dead after about a second (Ray's default: 15 s or more).
FAST_NODE_DEATH = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "300",
    "RAY_health_check_timeout_ms": "300",
    "RAY_health_check_failure_threshold": "3",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_processes(pgid: int) -> dict[int, str]:
    """pid -> command line of every live process of a Ray node started in process group ``pgid``:
    the group and all its descendants (Ray puts each worker process in a group of its own)."""
    procs: dict[int, tuple[int, int, str]] = {}  # pid -> (ppid, pgid, cmdline)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        state, ppid, group = stat.rsplit(")", 1)[-1].split()[:3]
        if state != "Z":
            procs[int(entry.name)] = (int(ppid), int(group), cmdline)
    found = {pid for pid, (_, group, _) in procs.items() if group == pgid}
    while True:
        children = {pid for pid, (ppid, _, _) in procs.items() if ppid in found} - found
        if not children:
            return {pid: procs[pid][2] for pid in found}
        found |= children


def _kill_node(pgid: int) -> None:
    """SIGKILL every process of the node; frozen first, so none starts another or is orphaned."""
    frozen: set[int] = set()
    while pids := set(_node_processes(pgid)) - frozen:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= pids
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive_nodes(address: str) -> int:
    status = subprocess.run(
        [str(RAY), "status", f"--address={address}"], capture_output=True, text=True, timeout=30
    )
    if status.returncode != 0:
        return 0
    active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return active.count("node_")


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def two_node_cluster():
    """A Ray head and a second node, each `ray start --block` in its own process group (so the
    node and every process it starts can be killed as one), each with its own short temp dir."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    dirs = [Path(tempfile.mkdtemp(prefix="dgray")) for _ in range(2)]  # short: Ray's socket paths
    common = [
        "--num-cpus=1",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        "--object-store-memory=80000000",
        "--include-log-monitor=false",
        "--block",
    ]
    env = {**os.environ, **FAST_NODE_DEATH}
    nodes: list[subprocess.Popen] = []

    def start(args: list[str], temp_dir: Path) -> subprocess.Popen:
        log = (temp_dir / "ray-start.log").open("w")
        proc = subprocess.Popen(
            [str(RAY), "start", *args, f"--temp-dir={temp_dir}", *common],
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        nodes.append(proc)
        return proc

    try:
        start(["--head", f"--port={port}", "--include-dashboard=false"], dirs[0])
        _wait(lambda: _port_open(port), 60, "the Ray head")
        worker = start([f"--address={address}"], dirs[1])
        _wait(lambda: _alive_nodes(address) >= 2, 60, "the second Ray node")
        yield address, worker
    finally:
        for proc in nodes:
            _kill_node(proc.pid)
            proc.wait(timeout=30)
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)


def test_sweep_on_two_ray_nodes_survives_the_death_of_one(tmp_path, two_node_cluster):
    """`dgprune sweep --ray HOST:PORT` over a head and a second node (separate `ray start`s); the
    second node is killed (SIGKILL, every process of it) while it runs a unit. Ray runs the lost
    task again on the head: the sweep exits 0 with every run done exactly once, equal to a local sweep."""
    address, worker_node = two_node_cluster
    config = tmp_path / "nodes.yaml"
    config.write_text(yaml.safe_dump(NODE_SWEEP))
    out = tmp_path / "ray"
    script = Path(sys.executable).parent / "dgprune"
    driver = subprocess.Popen(
        [str(script), "sweep", str(config), "--out", str(out), "--ray", address, "--quiet"],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def node_runs_a_unit() -> bool:
            assert driver.poll() is None, "the sweep ended before the second node ran a unit"
            return any("ray::unit_task" in cmd for cmd in _node_processes(worker_node.pid).values())

        _wait(node_runs_a_unit, 60, "a unit running on the second node")
        _kill_node(worker_node.pid)  # as a machine that dies: every process of the node at once
        worker_node.wait(timeout=30)
        _wait(lambda: not _node_processes(worker_node.pid), 10, "the second node's processes to end")
        stdout, stderr = driver.communicate(timeout=80)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 0, stderr + stdout
    assert "done 4/4, failed 0, pending 0" in stdout
    on_ray = load_sweep(config, out)
    threads = torch.get_num_threads()
    try:
        local = run_sweep(load_sweep(config, tmp_path / "local"), quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert local.counts["done"] == 4
    with Store(on_ray.db_path) as a, Store(tmp_path / "local" / "results.sqlite") as b:
        ray_rows, local_rows = a.rows(), {r["run_id"]: r for r in b.rows()}
        units = a.units()
    assert sorted(r["run_id"] for r in ray_rows) == sorted(on_ray.run_ids())  # each run exactly once
    assert {r["status"] for r in ray_rows} == {"done"}
    assert [(u["status"], u["attempts"], u["worker"]) for u in units] == [("done", 1, "ray")] * 2
    for row in ray_rows:
        assert {k: row[k] for k in COMPARED} == {k: local_rows[row["run_id"]][k] for k in COMPARED}
