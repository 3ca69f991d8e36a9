"""CPU inference latency of a physically compressed ResNet-18 vs the dense one, next to the MACs ratio.

The dense model is ``build_model("resnet18", num_classes=7, in_channels=3)`` (standard ImageNet stem,
random weights: latency does not depend on the values). Channel groups come from
``find_channel_groups(..., scope="all")`` (residual stages included), a GateSet masks the chosen
channels, then ``compress`` detaches the gates and ``remove_channels`` deletes the channels for real.

Which channels go (``--selection``):

- ``uniform`` (default): in every group, the channels with the lowest filter L1 norm
  (``weight_statistics``), keeping the same share ``round(keep * size)`` (>= 1) of every group;
- ``global``: the library's schedule logic (``PruningSchedule``) fed the filter L1 scores once: one
  global ranking of all channels, cut exactly at the keep target, no group emptied.

``--round-to 8`` rounds every group's kept width to a multiple of 8 (uniform selection), and
``--profile`` splits each model's time into convolution kernels and all other ops (torch.profiler).

Latency is ``model(x)`` under ``torch.inference_mode()``, eval mode. Dense and compressed models are
timed interleaved (the order rotates every round); each round times a block of calls per model and
the figures are medians over rounds (ratios: median of the per-round ratios, with their IQR).
The target is: latency ratio <= 1.1 x MACs ratio.

    python benchmarks/bench_latency.py --channels-last --json benchmarks/results/latency.json
    python benchmarks/bench_latency.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from machine import available_cores, load_average, machine_info  # benchmarks/machine.py
from torch import nn

from dgprune.models.factory import build_model
from dgprune.pruning import (
    GateSet,
    PruningSchedule,
    compress,
    find_channel_groups,
    fold_batchnorm,
    model_cost,
)
from dgprune.pruning.weight_stats import weight_statistics

TARGET = 1.1  # latency ratio <= TARGET x MACs ratio
TRACE_SIDE = 64  # image side used to trace the dependency graph (the structure does not depend on it)


# ---- building the compressed models ----------------------------------------------------------------
def kept_width(size: int, keep: float, round_to: int) -> int:
    """Width kept of a group of ``size``: ``round(keep * size)``, or to a multiple of ``round_to``."""
    kept = round(keep * size / round_to) * round_to
    return min(size, max(kept, min(round_to, size), 1))


def choose_pruned(
    gates: GateSet, model: nn.Module, keep: float, selection: str, round_to: int = 1
) -> torch.Tensor:
    """Flat gate positions to prune so that ``keep`` of the prunable channels remain."""
    l1, _ = weight_statistics(model, gates.groups)
    if selection == "global":
        schedule = PruningSchedule(gates.sizes, keep, interval=1, max_per_step=gates.total)
        schedule.observe(l1)
        chosen = schedule.step()
        return chosen if chosen is not None else torch.zeros(0, dtype=torch.long)
    positions, offset = [], 0
    for size in gates.sizes:
        kept = kept_width(size, keep, round_to)
        lowest = torch.argsort(l1[offset : offset + size], stable=True)[: size - kept]
        positions.append(lowest + offset)
        offset += size
    return torch.cat(positions)


def build_compressed(
    dense: nn.Module,
    groups,
    keep: float,
    selection: str,
    x_trace: torch.Tensor,
    x_check: torch.Tensor,
    round_to: int = 1,
) -> tuple[nn.Module, dict[str, Any]]:
    model = copy.deepcopy(dense).eval()
    gates = GateSet(model, groups).attach()
    gates.prune(choose_pruned(gates, model, keep, selection, round_to))
    with torch.inference_mode():
        masked = model(x_check)
    kept = gates.num_alive()
    compress(model, gates, x_trace)  # gates.detach(), then remove_channels(model, pruned positions, x)
    model.eval()
    with torch.inference_mode():
        diff = float((model(x_check) - masked).abs().max())
    widths = {g.name: int(a.sum()) for g, a in zip(gates.groups, gates.alive, strict=True)}
    info = {"kept_channels": kept, "total_channels": gates.total, "masked_vs_removed_max_abs_diff": diff}
    return model, {**info, "group_widths": widths}


# ---- timing ----------------------------------------------------------------------------------------
def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def time_models(
    models: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int, min_block_s: float
) -> dict[str, Any]:
    names = list(models)
    with torch.inference_mode():
        estimate = {}
        for name in names:
            for _ in range(warmup):
                models[name](x)
            t0 = time.perf_counter()
            models[name](x)
            estimate[name] = time.perf_counter() - t0
        calls = {n: max(1, math.ceil(min_block_s / max(estimate[n], 1e-6))) for n in names}
        block_ms: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                model, n = models[name], calls[name]
                t0 = time.perf_counter()
                for _ in range(n):
                    model(x)
                block_ms[name].append((time.perf_counter() - t0) / n * 1e3)
    return {"calls_per_block": calls, "block_ms": block_ms}


CONV_OPS = (
    "aten::mkldnn_convolution",
    "aten::_slow_conv2d_forward",
    "aten::convolution",
    "aten::_convolution",
)


def profile_breakdown(model: nn.Module, x: torch.Tensor, macs: int, calls: int = 5) -> dict[str, float]:
    """Self CPU ms per call in convolution kernels vs all other aten ops (BN, ReLU, add, pooling, copies)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    conv = other = 0.0
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            ms = event.self_cpu_time_total / calls / 1e3
            if event.key in CONV_OPS:
                conv += ms
            else:
                other += ms
    return {"conv_ms": conv, "other_ms": other, "conv_gmac_per_s": macs * len(x) / 1e9 / (conv / 1e3)}


