import os

import pytest
import torch

# Under pytest-xdist (`-n 2` in pyproject's addopts) two workers share the two cores, and each may
# start `dgprune` subprocesses: one torch thread per process, so they do not oversubscribe the cores.
# The environment reaches every subprocess a test starts (run_cli, Popen); a test that wants more
# threads asks for them (Conditions(threads=2), a sweep's `threads`), which still works.
# Also each worker's own dataset / latency cache, so two workers never write the same file (and no
# test reads, or writes into, the user's ~/.cache/dgprune).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER is not None:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _own_cache_dir(tmp_path_factory):
    """$DGPRUNE_CACHE_DIR for this session (this worker's under xdist: tmp_path_factory's base
    directory is per worker); the latency cache follows it (``latency/`` inside)."""
    cache = tmp_path_factory.mktemp("dgprune-cache")
    saved = {k: os.environ.get(k) for k in ("DGPRUNE_CACHE_DIR", "DGPRUNE_LATENCY_CACHE")}
    os.environ["DGPRUNE_CACHE_DIR"] = str(cache)
    os.environ.pop("DGPRUNE_LATENCY_CACHE", None)
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def run_cli(*args: str, cwd=None, timeout: float = 600, input_text: str | None = None):
    """Run the installed ``dgprune`` console script (as a user would) and capture its output."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "dgprune"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, input=input_text
    )
