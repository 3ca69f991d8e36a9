"""PNG plots of a sweep (matplotlib, Agg backend: no display needed).

- :func:`plot_accuracy_vs_filters`: intra- and cross-domain accuracy (%) against the share of filters
  kept (%), one line per criterion, starting from the dense model at 100%. Each point is the mean
  over seeds of the per-seed mean over target domains; error bars are ± the standard error over
  seeds (the seed-to-seed spread of the whole leave-one-domain-out protocol). With one seed there is
  no spread to show: no error bars, and the title names the seed.
- :func:`plot_layer_widths`: output channels per conv layer after pruning, one bar per keep ratio ×
  criterion (mean over seeds and targets, error bar = standard error over those runs; none for a
  single run), next to the dense width.

Every figure carries its own title, axis labels with units and a legend, so it reads without the text.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files, never to a window
import matplotlib.pyplot as plt

from dgprune.experiments.records import ResultRecord
from dgprune.report.cells import mean_se

CRITERION_STYLE = {
    "taylor": ("Taylor-FO (baseline)", "tab:blue", "o"),
    "ior": ("IoR", "tab:red", "s"),
    "random": ("random", "tab:gray", "v"),
    "l1": ("filter L1 norm", "tab:green", "^"),
    "bn_scale": ("BN scale |γ|", "tab:purple", "D"),
}
_EXTRA_COLORS = ["tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
# Lines beyond the styled criteria (a criteria study has a dozen): colour x marker pairs that repeat
# neither, so no two lines look alike.
_EXTRA_MARKERS = ["x", "P", "*", "h", "<", ">", "p", "d"]
LEGEND_COLUMNS = 5


LineKey = tuple[str, str]  # (criterion, criterion_label: the name plus its non-default parameters)


def _line_key(record: ResultRecord) -> LineKey:
    return (record.criterion, record.label)  # a run that saw the target's images: its own line


def _styles(keys: list[LineKey]) -> dict[LineKey, tuple[str, str, str]]:
    """Label, colour and marker per (criterion, parameters): a criterion's own colour for its first
    parameter setting, then distinct extra colours, so that no two lines look alike."""
    styles, seen = {}, set()
    extra = iter([(c, m) for m in _EXTRA_MARKERS for c in _EXTRA_COLORS])
    for criterion, label in sorted(set(keys), key=_order):
        name, color, marker = CRITERION_STYLE.get(criterion, (criterion, "", "x"))
        name += label[len(criterion) :]  # criterion_label = the criterion's name + " (parameters)"
        if criterion in seen or not color:
            color, marker = next(extra)
        seen.add(criterion)
        styles[(criterion, label)] = (name, color, marker)
    return styles


def _per_seed_target_mean(records: list[ResultRecord], metric: str) -> list[float]:
    """Mean over target domains within each seed, in percent: one value per seed."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for r in records:
        by_seed[r.seed].append(100 * getattr(r, metric))
    return [mean(v) for _, v in sorted(by_seed.items())]