# ---- report ----------------------------------------------------------------------------------------


def parse_setting(text: str) -> tuple[int, int]:
    batch, side = text.lower().split("x")
    return int(batch), int(side)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| input (batch x 3 x side^2) | memory format | keep | dense ms | compressed ms | MACs ratio "
        "| latency ratio | latency / MACs | params ratio | <= 1.1 x MACs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lat = row["latency_ratio"]
        out.append(
            f"| {row['batch']} x 3 x {row['side']}^2 | {row['memory_format']} | {row['keep']} "
            f"| {row['dense_ms']:.1f} | {row['compressed_ms']:.1f} | {row['macs_ratio']:.3f} "
            f"| {lat['median']:.3f} [{lat['q25']:.3f}-{lat['q75']:.3f}] | {row['latency_over_macs']:.2f} "
            f"| {row['params_ratio']:.3f} | {'yes' if row['target_met'] else 'no'} |"
        )
    return "\n".join(out) + "\n"


def markdown_profile(profiles: list[dict[str, Any]]) -> str:
    out = [
        "| input | memory format | model | conv ms | conv GMAC/s | other ops ms | other / total |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        share = p["other_ms"] / (p["conv_ms"] + p["other_ms"])
        out.append(
            f"| {p['batch']} x 3 x {p['side']}^2 | {p['memory_format']} | {p['model']} | {p['conv_ms']:.1f} "
            f"| {p['conv_gmac_per_s']:.1f} | {p['other_ms']:.1f} | {share:.2f} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3], help="keep ratios")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="BATCHxSIDE input settings (default: 1x224 32x64; quick: 1x96 8x64)",
    )
    parser.add_argument("--channels-last", action="store_true", help="also time channels_last models/inputs")
    parser.add_argument(
        "--fold-bn", action="store_true", help="fold BatchNorm into the convs (fold_batchnorm) before timing"
    )
    parser.add_argument("--selection", choices=("uniform", "global"), default="uniform")
    parser.add_argument(
        "--round-to",
        type=int,
        default=1,
        help="uniform selection: round every group's kept width to a multiple of this (default 1: none)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15; quick 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per model and setting")
    parser.add_argument("--min-block", type=float, default=None, help="seconds per timed block (default 0.3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores available)")
    parser.add_argument(
        "--profile", action="store_true", help="also profile conv vs other ops (torch.profiler, after timing)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="short smoke run: small inputs, 3 rounds")
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = parser.parse_args(argv)
    settings = [
        parse_setting(s) for s in (args.settings or (["1x96", "8x64"] if args.quick else ["1x224", "32x64"]))
    ]
    rounds = args.rounds or (3 if args.quick else 15)
    min_block = args.min_block if args.min_block is not None else (0.05 if args.quick else 0.3)
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    meta = machine_info(torch.get_num_threads())
    print(
        f"torch {meta['torch']}, {meta['cores_available']} cores available, "
        f"torch.set_num_threads({threads}) -> {torch.get_num_threads()} threads; {meta['cpu']}"
    )
    print(
        f"rounds={rounds} warmup={args.warmup} min_block={min_block}s selection={args.selection} "
        f"round_to={args.round_to} fold_bn={args.fold_bn}"
    )

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    dense = build_model("resnet18", num_classes=7, in_channels=3).eval()
    x_trace = torch.randn(1, 3, TRACE_SIDE, TRACE_SIDE)
    x_check = torch.randn(2, 3, TRACE_SIDE, TRACE_SIDE)
    groups = find_channel_groups(dense, x_trace, scope="all")
    compressed, structure = {}, {}
    for keep in args.keep:
        compressed[keep], structure[keep] = build_compressed(
            dense, groups, keep, args.selection, x_trace, x_check, args.round_to
        )
        s = structure[keep]
        print(
            f"keep {keep}: {s['kept_channels']}/{s['total_channels']} channels kept in {len(groups)} groups; "
            f"widths {sorted(set(s['group_widths'].values()))}; "
            f"masked vs removed max abs diff {s['masked_vs_removed_max_abs_diff']:.1e}"
        )

    formats = ["contiguous", *(["channels_last"] if args.channels_last else [])]
    rows, raw, profiles = [], [], []
    for batch, side in settings:
        x_cost = torch.randn(1, 3, side, side)
        dense_cost = model_cost(dense, x_cost)
        costs = {keep: model_cost(m, x_cost) for keep, m in compressed.items()}
        for fmt in formats:
            models = {"dense": dense, **{f"keep {k}": m for k, m in compressed.items()}}
            if args.fold_bn:  # dense and compressed alike, so the ratios stay like for like
                models = {n: fold_batchnorm(m) for n, m in models.items()}
            x = torch.randn(batch, 3, side, side)
            if fmt == "channels_last":
                models = {
                    n: copy.deepcopy(m).to(memory_format=torch.channels_last) for n, m in models.items()
                }
                x = x.contiguous(memory_format=torch.channels_last)
            timing = time_models(models, x, rounds, args.warmup, min_block)
            block = timing["block_ms"]
            dense_ms = statistics.median(block["dense"])
            raw.append({"batch": batch, "side": side, "memory_format": fmt, **timing})
            for keep in args.keep:
                per_round = [c / d for c, d in zip(block[f"keep {keep}"], block["dense"], strict=True)]
                q1, q2, q3 = quartiles(per_round)
                macs_ratio = costs[keep].macs / dense_cost.macs
                rows.append(
                    {
                        "batch": batch,
                        "side": side,
                        "memory_format": fmt,
                        "keep": keep,
                        "dense_ms": dense_ms,
                        "compressed_ms": statistics.median(block[f"keep {keep}"]),
                        "dense_min_ms": min(block["dense"]),
                        "compressed_min_ms": min(block[f"keep {keep}"]),
                        "dense_macs": dense_cost.macs,
                        "compressed_macs": costs[keep].macs,
                        "macs_ratio": macs_ratio,
                        "dense_params": dense_cost.params,
                        "compressed_params": costs[keep].params,
                        "params_ratio": costs[keep].params / dense_cost.params,
                        "latency_ratio": {"median": q2, "q25": q1, "q75": q3, "per_round": per_round},
                        "latency_over_macs": q2 / macs_ratio,
                        "target_met": q2 <= TARGET * macs_ratio,
                    }
                )
            print(f"timed {batch}x3x{side}x{side} {fmt}: calls/block {timing['calls_per_block']}")
            if args.profile:
                all_costs = {"dense": dense_cost, **{f"keep {k}": c for k, c in costs.items()}}
                for name, model in models.items():
                    breakdown = profile_breakdown(model, x, all_costs[name].macs)
                    profiles.append(
                        {"batch": batch, "side": side, "memory_format": fmt, "model": name, **breakdown}
                    )

    print()
    print(markdown_table(rows))
    print(
        f"dense ResNet-18: {rows[0]['dense_params'] / 1e6:.2f} M params; "
        + ", ".join(
            f"{r['dense_macs'] / 1e9:.3f} GMACs at {r['side']}px"
            for r in rows
            if r["keep"] == args.keep[0] and r["memory_format"] == "contiguous"
        )
    )
    print(
        "ms: median ms per call over rounds; "
        "latency ratio: median of per-round ratios [inter-quartile range]."
    )
    print(
        f"{sum(r['target_met'] for r in rows)}/{len(rows)} settings meet "
        f"latency ratio <= {TARGET} x MACs ratio"
    )
    if profiles:
        print()
        print(markdown_profile(profiles))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta["load_average_1_5_15_min_at_end"] = load_average()
        payload = {
            "benchmark": "latency",
            "machine": meta,
            "settings": {
                "rounds": rounds,
                "warmup": args.warmup,
                "min_block_s": min_block,
                "selection": args.selection,
                "round_to": args.round_to,
                "fold_bn": args.fold_bn,
                "quick": args.quick,
                "seed": args.seed,
                "model": "resnet18, num_classes=7, in_channels=3, standard stem, eval, random weights",
                "target": f"latency ratio <= {TARGET} x MACs ratio",
            },
            "structure": {str(k): v for k, v in structure.items()},
            "results": rows,
            "profiles": profiles,
            "raw": raw,
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
