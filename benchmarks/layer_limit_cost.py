"""What a per-layer pruning limit (``prune.max_layer_prune``) changes on ResNet-18 at keep 0.3.

Runs (or resumes) ``benchmarks/layer_limit_sweep.yaml`` through the installed ``dgprune sweep``
(Taylor-FO, ResNet-18 small-input on the rotated digits, target 0, 3 seeds; no limit, 0.9 and 0.8),
then pairs the runs by seed (same pretrained model) and prints, per variant, the accuracies, the
MACs and parameters kept and the layer widths; per limit, its paired differences from no limit
(mean +- standard error over the seeds, and the 95% t-interval). docs/benchmarks.md §6.

    python benchmarks/layer_limit_cost.py --out layer_limit-sweep [--json out.json]

The wall time and the load average (``uptime``) are recorded in the JSON: the machine may be shared,
so they describe the conditions, not the speed of anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from dgprune.experiments.store import Store
from dgprune.report.paired import PairedComparison

SWEEP_FILE = Path(__file__).with_name("layer_limit_sweep.yaml")
NO_LIMIT = "no limit"
METRICS = (("cross_acc", "cross-domain accuracy"), ("intra_acc", "intra-domain accuracy"))
# One conv per channel group of ResNet-18 (the stem + layer1 stage, each stage, each block's conv1).
GROUP_CONVS = (
    "conv1",
    "layer1.0.conv1",
    "layer1.1.conv1",
    "layer2.0.conv2",
    "layer2.0.conv1",
    "layer2.1.conv1",
    "layer3.0.conv2",
    "layer3.0.conv1",
    "layer3.1.conv1",
    "layer4.0.conv2",
    "layer4.0.conv1",
    "layer4.1.conv1",
)


def run_sweep(out: Path) -> float:
    """Run the sweep with the installed console script (finished runs are skipped); its wall time."""
    script = Path(sys.executable).with_name("dgprune")
    started = time.monotonic()
    subprocess.run([str(script), "sweep", str(SWEEP_FILE), "--out", str(out), "-q"], check=True)
    return time.monotonic() - started


def variant_of(config: dict[str, Any]) -> str:
    limit = config["prune"].get("max_layer_prune")
    return NO_LIMIT if limit in (None, 1.0) else f"max_layer_prune {limit:g}"


def load_runs(db: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """variant -> seed -> the pruned run's row."""
    runs: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    with Store(db) as store:
        for row in store.rows("done"):
            if row["kind"] == "pruned":
                config = row["config"] if isinstance(row["config"], dict) else json.loads(row["config"])
                runs[variant_of(config)][row["seed"]] = row
    return runs


def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("layer_limit-sweep"), help="sweep directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--no-run", action="store_true", help="only read the sweep's database")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"command": " ".join(sys.argv), "uptime_before": uptime()}
    if not args.no_run:
        out["wall_s"] = run_sweep(args.out)
    out["uptime_after"] = uptime()
    runs = load_runs(args.out / "results.sqlite")
    if NO_LIMIT not in runs:
        raise SystemExit(f"{args.out}: no finished runs without a limit; run the sweep first")
    variants = [NO_LIMIT, *sorted((v for v in runs if v != NO_LIMIT), reverse=True)]

    out["variants"] = {}
    print(
        "| variant | runs | cross | intra | filters kept | MACs kept | params kept | narrowest layer kept |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in variants:
        rows = [runs[name][seed] for seed in sorted(runs[name])]
        widths = [{conv: (kept, dense) for conv, kept, dense in r["layer_widths"]} for r in rows]
        figures = {
            "seeds": sorted(runs[name]),
            "cross_acc": mean_se([100 * r["cross_acc"] for r in rows]),
            "intra_acc": mean_se([100 * r["intra_acc"] for r in rows]),
            "filters_kept": statistics.fmean(r["filters_kept"] for r in rows),
            "filters_total": rows[0]["filters_total"],
            "macs_kept": statistics.fmean(r["macs"] / r["macs_dense"] for r in rows),
            "params_kept": statistics.fmean(r["params"] / r["params_dense"] for r in rows),
            "narrowest_kept": statistics.fmean(min(k / d for k, d in w.values()) for w in widths),
            "group_widths": {
                conv: [w[conv][0] for w in widths] + [widths[0][conv][1]] for conv in GROUP_CONVS
            },
        }
        out["variants"][name] = figures
        print(
            f"| {name} | {len(rows)} | {figures['cross_acc'][0]:.2f} ± {figures['cross_acc'][1]:.2f} "
            f"| {figures['intra_acc'][0]:.2f} ± {figures['intra_acc'][1]:.2f} "
            f"| {figures['filters_kept']:.0f} of {figures['filters_total']} "
            f"| {100 * figures['macs_kept']:.1f}% | {100 * figures['params_kept']:.1f}% "
            f"| {100 * figures['narrowest_kept']:.1f}% |"
        )

    print("\nWidths of each channel group (one conv each; per seed, then the dense width):\n")
    print("| group (conv) | " + " | ".join(variants) + " | dense |")
    print("|---|" + "---|" * (len(variants) + 1))
    for conv in GROUP_CONVS:
        cells = [", ".join(str(w) for w in out["variants"][v]["group_widths"][conv][:-1]) for v in variants]
        dense = out["variants"][NO_LIMIT]["group_widths"][conv][-1]
        print(f"| {conv} | " + " | ".join(cells) + f" | {dense} |")

    out["comparisons"] = []
    print("\n| comparison | metric | per seed (points) | mean ± s.e. | 95% t-interval |")
    print("|---|---|---|---|---|")
    for name in variants[1:]:
        seeds = sorted(set(runs[name]) & set(runs[NO_LIMIT]))
        for metric, title in (*METRICS, ("macs", "MACs kept (% of dense)")):
            if metric == "macs":
                diffs = [
                    100 * (runs[name][s]["macs"] - runs[NO_LIMIT][s]["macs"]) / runs[name][s]["macs_dense"]
                    for s in seeds
                ]
            else:
                diffs = [100 * (runs[name][s][metric] - runs[NO_LIMIT][s][metric]) for s in seeds]
            comparison = PairedComparison(("", "", "", "", 0.3), name, NO_LIMIT, metric, diffs)
            mean, se = mean_se(diffs)
            low, high = comparison.interval
            print(
                f"| {name} − no limit | {title} | {', '.join(f'{d:+.2f}' for d in diffs)} "
                f"| {mean:+.2f} ± {se:.2f} | [{low:+.2f}, {high:+.2f}] |"
            )
            out["comparisons"].append(
                {
                    "variant": name,
                    "metric": metric,
                    "seeds": seeds,
                    "differences": diffs,
                    "mean": mean,
                    "se": se,
                    "ci95": [low, high],
                }
            )
    if "wall_s" in out:
        print(f"\nsweep wall time {out['wall_s']:.0f} s; {out['uptime_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
