"""Accuracy cost of rounding pruned widths to multiples of 8, for both rounding rules.

Reads the database of ``benchmarks/round_to_sweep.yaml`` (Taylor-FO to keep 0.3 on the rotated digits,
5 seeds x 6 targets; not rounded, ``round_mode: per_layer`` and ``round_mode: budget``) and pairs the
runs by (seed, target):

- per seed, the mean over the targets of (variant - reference), then mean +- standard error over
  the seeds (the figure docs/benchmarks.md reported for the first rounding rule);
- over all (seed, target) pairs, the mean difference with its 95% t-interval and Wilcoxon p
  (``dgprune.report.paired``).

    python benchmarks/round_to_cost.py round_to-sweep/results.sqlite [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from dgprune.experiments.store import Store
from dgprune.report.paired import PairedComparison

VARIANTS = ("not rounded", "per_layer", "budget")
COMPARISONS = (("per_layer", "not rounded"), ("budget", "not rounded"), ("budget", "per_layer"))
METRICS = (("cross_acc", "cross-domain accuracy"), ("intra_acc", "intra-domain accuracy"))


def variant_of(config: dict[str, Any]) -> str:
    prune = config["prune"]
    if prune.get("round_to", 1) == 1:
        return "not rounded"
    return prune.get("round_mode", "per_layer")  # configs from before round_mode rounded per layer


def load_runs(db: Path) -> dict[str, dict[tuple[int, str], dict[str, Any]]]:
    """variant -> (seed, target) -> the pruned run's row (with its config)."""
    runs: dict[str, dict[tuple[int, str], dict[str, Any]]] = defaultdict(dict)
    with Store(db) as store:
        for row in store.rows("done"):
            if row["kind"] != "pruned":
                continue
            config = row["config"] if isinstance(row["config"], dict) else json.loads(row["config"])
            runs[variant_of(config)][(row["seed"], row["target_domain"])] = row
    return runs


def per_seed_mean_se(diffs: dict[tuple[int, str], float]) -> tuple[float, float, int]:
    by_seed: dict[int, list[float]] = defaultdict(list)
    for (seed, _), d in diffs.items():
        by_seed[seed].append(d)
    means = [statistics.fmean(v) for v in by_seed.values()]
    se = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else math.nan
    return statistics.fmean(means), se, len(means)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db", type=Path, help="results.sqlite of the round_to sweep")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = load_runs(args.db)
    missing = [v for v in VARIANTS if v not in runs]
    if missing:
        raise SystemExit(f"{args.db}: no finished runs for {', '.join(missing)}; run the sweep first")

    out: dict[str, Any] = {"comparisons": [], "variants": {}}
    print(
        "| variant | runs | filters kept (mean) | MACs kept (mean) | widths multiple of 8 "
        "| latency ms (median) |"
    )
    print("|---|---|---|---|---|---|")
    for name in VARIANTS:
        rows = list(runs[name].values())
        kept = statistics.fmean(r["filters_kept"] for r in rows)
        macs = statistics.fmean(r["macs"] / r["macs_dense"] for r in rows)
        latency = statistics.median(r["latency_ms"] for r in rows if r.get("latency_ms") is not None)
        widths = [w for r in rows for w in (r.get("layer_widths") or [])]
        multiples = sum(1 for w in widths if w[1] % 8 == 0) / len(widths) if widths else math.nan
        out["variants"][name] = {
            "runs": len(rows),
            "filters_kept": kept,
            "macs_kept": macs,
            "latency_ms": latency,
            "share_widths_multiple_of_8": multiples,
        }
        print(
            f"| {name} | {len(rows)} | {kept:.1f} of {rows[0]['filters_total']} | {100 * macs:.2f}% "
            f"| {100 * multiples:.0f}% | {latency:.2f} |"
        )
    print()
    print("| comparison | metric | per-seed mean +- s.e. (points) | pairs | mean [95% CI] | Wilcoxon p |")
    print("|---|---|---|---|---|---|")
    for variant, reference in COMPARISONS:
        pairs = sorted(set(runs[variant]) & set(runs[reference]))
        for metric, title in METRICS:
            diffs = {p: 100 * (runs[variant][p][metric] - runs[reference][p][metric]) for p in pairs}
            mean, se, seeds = per_seed_mean_se(diffs)
            comparison = PairedComparison(
                ("", "", "", "", 0.3), variant, reference, metric, list(diffs.values())
            )
            low, high = comparison.interval
            print(
                f"| {variant} - {reference} | {title} | {mean:+.2f} +- {se:.2f} ({seeds} seeds) "
                f"| {len(pairs)} "
                f"| {comparison.mean:+.2f} [{low:+.2f}, {high:+.2f}] | {comparison.p_wilcoxon:.3f} |"
            )
            out["comparisons"].append(
                {
                    "variant": variant,
                    "reference": reference,
                    "metric": metric,
                    "per_seed_mean": mean,
                    "per_seed_se": se,
                    "pairs": len(pairs),
                    "mean": comparison.mean,
                    "ci95": [low, high],
                    "p_wilcoxon": comparison.p_wilcoxon,
                    "differences": diffs and {f"{s}/{t}": d for (s, t), d in diffs.items()},
                }
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
