"""A latency lookup table, measured on the deployment runtime: each convolution's latency as a function of
its (input channels, output channels), and the model's latency predicted from it (docs/method.md
"Budgets", docs/benchmarks.md §8).

How it is measured. Every convolution of the model (pruning/cost_model.py ``LayerShape``) is timed alone,
at its input size and batch, on a grid of widths the schedule can reach: multiples of ``round_to`` (1, 2,
... when it is 1), thinned to at most ``points`` values per axis for wide layers (the grid step is then a
multiple of ``round_to``; the dense width and the narrowest reachable width are always on it) and
interpolated bilinearly in between. Each entry is the median of ``REPS`` timed calls after ``WARMUP``
calls, with random weights and inputs:

- ``torch``: an ``nn.Conv2d`` in eval mode, weights and input ``channels_last``, under
  ``torch.inference_mode`` with ``torch.set_num_threads(threads)``;
- ``onnxruntime``: a one-node ONNX model (``Conv``) in a CPU session with ``threads`` intra-op threads.

Latency is not monotone in the width (kernels are picked per shape), but a budget must never see a
channel removal *add* latency: each layer's table is made non-decreasing along both axes (every entry
the largest measured at equal or smaller widths). The whole model's latency is then fitted to real
measurements of the model, dense and narrowed (pruning/latency_fit.py): a scale on the sum of the
layers' entries, a cost per element of the convolutions' outputs (the element-wise layers after them)
and a constant. ``rest_ms``, the dense model's latency minus its layers' entries, is kept as the
uncalibrated prediction (sum of the entries + that constant) for comparison.

Caching. A table is built once per (architecture fingerprint, input shape, runtime, threads, batch,
grid and its narrowest widths, torch / onnxruntime versions, CPU) and written as JSON under
``$DGPRUNE_LATENCY_CACHE`` (default ``latency/`` in dgprune's cache, ``~/.cache/dgprune/latency``),
the file named by a hash of those keys. The keys are also stored *in* the file and compared on load:
a file whose keys differ (another runtime, thread count, input size...) is never used, it is measured
again and replaced.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dgprune.pruning.cost_model import ChannelStructure, LayerShape
from dgprune.pruning.latency_fit import LatencyFit, calibration_widths, fit_to_samples, narrowed_copy

Runtime = Literal["torch", "onnxruntime"]
RUNTIMES: tuple[str, ...] = ("torch", "onnxruntime")
CACHE_ENV = "DGPRUNE_LATENCY_CACHE"
WARMUP = 3  # untimed calls before each entry (allocation, kernel selection)
REPS = 10  # timed calls per entry; the entry is their median
MODEL_REPS = 30  # timed calls of the whole model (the constant, and measured ratios)...
MODEL_SECONDS = 1.0  # ...fewer when they would take longer than this (5 at least: a 224-px model)
ROUNDS = 3  # models compared are timed in turn this many times: a shared machine's drifts hit all alike
TABLE_VERSION = 2  # bumped when the way tables are measured changes: older files are not reused


@dataclass(frozen=True)
class Conditions:
    """Where the latency is measured: runtime, intra-op threads, batch size and input shape (C, H, W)."""

    runtime: Runtime
    threads: int
    batch_size: int
    input_shape: tuple[int, ...]


def default_cache_dir() -> Path:
    """$DGPRUNE_LATENCY_CACHE, else ``latency/`` in dgprune's cache (data/cache.py's rule, repeated here:
    pruning does not import data): $DGPRUNE_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /dgprune."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("DGPRUNE_CACHE_DIR"):
        return Path(os.environ["DGPRUNE_CACHE_DIR"]).expanduser() / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dgprune" / "latency"


def width_grid(dense: int, round_to: int, points: int, least: int = 1) -> list[int]:
    """The widths at which a layer axis of ``dense`` channels is measured: the reachable widths
    (multiples of ``round_to`` from ``least`` up, and ``dense`` itself), thinned to at most ``points``
    values by a step that is a multiple of ``round_to`` (the narrowest and ``dense`` always kept)."""
    q = max(round_to, 1)
    low = q * math.ceil(max(least, 1) / q)
    if low >= dense:
        return [dense]
    step = q * max(1, math.ceil((dense - low) / (q * max(points - 1, 1))))
    return sorted({*range(low, dense, step), dense})


