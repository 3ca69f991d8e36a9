"""Deployment latency of a pruned ResNet-18 under PyTorch and ONNX Runtime, and the cost of small widths.

Part 1 — dense vs compressed, torch vs onnxruntime. The dense model is ``build_model("resnet18",
num_classes=7, in_channels=3)`` (ImageNet stem, random weights, eval). The compressed models come from
the library's own pruning schedule (``PruningSchedule``, at most 100 channels a step as by default)
fed every filter's L1 norm divided by its group's mean L1 norm (so that the global ranking gives the
groups comparable shares, as trained networks' Taylor scores roughly do), then ``compress``:

- ``keep 0.5`` and ``keep 0.3``: cut exactly at the target (``round_to`` 1);
- ``keep 0.3 per_layer``: ``round_to`` 8, each group rounded on its own (``round_mode: per_layer``);
- ``keep 0.3 budget``: ``round_to`` 8 within the budget (``round_mode: budget``, the default).

Every model is timed with torch (channels_last models and inputs, ``torch.inference_mode``) and with
onnxruntime (``dgprune.pruning.export_onnx``, CPU provider, all graph optimisations, the same thread
count for intra-op, one inter-op thread), at 1 and 2 threads, with batch 1 at 224 px and batch 32 at
64 px. All models and both runtimes of one (threads, input) setting are timed interleaved, so the
ratios within a run compare like with like: compressed latency / dense latency of the same runtime,
beside the MACs ratio (target: latency ratio <= 1.1 x MACs ratio).

Part 2 — where small widths are slow (``--conv-widths``): GMAC/s of one 3x3 convolution with w input
and w output channels, at ResNet-18's stage-2 shape (batch 1, 28 x 28, i.e. 224 px input) and
(batch 32, 8 x 8, i.e. 64 px input), for the widths that keep 0.3 produces with and without
rounding, timed interleaved with torch at 1 thread; reported relative to width 64.

    python benchmarks/bench_deploy.py --json benchmarks/results/deploy.json
    python benchmarks/bench_deploy.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_latency import (  # benchmarks/bench_latency.py
    TARGET,
    TRACE_SIDE,
    parse_setting,
    quartiles,
    time_models,
)
from machine import load_average, machine_info  # benchmarks/machine.py
from torch import nn

from dgprune.models.factory import build_model
from dgprune.pruning import GateSet, PruningSchedule, compress, export_onnx, find_channel_groups, model_cost
from dgprune.pruning.weight_stats import weight_statistics

# (name, keep ratio, round_to, round_mode)
VARIANTS: tuple[tuple[str, float, int, str], ...] = (
    ("keep 0.5", 0.5, 1, "budget"),
    ("keep 0.3", 0.3, 1, "budget"),
    ("keep 0.3 per_layer", 0.3, 8, "per_layer"),
    ("keep 0.3 budget", 0.3, 8, "budget"),
)
CONV_WIDTHS = (16, 19, 24, 32, 38, 40, 48, 64, 77, 80, 128, 152, 154, 160, 256)


def group_normalised_l1(model: nn.Module, gates: GateSet) -> torch.Tensor:
    l1, _ = weight_statistics(model, gates.groups)
    parts, offset = [], 0
    for size in gates.sizes:
        part = l1[offset : offset + size]
        parts.append(part / part.mean())
        offset += size
    return torch.cat(parts)


def build_variant(
    dense: nn.Module, groups, keep: float, round_to: int, round_mode: str, x_trace: torch.Tensor
) -> tuple[nn.Module, dict[str, Any]]:
    model = copy.deepcopy(dense).eval()
    gates = GateSet(model, groups).attach()
    # The schedule's default cap of 100 channels a step, as in a pruning run (one step per interval
    # of 1 batch; the same scores every step, since the weights do not change here).
    schedule = PruningSchedule(
        gates.sizes, keep, interval=1, max_per_step=100, round_to=round_to, round_mode=round_mode
    )
    scores = group_normalised_l1(model, gates)
    while not schedule.done:
        schedule.observe(scores)
        chosen = schedule.step()
        if chosen is not None:
            gates.prune(chosen)
    x_check = torch.randn(2, 3, TRACE_SIDE, TRACE_SIDE)
    with torch.inference_mode():
        masked = model(x_check)
    widths = [int(a.sum()) for a in gates.alive]
    compress(model, gates, x_trace)
    model.eval()
    with torch.inference_mode():
        diff = float((model(x_check) - masked).abs().max())
    info = {"kept": sum(widths), "target": schedule.target, "widths": widths, "masked_vs_removed": diff}
    return model, info


def onnx_runner(path: Path, threads: int, x: torch.Tensor) -> Callable[[Any], Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": x.contiguous().numpy()}
    return lambda _x: session.run(None, feed)


def torch_runner(model: nn.Module) -> Callable[[Any], Any]:
    model = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
    return model


def latency_rows(
    timing: dict[str, Any], names: list[str], costs: dict[str, Any], threads: int, batch: int, side: int
) -> list[dict[str, Any]]:
    block, rows = timing["block_ms"], []
    for runtime in ("torch", "onnxruntime"):
        dense = block[f"{runtime} dense"]
        for name in names[1:]:
            per_round = [c / d for c, d in zip(block[f"{runtime} {name}"], dense, strict=True)]
            q1, q2, q3 = quartiles(per_round)
            macs_ratio = costs[name].macs / costs["dense"].macs
            rows.append(
                {
                    "runtime": runtime,
                    "threads": threads,
                    "batch": batch,
                    "side": side,
                    "model": name,
                    "dense_ms": statistics.median(dense),
                    "compressed_ms": statistics.median(block[f"{runtime} {name}"]),
                    "macs_ratio": macs_ratio,
                    "params_ratio": costs[name].params / costs["dense"].params,
                    "latency_ratio": {"median": q2, "q25": q1, "q75": q3, "per_round": per_round},
                    "latency_over_macs": q2 / macs_ratio,
                    "target_met": q2 <= TARGET * macs_ratio,
                }
            )
    return rows


def markdown_latency(rows: list[dict[str, Any]]) -> str:
    out = [
        "| runtime | threads | input | model | dense ms | compressed ms | MACs ratio | latency ratio "
        "| latency / MACs | <= 1.1 x MACs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = r["latency_ratio"]
        out.append(
            f"| {r['runtime']} | {r['threads']} | {r['batch']} x 3 x {r['side']}^2 | {r['model']} "
            f"| {r['dense_ms']:.1f} | {r['compressed_ms']:.1f} | {r['macs_ratio']:.3f} "
            f"| {lat['median']:.3f} [{lat['q25']:.3f}-{lat['q75']:.3f}] | {r['latency_over_macs']:.2f} "
            f"| {'yes' if r['target_met'] else 'no'} |"
        )
    return "\n".join(out) + "\n"


def conv_throughput(
    widths: tuple[int, ...], shapes: list[tuple[int, int]], rounds: int, warmup: int, min_block: float
) -> list[dict[str, Any]]:
    """GMAC/s of a 3x3 conv (w -> w channels, stride 1, channels_last) per width, timed interleaved."""
    rows = []
    for batch, side in shapes:
        convs = {
            str(w): nn.Conv2d(w, w, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
            for w in widths
        }
        inputs = {
            str(w): torch.randn(batch, w, side, side).contiguous(memory_format=torch.channels_last)
            for w in widths
        }
        runners = {name: (lambda _x, c=conv, i=inputs[name]: c(i)) for name, conv in convs.items()}
        timing = time_models(runners, torch.zeros(1), rounds, warmup, min_block)
        gmacs = {}
        for w in widths:
            macs = batch * side * side * w * w * 9
            gmacs[w] = macs / 1e9 / (statistics.median(timing["block_ms"][str(w)]) / 1e3)
        for w in widths:
            rows.append(
                {
                    "batch": batch,
                    "side": side,
                    "width": w,
                    "gmac_per_s": gmacs[w],
                    "relative_to_64": gmacs[w] / gmacs[64] if 64 in gmacs else None,
                    "multiple_of_8": w % 8 == 0,
                }
            )
    return rows


def markdown_conv(rows: list[dict[str, Any]]) -> str:
    shapes = sorted({(r["batch"], r["side"]) for r in rows}, reverse=True)
    widths = sorted({r["width"] for r in rows})
    head = " | ".join(f"{b} x w x {s}^2: GMAC/s (vs w=64)" for b, s in shapes)
    out = [f"| width w | multiple of 8 | {head} |", "|---" * (2 + len(shapes)) + "|"]
    by_key = {(r["batch"], r["side"], r["width"]): r for r in rows}
    for w in widths:
        cells = []
        for b, s in shapes:
            r = by_key[(b, s, w)]
            rel = f" ({r['relative_to_64']:.2f})" if r["relative_to_64"] is not None else ""
            cells.append(f"{r['gmac_per_s']:.1f}{rel}")
        out.append(f"| {w} | {'yes' if w % 8 == 0 else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=None, help="BATCHxSIDE (default 1x224 32x64)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 11; quick 3)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-block", type=float, default=None, help="seconds per block (default 0.25)")
    parser.add_argument("--no-conv-widths", action="store_true", help="skip part 2 (GMAC/s per width)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1x64 8x32, 2 rounds, 1 thread")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        sys.exit("bench_deploy needs onnxruntime (pip install -e '.[dev]')")
    settings = [
        parse_setting(s) for s in (args.settings or (["1x64", "8x32"] if args.quick else ["1x224", "32x64"]))
    ]
    threads_list = [1] if args.quick else args.threads
    rounds = args.rounds or (2 if args.quick else 11)
    min_block = args.min_block if args.min_block is not None else (0.02 if args.quick else 0.25)
    meta = machine_info(max(threads_list))
    print(
        f"torch {meta['torch']}, {meta['cores_available']} cores; "
        f"load average {meta['load_average_1_5_15_min_at_start']}"
    )
    t_start = time.perf_counter()

    torch.manual_seed(args.seed)
    dense = build_model("resnet18", num_classes=7, in_channels=3).eval()
    x_trace = torch.randn(1, 3, TRACE_SIDE, TRACE_SIDE)
    groups = find_channel_groups(dense, x_trace, scope="all")
    models: dict[str, nn.Module] = {"dense": dense}
    structure: dict[str, Any] = {}
    for name, keep, round_to, round_mode in VARIANTS:
        models[name], structure[name] = build_variant(dense, groups, keep, round_to, round_mode, x_trace)
        s = structure[name]
        print(f"{name}: {s['kept']} channels kept (target {s['target']}); widths {s['widths']}")
    names = list(models)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths: dict[tuple[str, int], Path] = {}
        for _, side in settings:  # the ONNX graphs have a dynamic batch axis but a fixed image size
            for name, model in models.items():
                path = Path(tmp) / f"{name.replace(' ', '_')}_{side}.onnx"
                with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
                    paths[name, side] = export_onnx(model, path, torch.randn(1, 3, side, side))
        for threads in threads_list:
            torch.set_num_threads(threads)
            for batch, side in settings:
                x = torch.randn(batch, 3, side, side)
                costs = {n: model_cost(m, torch.randn(1, 3, side, side)) for n, m in models.items()}
                runners: dict[str, Callable[[Any], Any]] = {}
                for name, model in models.items():
                    runners[f"torch {name}"] = torch_runner(model)
                    runners[f"onnxruntime {name}"] = onnx_runner(paths[name, side], threads, x)
                # every runner gets the same images; onnxruntime's hold their own numpy copy
                timing = time_models(
                    runners, x.contiguous(memory_format=torch.channels_last), rounds, args.warmup, min_block
                )
                rows += latency_rows(timing, names, costs, threads, batch, side)
                print(f"timed {threads} thread(s), {batch}x3x{side}x{side}")
    print()
    print(markdown_latency(rows))

    conv_rows: list[dict[str, Any]] = []
    if not args.no_conv_widths:
        torch.set_num_threads(1)
        shapes = [(1, 16), (8, 4)] if args.quick else [(1, 28), (32, 8)]
        widths = (16, 19, 64) if args.quick else CONV_WIDTHS
        conv_rows = conv_throughput(widths, shapes, rounds, args.warmup, min_block)
        print(markdown_conv(conv_rows))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        meta["load_average_1_5_15_min_at_end"] = load_average()
        payload = {
            "benchmark": "deploy",
            "machine": meta,
            "settings": {
                "rounds": rounds,
                "warmup": args.warmup,
                "min_block_s": min_block,
                "threads": threads_list,
                "inputs": settings,
                "seed": args.seed,
                "quick": args.quick,
            },
            "structure": structure,
            "latency": rows,
            "conv_widths": conv_rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
