"""Latency budgets (issue 18): the lookup table's prediction against measurement, and latency-budget vs
filter-budget pruning at the same measured latency, on ResNet-18.

Three parts (docs/benchmarks.md §8):

1. ``build``: how long building the latency table takes (MNIST_CNN at 28 px, ResNet-18 small-input at
   32 px; 1 thread, batch 1, torch; default grid of 8 widths per axis, round_to 1 and 8).
2. ``predict`` (and what part 3 needs): for every (input, threads, runtime) and latency budget R, the
   cost-aware schedule prunes ResNet-18 (random weights, group-normalised filter L1 as importance, as
   bench_deploy.py) to R in one step; the compressed model is measured and the prediction error
   reported. Then the filter budget is bisected (keep ratio) until the *measured* latency ratio is R
   too: the filter share each reaches at the same measured latency, and whether the target was reached
   within 5%.
3. ``accuracy`` (long: training): latency-budget vs filter-budget Taylor-FO on the rotated digits with
   ResNet-18 small-input, paired by seed: the filter budget's keep ratio is the one part 2 matched to
   the same measured latency; mean paired difference in cross-domain accuracy with a 95% t interval.

Measured latency ratios: both models timed in turn in 3 rounds, each round the median of up to 30
calls (pruning/latency_table.py ``interleaved_ms``), within one run, on the same machine, the load
average recorded before and after. ``predicted`` is the calibrated table's prediction,
``uncalibrated_predicted`` the sum of its entries plus one constant (what tables did before).

    python benchmarks/bench_latency_budget.py --parts build                       # ~1 min
    python benchmarks/bench_latency_budget.py --parts predict --json benchmarks/results/latency_budget.json
    python benchmarks/bench_latency_budget.py --parts accuracy --seeds 0 1 2 \
        --json benchmarks/results/latency_budget_acc.json
    python benchmarks/bench_latency_budget.py --quick                              # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deploy import group_normalised_l1  # filter L1 / its group's mean: comparable across groups
from machine import machine_info

from dgprune.models import build_model
from dgprune.pruning.budget import LatencyCost
from dgprune.pruning.cost_model import ChannelStructure
from dgprune.pruning.gates import GateSet
from dgprune.pruning.groups import find_channel_groups
from dgprune.pruning.latency_table import Conditions, interleaved_ms, measure_table
from dgprune.pruning.schedule import PruningSchedule, group_floors
from dgprune.pruning.surgery import compress

TOLERANCE = 0.05  # "the target reached within 5%"


def _load() -> list[float]:
    return list(os.getloadavg())


def _resnet(side: int, channels: int = 3, classes: int = 7) -> tuple[nn.Module, torch.Tensor]:
    small = side <= 64
    model = build_model("resnet18", classes, in_channels=channels, small_input=small).eval()
    return model, torch.zeros(1, channels, side, side)


def _pruned(
    dense: nn.Module, example: torch.Tensor, round_to: int, cost=None, ratio: float = 1.0, keep: float = 1.0
) -> tuple[nn.Module, list[int]]:
    """A compressed copy: to the latency budget ``ratio`` (``cost``) or to ``keep`` of the filters."""
    model = copy.deepcopy(dense)
    groups = find_channel_groups(model, example)
    gates = GateSet(model, groups).attach()
    schedule = PruningSchedule(
        gates.sizes, keep if cost is None else 0.5, interval=1, max_per_step=10**6, round_to=round_to,
        cost=cost, budget_ratio=ratio,
    )  # fmt: skip
    gates.prune(schedule.prune_at_once(group_normalised_l1(model, gates)))
    widths = [int(a.sum()) for a in gates.alive]
    compress(model, gates, example)
    return model.eval(), widths


def part_build(threads: int, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for name, side, channels in (("mnist_cnn", 28, 1), ("resnet18", 32, 3)):
        model = build_model(name, 10, in_channels=channels, small_input=True).eval()
        example = torch.zeros(1, channels, side, side)
        structure = ChannelStructure.of(model, find_channel_groups(model, example), example)
        for round_to in (1, 8):
            points = 3 if quick else 8
            conditions = Conditions("torch", threads, 1, (channels, side, side))
            floors = group_floors(structure.group_sizes, round_to)
            table = measure_table(model, structure, conditions, round_to, points, floors)
            entries = sum(len(t.in_grid) * len(t.out_grid) for t in table.layers.values())
            rows.append(
                {"model": name, "side": side, "round_to": round_to, "points": points, "threads": threads,
                 "layers": len(table.layers), "entries": entries, "build_s": table.build_s}
            )  # fmt: skip
            print(
                f"build {name} {side}px round_to {round_to}: {entries} entries, {table.build_s:.1f} s",
                flush=True,
            )
    return rows


def _measured_ratio(model: nn.Module, dense: nn.Module, conditions: Conditions) -> float:
    """Latency of ``model`` over ``dense``'s, both timed in turn in the same rounds."""
    model_ms, dense_ms = interleaved_ms([model, dense], conditions)
    return model_ms / dense_ms


