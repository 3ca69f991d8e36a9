"""What the user ships: fp32 vs int8 ONNX, dense vs pruned, in accuracy (intra / cross) and latency.

For each architecture (MNIST_CNN; ResNet-18 with the small-input stem), a short pretraining and a
Taylor-FO pruning to keep 0.3 with widths rounded to 8 on the rotated digits (target 75 by default),
through the library's own stages (``run_pretrain`` / ``run_prune``, what `dgprune pretrain` / `prune`
run; the directories under ``--work`` are reused by a later run with the same settings). Each of the
two models (dense = the pretrained one, pruned) is then

- exported to fp32 ONNX (``export_onnx``, as `dgprune export`) and quantised to int8 (``export_int8``,
  as `dgprune export --int8`: ONNX Runtime static quantisation, QDQ, calibrated on 256 images of the
  sources' train splits, never the target);
- evaluated as torch, fp32 ONNX and int8 ONNX with the same evaluation code (``evaluate``, what
  `dgprune evaluate` / `evaluate --onnx` report): intra (source val), cross (target), and the share of
  target images whose prediction equals the torch model's;
- timed: all six (torch, fp32, int8) x (dense, pruned) runners of one architecture interleaved, 1
  thread (torch and ONNX Runtime intra-op), at batch 1 and 64 of the data's images; latency ratios
  are medians of per-round ratios with their inter-quartile range (as bench_deploy.py).

    python benchmarks/bench_int8.py --json benchmarks/results/int8.json --work /tmp/int8-work
    python benchmarks/bench_int8.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_latency import quartiles, time_models  # benchmarks/bench_latency.py
from machine import load_average, machine_info  # benchmarks/machine.py
from torch import nn

from dgprune.data import iterate_batches, probe_batch
from dgprune.experiments.config import build_config
from dgprune.experiments.deploy import export_int8, load_onnx_for
from dgprune.experiments.pipeline import make_context, model_dir_config, run_pretrain, run_prune
from dgprune.pruning import export_onnx
from dgprune.training.evaluation import evaluate

# Short runs that fit a 2-core CPU in minutes (the demo preset's budgets for MNIST_CNN; ResNet-18 as
# docs/criteria.md's analysis example); pruning: Taylor-FO, keep 0.3, widths multiples of 8.
PRUNE = {"criterion": "taylor", "keep_ratio": 0.3, "round_to": 8}
ARCHS: dict[str, dict[str, Any]] = {
    "mnist_cnn": {
        "model": {"name": "mnist_cnn"},
        "pretrain": {"steps": 150, "batch_size": 32, "lr": 0.001, "eval_every": 25},
        "prune": {
            **PRUNE,
            "interval": 10,
            "max_per_step": 100,
            "steps": 100,
            "batch_size": 32,
            "eval_every": 20,
        },
    },
    "resnet18": {
        "model": {"name": "resnet18", "small_input": True},
        "pretrain": {"steps": 60, "batch_size": 16, "eval_every": 20},
        "prune": {
            **PRUNE,
            "interval": 2,
            "max_per_step": 200,
            "steps": 40,
            "batch_size": 16,
            "eval_every": 10,
        },
    },
}
QUICK_STEPS = {
    "pretrain": {"steps": 4, "eval_every": 4},
    "prune": {"steps": 4, "interval": 1, "eval_every": 4},
}


def train(arch: str, work: Path, target: str, seed: int, quick: bool) -> dict[str, Path]:
    spec = ARCHS[arch]
    overrides: dict[str, Any] = {"target": target, "seed": seed, "device": "cpu", **spec}
    if quick:
        overrides = {**overrides, **{k: {**spec[k], **QUICK_STEPS[k]} for k in QUICK_STEPS}}
        overrides["prune"]["max_per_step"] = 10_000
    ctx = make_context(build_config(overrides=overrides))
    dirs = {"dense": work / arch / "pre", "pruned": work / arch / "pruned"}
    started = time.perf_counter()
    run_pretrain(ctx, out_dir=dirs["dense"])
    run_prune(ctx, pretrained_dir=dirs["dense"], out_dir=dirs["pruned"])
    print(f"{arch}: trained or reused in {time.perf_counter() - started:.0f} s")
    return dirs


def accuracy_rows(arch: str, dirs: dict[str, Path], work: Path) -> tuple[list[dict], dict[str, nn.Module]]:
    rows, runners = [], {}
    for variant, model_dir in dirs.items():
        config = model_dir_config(model_dir)
        ctx = make_context(config)
        shape, classes = ctx.dataset.input_shape, ctx.dataset.num_classes
        model = ctx.load_model_dir(model_dir).eval()
        fp32 = export_onnx(model, work / arch / f"{variant}.onnx", torch.zeros(1, *shape))
        int8 = work / arch / f"{variant}.int8.onnx"
        calibration = export_int8(fp32, int8, config, 256)
        models = {"torch": model, "fp32": load_onnx_for(fp32, shape, classes)}
        models["int8"] = load_onnx_for(int8, shape, classes)
        cpu = torch.device("cpu")
        reference = None
        for fmt, m in models.items():
            acc = evaluate(m, ctx.split, cpu)
            with torch.inference_mode():  # predictions on the target, to compare formats sample by sample
                preds = torch.cat([m(x).argmax(dim=1) for x, _ in iterate_batches(ctx.split.target, 512)])
            reference = preds if reference is None else reference
            rows.append(
                {
                    "arch": arch,
                    "model": variant,
                    "format": fmt,
                    "intra_acc": acc.intra,
                    "cross_acc": acc.cross,
                    "worst_source_acc": acc.worst_source,
                    "target_same_prediction_as_torch": float((preds == reference).float().mean()),
                    "target_correct": int((preds == ctx.split.target.labels).sum()),
                    "bytes": (fp32 if fmt == "fp32" else int8).stat().st_size if fmt != "torch" else None,
                    "calibration": calibration.describe() if fmt == "int8" else None,
                }
            )
            runners[f"{fmt} {variant}"] = m
    return rows, runners


def latency_rows(arch: str, runners: dict[str, nn.Module], x: torch.Tensor, timing: dict) -> list[dict]:
    block = timing["block_ms"]
    pairs = [
        ("int8 / fp32", "int8 dense", "fp32 dense"),
        ("int8 / fp32", "int8 pruned", "fp32 pruned"),
        ("pruned / dense", "torch pruned", "torch dense"),
        ("pruned / dense", "fp32 pruned", "fp32 dense"),
        ("pruned / dense", "int8 pruned", "int8 dense"),
        ("int8 pruned / fp32 dense", "int8 pruned", "fp32 dense"),
        ("fp32 / torch", "fp32 dense", "torch dense"),
        ("fp32 / torch", "fp32 pruned", "torch pruned"),
    ]
    rows = []
    for label, num, den in pairs:
        per_round = [a / b for a, b in zip(block[num], block[den], strict=True)]
        q1, q2, q3 = quartiles(per_round)
        rows.append(
            {
                "arch": arch,
                "batch": len(x),
                "ratio": label,
                "of": f"{num} / {den}",
                "ms": (statistics.median(block[num]), statistics.median(block[den])),
                "latency_ratio": {"median": q2, "q25": q1, "q75": q3, "per_round": per_round},
            }
        )
    return rows


def markdown_accuracy(rows: list[dict]) -> str:
    out = [
        "| model | pruning | format | intra | cross | target predictions = torch | file |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = f"{r['bytes'] / 1024:.0f} KiB" if r["bytes"] else ""
        out.append(
            f"| {r['arch']} | {r['model']} | {r['format']} | {100 * r['intra_acc']:.2f} "
            f"| {100 * r['cross_acc']:.2f} | {100 * r['target_same_prediction_as_torch']:.2f}% | {size} |"
        )
    return "\n".join(out) + "\n"


def markdown_latency(rows: list[dict]) -> str:
    out = ["| model | batch | ratio | of | ms | latency ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency_ratio"]
        out.append(
            f"| {r['arch']} | {r['batch']} | {r['ratio']} | {r['of']} | {r['ms'][0]:.3f} / {r['ms'][1]:.3f} "
            f"| {lat['median']:.3f} [{lat['q25']:.3f}-{lat['q75']:.3f}] |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--work", type=Path, default=Path("int8-work"), help="model directories (reused)")
    parser.add_argument("--target", default="75")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 11; quick 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-block", type=float, default=None, help="seconds per block (default 0.25)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4-step stages, 2 short rounds")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        sys.exit("bench_int8 needs onnxruntime (pip install -e '.[onnx]')")
    rounds = args.rounds or (2 if args.quick else 11)
    min_block = args.min_block if args.min_block is not None else (0.02 if args.quick else 0.25)
    torch.set_num_threads(1)  # torch, and ONNX Runtime's sessions (OnnxModel takes torch's count)
    meta = machine_info(1)
    load = meta["load_average_1_5_15_min_at_start"]
    print(f"torch {meta['torch']}, {meta['cores_available']} cores; load average {load}")
    t_start = time.perf_counter()
    accuracy: list[dict] = []
    latency: list[dict] = []
    loads: dict[str, Any] = {}
    for arch in args.archs:
        dirs = train(arch, args.work, args.target, args.seed, args.quick)
        rows, runners = accuracy_rows(arch, dirs, args.work)
        accuracy += rows
        images = probe_batch(make_context(model_dir_config(dirs["dense"])).split.val, max(args.batches))
        for batch in args.batches:
            x = images[:batch].contiguous()  # the sources' val images, as many as the batch
            loads[f"{arch} batch {batch} before"] = load_average()
            timing = time_models(runners, x, rounds, args.warmup, min_block)
            loads[f"{arch} batch {batch} after"] = load_average()
            latency += latency_rows(arch, runners, x, timing)
            print(f"timed {arch} at batch {batch} (load {loads[f'{arch} batch {batch} after']})")
    print()
    print(markdown_accuracy(accuracy))
    print(markdown_latency(latency))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        meta["load_average_1_5_15_min_at_end"] = load_average()
        payload = {
            "benchmark": "int8",
            "machine": meta,
            "settings": {
                "archs": {a: ARCHS[a] for a in args.archs},
                "target": args.target,
                "seed": args.seed,
                "batches": args.batches,
                "rounds": rounds,
                "warmup": args.warmup,
                "min_block_s": min_block,
                "threads": 1,
                "quick": args.quick,
            },
            "load_average_around_timing": loads,
            "accuracy": accuracy,
            "latency": latency,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
