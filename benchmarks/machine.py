"""Facts about the machine a benchmark ran on, recorded next to its figures (shared by the benchmarks)."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores_available": available_cores(),
        "torch_threads": threads,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_average_1_5_15_min_at_start": load_average(),
    }


def load_average() -> list[float] | None:
    """Other work on the machine (the figures are ratios, but a busy machine widens their spread)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