def _match_filters(dense, example, round_to, conditions, goal, steps: int) -> dict[str, Any]:
    """Bisect the keep ratio until the measured latency ratio is ``goal`` (within TOLERANCE)."""
    low, high, best = 0.02, 1.0, None
    for _ in range(steps):
        keep = (low + high) / 2
        model, widths = _pruned(dense, example, round_to, keep=keep)
        measured = _measured_ratio(model, dense, conditions)
        if best is None or abs(measured - goal) < abs(best["measured"] - goal):
            best = {"keep": keep, "measured": measured, "filters": sum(widths)}
        if abs(measured - goal) <= TOLERANCE * goal:
            break
        low, high = (low, keep) if measured > goal else (keep, high)  # too slow: keep fewer filters
    assert best is not None
    return best


def part_predict(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for side in args.sides:
        dense, example = _resnet(side)
        groups = find_channel_groups(dense, example)
        structure = ChannelStructure.of(dense, groups, example)
        total = sum(structure.group_sizes)
        floors = group_floors(structure.group_sizes, args.round_to)
        for threads in args.threads:
            for runtime in args.runtimes:
                conditions = Conditions(runtime, threads, args.batch, (3, side, side))
                load_before = _load()
                table = measure_table(dense, structure, conditions, args.round_to, args.points, floors)
                cost = LatencyCost(structure, table)
                assert table.fit is not None
                fit_error = max(abs(p["fitted_ms"] / p["measured_ms"] - 1) for p in table.fit.points)
                # a second table, measured independently: does the prediction miss because the schedule
                # chose the channels whose savings the first table's noise overstated?
                second = (
                    measure_table(dense, structure, conditions, args.round_to, args.points, floors)
                    if args.second_table
                    else None
                )
                for ratio in args.budgets:
                    model, widths = _pruned(dense, example, args.round_to, cost=cost, ratio=ratio)
                    predicted = cost(widths) / cost(structure.group_sizes)
                    uncalibrated = table.predict_ms(structure, widths, calibrated=False) / table.predict_ms(
                        structure, structure.group_sizes, calibrated=False
                    )
                    measured = _measured_ratio(model, dense, conditions)
                    matched = (
                        _match_filters(dense, example, args.round_to, conditions, measured, args.bisect)
                        if args.bisect
                        else {"keep": None, "filters": float("nan"), "measured": None}
                    )
                    row = {
                        "side": side, "threads": threads, "runtime": runtime, "batch": args.batch,
                        "budget": ratio, "predicted": predicted, "measured": measured,
                        "error": predicted - measured, "uncalibrated_predicted": uncalibrated,
                        "fit": {k: v for k, v in vars(table.fit).items() if k != "points"},
                        "fit_max_rel_error": fit_error,
                        "within_5pct": abs(measured - ratio) <= TOLERANCE * ratio,
                        "latency_filters": sum(widths) / total, "filter_budget_keep": matched["keep"],
                        "filter_budget_filters": matched["filters"] / total,
                        "filter_budget_measured": matched["measured"], "table_build_s": table.build_s,
                        "dense_ms": table.fit.points[0]["measured_ms"], "load": [load_before, _load()],
                    }  # fmt: skip
                    if second is not None:
                        row["second_table_predicted"] = second.predict_ms(
                            structure, widths
                        ) / second.predict_ms(structure, structure.group_sizes)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def part_accuracy(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Latency budget vs the filter budget of the same measured latency, Taylor-FO, paired by seed. The
    keep ratio of the filter budget is bisected (filter L1 on the digits' input shape, 1 x 8 x 8) to the
    latency ratio the latency-budget run measured."""
    from dgprune.experiments.config import build_config
    from dgprune.experiments.pipeline import make_context, run_pretrain, run_prune

    rows = []
    work = Path(args.work or tempfile.mkdtemp(prefix="lb-acc-"))
    base = {
        "target": args.target, "model": {"name": "resnet18", "small_input": True},
        # the demo's budgets (150 pretraining steps, 100 of pruning + fine-tuning, 32 images per source),
        # pruning every 5 steps up to 300 channels: 2,016 of ResNet-18's 2,880 prunable channels
        # (keep 0.3) are removed by step 35
        "pretrain": {"steps": args.pretrain_steps, "batch_size": 32},
        "prune": {"criterion": "taylor", "steps": args.prune_steps, "interval": 5, "max_per_step": 300,
                  "round_to": args.round_to},
        "device": "cpu",
    }  # fmt: skip
    dense, example = _resnet(8, channels=1, classes=10)
    conditions = Conditions("torch", args.threads[0], args.batch, (1, 8, 8))
    for seed in args.seeds:
        for ratio in args.budgets:
            pair: dict[str, Any] = {}
            for kind in ("latency", "filters"):
                prune = dict(base["prune"])
                if kind == "latency":
                    prune["budget"] = {"metric": "latency", "ratio": ratio, "threads": args.threads[0],
                                       "batch_size": args.batch}  # fmt: skip
                else:
                    goal = pair["latency_measured"]
                    match = _match_filters(dense, example, args.round_to, conditions, goal, args.bisect)
                    prune["keep_ratio"] = round(match["keep"], 3)
                config = build_config(overrides={**base, "seed": seed, "prune": prune})
                ctx = make_context(config)
                pre = work / f"pre-{seed}"
                run_pretrain(ctx, pre)
                record = run_prune(ctx, pre, work / f"{kind}-{ratio}-{seed}")
                pair[kind] = record.cross_acc
                pair[f"{kind}_filters"] = record.filters_kept / record.filters_total
                if kind == "latency":
                    pair["latency_measured"] = record.budget_measured
            rows.append({"seed": seed, "budget": ratio, **pair, "diff": pair["latency"] - pair["filters"]})
            print(json.dumps(rows[-1]), flush=True)
    for ratio in args.budgets:
        diffs = [r["diff"] for r in rows if r["budget"] == ratio]
        if len(diffs) > 1:
            half = 2.0 * statistics.stdev(diffs) / math.sqrt(len(diffs))  # ~95% (t for larger n)
            print(f"budget {ratio}: latency - filters cross acc {statistics.mean(diffs):+.2f} ± {half:.2f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts", nargs="+", default=["build", "predict"], choices=["build", "predict", "accuracy"]
    )
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--points", type=int, default=8)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument(
        "--bisect", type=int, default=8, help="most keep ratios tried to match a latency (0: no matching)"
    )
    parser.add_argument(
        "--second-table", action="store_true", help="also predict with a second, independently measured table"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", default="75")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--prune-steps", type=int, default=100)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 px, 1 thread, torch, 3 widths")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.sides, args.threads, args.runtimes, args.points, args.budgets, args.bisect = (
            [32],
            [1],
            ["torch"],
            3,
            [0.5],
            3,
        )
    torch.manual_seed(0)
    started = time.monotonic()
    out: dict[str, Any] = {
        "machine": machine_info(args.threads[0]),
        "args": vars(args) | {"work": str(args.work)},
    }
    if "build" in args.parts:
        torch.set_num_threads(1)
        out["build"] = part_build(1, args.quick)
    if "predict" in args.parts:
        out["predict"] = part_predict(args)
    if "accuracy" in args.parts:
        out["accuracy"] = part_accuracy(args)
    out["wall_s"] = time.monotonic() - started
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