@dataclass
class LayerTable:
    in_grid: list[int]
    out_grid: list[int]
    ms: list[list[float]]  # ms[i][o] at (in_grid[i], out_grid[o])

    def __call__(self, w_in: float, w_out: float) -> float:
        i0, i1, ti = _bracket(self.in_grid, w_in)
        o0, o1, to = _bracket(self.out_grid, w_out)
        low = self.ms[i0][o0] * (1 - to) + self.ms[i0][o1] * to
        high = self.ms[i1][o0] * (1 - to) + self.ms[i1][o1] * to
        return low * (1 - ti) + high * ti

    def make_monotone(self) -> None:
        """Each entry becomes the largest measured at equal or smaller widths on both axes."""
        for i in range(len(self.in_grid)):
            for o in range(len(self.out_grid)):
                best = self.ms[i][o]
                if i:
                    best = max(best, self.ms[i - 1][o])
                if o:
                    best = max(best, self.ms[i][o - 1])
                self.ms[i][o] = best


def _bracket(grid: list[int], value: float) -> tuple[int, int, float]:
    """Indices around ``value`` on ``grid`` and the interpolation weight (clamped at the ends)."""
    if len(grid) == 1 or value <= grid[0]:
        return 0, 0, 0.0
    if value >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    upper = bisect.bisect_left(grid, value)
    lower = upper - 1
    return lower, upper, (value - grid[lower]) / (grid[upper] - grid[lower])


@dataclass
class LatencyTable:
    keys: dict[str, Any]
    layers: dict[str, LayerTable]  # by conv name
    rest_ms: float  # the dense model's latency minus its convolutions' entries
    build_s: float = 0.0  # how long measuring took
    fit: LatencyFit | None = None  # calibrated on whole models (None: the uncalibrated prediction)

    def conv_ms(self, structure: ChannelStructure, widths: Sequence[int]) -> float:
        """The sum of every convolution's entry at ``widths``."""
        total = 0.0
        for layer in structure.layers:
            if layer.name in self.layers:
                total += self.layers[layer.name](
                    structure.in_width(layer, widths), structure.out_width(layer, widths)
                )
        return total

    def predict_ms(
        self, structure: ChannelStructure, widths: Sequence[int], calibrated: bool = True
    ) -> float:
        """The whole model's latency at ``widths``: the fit (latency_fit.py) of the entries' sum and the
        convolutions' output elements; with ``calibrated=False`` (or no fit) the sum plus ``rest_ms``."""
        conv = self.conv_ms(structure, widths)
        if calibrated and self.fit is not None:
            return self.fit(conv, structure.activations(widths))
        return conv + self.rest_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "rest_ms": self.rest_ms,
            "build_s": self.build_s,
            "fit": vars(self.fit) if self.fit is not None else None,
            "layers": {name: vars(table) for name, table in self.layers.items()},
        }