def plot_accuracy_vs_filters(records: list[ResultRecord], path: Path, title: str) -> Path:
    """Records of one dataset × model × pretraining algorithm (dense + pruned); writes ``path``."""
    dense = [r for r in records if r.criterion == "none"]
    pruned = [r for r in records if r.criterion != "none"]
    lines: dict[LineKey, dict[float, list[ResultRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in pruned:
        lines[_line_key(r)][r.keep_ratio].append(r)
    seeds = sorted({r.seed for r in records})
    targets = sorted({r.target_domain for r in records})
    several = len(seeds) > 1  # one seed: a standard error of 0 would claim a precision never measured
    styles = _styles(list(lines))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
    panels = (("intra_acc", "Intra-domain (source val)"), ("cross_acc", "Cross-domain (unseen target)"))
    keys = sorted(lines, key=_order)
    for ax, (metric, panel_title) in zip(axes, panels, strict=True):
        dense_values = _per_seed_target_mean(dense, metric)
        for index, key in enumerate(keys):
            by_ratio = lines[key]
            label, color, marker = styles[key]
            # Lines sit at the same keep ratios: shift each a little sideways so that error bars do
            # not hide one another (by at most ±1 point of "filters kept").
            dodge = (index - (len(keys) - 1) / 2) * min(0.8, 2.0 / max(1, len(keys)))
            xs, ys, errs = [], [], []
            if dense_values:  # every line starts at the dense model (its error bar is drawn once, below)
                xs, ys, errs = [100.0], [mean_se(dense_values)[0]], [0.0]
            for ratio in sorted(by_ratio, reverse=True):
                group = by_ratio[ratio]
                m, se = mean_se(_per_seed_target_mean(group, metric))
                xs.append(100 * mean(r.filters_kept / r.filters_total for r in group) + dodge)
                ys.append(m)
                errs.append(se)
            ax.errorbar(
                xs,
                ys,
                yerr=errs if several else None,
                label=label,
                color=color,
                marker=marker,
                capsize=4,
                linewidth=1.6,
            )
        if dense_values:
            m, se = mean_se(dense_values)
            ax.errorbar(
                [100.0],
                [m],
                yerr=[se] if several else None,
                fmt="o",
                markersize=9,
                color="black",
                capsize=4,
                zorder=5,
                label="dense (before pruning)",
            )
        ax.set_title(panel_title)
        ax.set_xlabel("filters kept (% of prunable filters)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].invert_xaxis()  # shared x axis: inverting once flips both; pruning proceeds to the right
    handles, labels = axes[0].get_legend_handles_labels()
    # long labels (e.g. "target_entropy (sign=-1) [unlabeled target]") would run off the figure's sides
    columns = min(len(labels), LEGEND_COLUMNS if max(map(len, labels)) <= 24 else 3)
    legend_rows = -(-len(labels) // columns)
    fig.set_figheight(4.4 + 0.25 * (legend_rows - 1))
    fig.legend(handles, labels, loc="lower center", ncol=columns, frameon=False)
    spread = f"error bars: ± standard error over {len(seeds)} seeds" if several else f"seed {seeds[0]}"
    fig.suptitle(f"{title}\nmean over {len(targets)} target domain(s); {spread}", fontsize=11)
    fig.tight_layout(rect=(0, 0.02 + 0.06 * legend_rows, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _runs_note(records: list[ResultRecord]) -> str:
    """What a bar averages, and what its error bar means (no error bar, and no ± claim, for one run)."""
    seeds = sorted({r.seed for r in records})
    targets = sorted({r.target_domain for r in records})
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds"
    if len(seeds) == 1 and len(targets) == 1:
        return f"one run (target {targets[0]}, {seed_text})"
    runs = len({(r.seed, r.target_domain) for r in records})
    return (
        f"mean over {runs} runs ({len(targets)} target(s) × {seed_text}); "
        "error bars: ± standard error over those runs"
    )


def _order(key: LineKey) -> tuple[int, str, str]:
    criterion, label = key
    rank = list(CRITERION_STYLE).index(criterion) if criterion in CRITERION_STYLE else len(CRITERION_STYLE)
    return (rank, criterion, label)


def plot_layer_widths(
    records: list[ResultRecord], widths: dict[str, list[list]], path: Path, title: str
) -> Path | None:
    """Kept output channels per conv layer; ``widths`` maps run_id -> [[layer, kept, dense], ...]."""
    pruned = [r for r in records if r.criterion != "none" and widths.get(r.run_id)]
    if not pruned:
        return None
    layers = [row[0] for row in widths[pruned[0].run_id]]
    dense_width = {row[0]: row[2] for row in widths[pruned[0].run_id]}
    bars: dict[tuple[float, str, str], list[ResultRecord]] = defaultdict(list)
    for r in pruned:
        bars[(r.keep_ratio, *_line_key(r))].append(r)
    keys = sorted(bars, key=lambda k: (-k[0], _order((k[1], k[2]))))
    styles = _styles([(k[1], k[2]) for k in keys])
    n = len(keys) + 1
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(layers) * n * 0.45 + 3), 4.6))
    xs = range(len(layers))
    ax.bar(
        [x - 0.4 + width / 2 for x in xs],
        [dense_width[name] for name in layers],
        width,
        color="white",
        edgecolor="black",
        hatch="//",
        label="dense (before pruning)",
    )
    ratios = sorted({k[0] for k in keys}, reverse=True)
    # from opaque (the largest keep ratio) to 0.3, whatever the number of ratios
    ratio_alpha = {ratio: 1.0 - 0.7 * i / max(1, len(ratios) - 1) for i, ratio in enumerate(ratios)}
    for i, key in enumerate(keys, start=1):
        ratio, criterion, criterion_text = key
        label, color, _ = styles[(criterion, criterion_text)]
        per_layer = [
            [next(w[1] for w in widths[r.run_id] if w[0] == name) for r in bars[key]] for name in layers
        ]
        stats = [mean_se([float(v) for v in values]) for values in per_layer]
        ax.bar(
            [x - 0.4 + width / 2 + i * width for x in xs],
            [m for m, _ in stats],
            width,
            yerr=[se for _, se in stats] if len(bars[key]) > 1 else None,
            capsize=2,
            color=color,
            alpha=ratio_alpha[ratio],
            edgecolor="black",
            linewidth=0.4,
            label=f"{label}, keep {ratio:.0%}",
        )
    ax.set_xticks(list(xs))
    ax.set_xticklabels(
        layers, rotation=45 if len(layers) > 6 else 0, ha="right" if len(layers) > 6 else "center"
    )
    ax.set_xlabel("convolution layer (forward order)")
    ax.set_ylabel("output channels (filters)")
    ax.set_title(f"{title}\nfilters kept per layer: {_runs_note(pruned)}", fontsize=11)
    ax.legend(fontsize=8, ncol=min(4, n), loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