def table_keys(
    structure: ChannelStructure,
    conditions: Conditions,
    round_to: int,
    points: int,
    floors: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Everything a table's numbers depend on; a table is reused only when all of these are equal."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ort_version = version("onnxruntime") if conditions.runtime == "onnxruntime" else None
    except PackageNotFoundError:
        ort_version = None
    return {
        "table_version": TABLE_VERSION,
        "architecture": structure.fingerprint(),
        "input_shape": list(conditions.input_shape),
        "runtime": conditions.runtime,
        "threads": conditions.threads,
        "batch_size": conditions.batch_size,
        "round_to": round_to,
        "points": points,
        "floors": list(floors) if floors is not None else None,  # where each grid starts
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "cpu": _cpu_name(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path(keys: dict[str, Any], cache_dir: Path) -> Path:
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"lut-{keys['runtime']}-{digest}.json"


def load_table(path: Path, keys: dict[str, Any]) -> LatencyTable | None:
    """The table stored at ``path`` when its stored keys are exactly ``keys``; None otherwise (missing,
    unreadable, or measured in other conditions: never reused)."""
    try:
        data = json.loads(path.read_text())
        if data.get("keys") != json.loads(json.dumps(keys)):
            return None
        layers = {name: LayerTable(**table) for name, table in data["layers"].items()}
        fit = LatencyFit(**data["fit"]) if data.get("fit") else None
        return LatencyTable(
            data["keys"], layers, float(data["rest_ms"]), float(data.get("build_s", 0.0)), fit
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latency_table(
    model: nn.Module,
    structure: ChannelStructure,
    conditions: Conditions,
    round_to: int = 1,
    points: int = 8,
    floors: Sequence[int] | None = None,
    cache_dir: Path | None = None,
) -> LatencyTable:
    """The table of the dense ``model`` in ``conditions``: read from the cache when one with the same
    keys is there, else measured and written there. ``floors``: each group's narrowest reachable width."""
    keys = table_keys(structure, conditions, round_to, points, floors)
    path = cache_path(keys, cache_dir or default_cache_dir())
    found = load_table(path, keys)
    if found is not None:
        return found
    table = measure_table(model, structure, conditions, round_to, points, floors)
    table.keys = keys
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table.to_json()))
    tmp.replace(path)  # atomic: a concurrent worker reads a whole table or none
    return table


def measure_table(
    model: nn.Module,
    structure: ChannelStructure,
    conditions: Conditions,
    round_to: int = 1,
    points: int = 8,
    floors: Sequence[int] | None = None,
) -> LatencyTable:
    """Measure every convolution on its grid, the constant, and the whole-model fit (keys left empty)."""
    started = time.monotonic()
    floors = list(floors) if floors is not None else [1] * len(structure.group_sizes)
    timer = _conv_timer(conditions)
    measured: dict[tuple, float] = {}  # layers of equal shape share their measurements
    layers: dict[str, LayerTable] = {}
    with _threads(conditions.threads):
        for layer in structure.layers:
            if layer.kind != "conv":
                continue
            in_grid = _axis(layer.in_dense, layer.in_group, floors, round_to, points, layer.in_per_channel)
            out_grid = _axis(layer.out_dense, layer.out_group, floors, round_to, points)
            rows = []
            for w_in in in_grid:
                row = []
                for w_out in out_grid:
                    key = (
                        layer.kernel,
                        layer.stride,
                        layer.padding,
                        layer.dilation,
                        layer.bias,
                        layer.in_hw,
                        w_in,
                        w_out,
                    )
                    if key not in measured:
                        measured[key] = timer(layer, w_in, w_out)
                    row.append(measured[key])
                rows.append(row)
            table = LayerTable(in_grid, out_grid, rows)
            table.make_monotone()
            layers[layer.name] = table
        table = LatencyTable({}, layers, 0.0)
        example = torch.zeros(1, *conditions.input_shape)
        calibration = calibration_widths(structure.group_sizes, floors, round_to)
        narrowed = [narrowed_copy(model, structure, widths, example) for widths in calibration]
        dense_ms, *narrowed_ms = interleaved_ms([model, *narrowed], conditions)
        table.rest_ms = dense_ms - table.conv_ms(structure, structure.group_sizes)
        samples = [(structure.group_sizes, dense_ms), *zip(calibration, narrowed_ms, strict=True)]
        table.fit = fit_to_samples(structure, lambda widths: table.conv_ms(structure, widths), samples)
    table.build_s = time.monotonic() - started
    return table


def _axis(
    dense: int, group: int | None, floors: list[int], round_to: int, points: int, per: int = 1
) -> list[int]:
    if group is None:
        return [dense]
    return [w * per for w in width_grid(dense // per, round_to, points, floors[group])]


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _median_ms(call: Callable[[], Any]) -> float:
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _conv_timer(conditions: Conditions) -> Callable[[LayerShape, int, int], float]:
    if conditions.runtime == "onnxruntime":
        return lambda layer, w_in, w_out: _ort_conv_ms(layer, w_in, w_out, conditions)
    return lambda layer, w_in, w_out: _torch_conv_ms(layer, w_in, w_out, conditions)


def _torch_conv_ms(layer: LayerShape, w_in: int, w_out: int, conditions: Conditions) -> float:
    conv = nn.Conv2d(
        w_in,
        w_out,
        layer.kernel,
        layer.stride,
        layer.padding,
        layer.dilation,
        bias=layer.bias,  # type: ignore[arg-type]
    ).eval()
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(conditions.batch_size, w_in, *layer.in_hw).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return _median_ms(lambda: conv(x))


def _ort_conv_ms(layer: LayerShape, w_in: int, w_out: int, conditions: Conditions) -> float:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from dgprune.pruning.onnx_runtime import require_onnxruntime

    ort = require_onnxruntime()
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((w_out, w_in, *layer.kernel), dtype=np.float32), "w")
    inputs = ["x", "w"]
    initializers = [weight]
    if layer.bias:
        initializers.append(numpy_helper.from_array(rng.standard_normal(w_out, dtype=np.float32), "b"))
        inputs.append("b")
    node = helper.make_node(
        "Conv",
        inputs,
        ["y"],
        kernel_shape=list(layer.kernel),
        strides=list(layer.stride),
        pads=[*layer.padding, *layer.padding],
        dilations=list(layer.dilation),
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [conditions.batch_size, w_in, *layer.in_hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8  # what every supported onnxruntime reads
    options = ort.SessionOptions()
    options.intra_op_num_threads = conditions.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    x = rng.standard_normal((conditions.batch_size, w_in, *layer.in_hw), dtype=np.float32)
    return _median_ms(lambda: session.run(None, {"x": x}))


def interleaved_ms(models: Sequence[nn.Module], conditions: Conditions, rounds: int = ROUNDS) -> list[float]:
    """Each model's latency in ``conditions``: torch (a channels_last copy in eval mode) or onnxruntime
    (the model exported to ONNX, in a temporary file). In each of ``rounds`` rounds every model is timed
    in turn (``pruning.measure.measure_latency_ms``: the median of MODEL_REPS calls, fewer for a model
    slower than MODEL_SECONDS); a model's latency is the median of its rounds."""
    from dgprune.pruning.measure import measure_latency_ms

    x = torch.randn(conditions.batch_size, *conditions.input_shape)
    samples: list[list[float]] = [[] for _ in models]
    with _threads(conditions.threads), tempfile.TemporaryDirectory(prefix="dgprune-lut-") as tmp:
        runnables = [
            _runnable(model, conditions, x, Path(tmp) / f"m{i}.onnx") for i, model in enumerate(models)
        ]
        if conditions.runtime == "torch":
            x = x.to(memory_format=torch.channels_last)
        reps = [_reps_for(runnable, x) for runnable in runnables]
        for _ in range(rounds):
            for runnable, count, times in zip(runnables, reps, samples, strict=True):
                times.append(measure_latency_ms(runnable, x, reps=count, warmup=WARMUP))
    return [statistics.median(times) for times in samples]


def _runnable(model: nn.Module, conditions: Conditions, x: torch.Tensor, onnx_path: Path) -> nn.Module:
    if conditions.runtime == "onnxruntime":
        from dgprune.pruning.onnx_runtime import OnnxModel
        from dgprune.pruning.surgery import export_onnx

        path = export_onnx(copy.deepcopy(model).cpu().eval(), onnx_path, x[:1])
        return OnnxModel(path, threads=conditions.threads)
    return copy.deepcopy(model).cpu().eval().to(memory_format=torch.channels_last)


def _reps_for(runnable: nn.Module, x: torch.Tensor) -> int:
    """MODEL_REPS, or as many calls as fit in MODEL_SECONDS (5 at least), from one timed call."""
    with torch.inference_mode():
        runnable(x)  # the first call allocates and picks kernels
        start = time.perf_counter()
        runnable(x)
        once = time.perf_counter() - start
    return max(5, min(MODEL_REPS, int(MODEL_SECONDS / max(once, 1e-9))))
