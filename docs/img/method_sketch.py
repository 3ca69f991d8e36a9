"""Draw docs/img/method_sketch.png: the method in one figure (per-domain gates -> scores -> schedule ->
compression). Run from anywhere: ``python docs/img/method_sketch.py``.

The numbers drawn are an illustration (a made-up 10-channel layer, the schedule of MNIST_CNN's 448
filters at keep 0.5), not measurements; docs/method.md describes the method exactly.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

OUT = Path(__file__).with_name("method_sketch.png")
DOMAIN_COLORS = ["tab:blue", "tab:orange", "tab:green"]  # three source domains
TARGET_COLOR = "0.55"
TAYLOR_COLOR, VARIANCE_COLOR = "tab:blue", "tab:red"


def _panel(fig, rect: tuple[float, float, float, float], number: int, title: str):
    """An axes in figure coordinates with a numbered title and a light frame."""
    ax = fig.add_axes(rect)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    frame = FancyBboxPatch(
        (rect[0] - 0.006, rect[1] - 0.03),
        rect[2] + 0.012,
        rect[3] + 0.12,
        boxstyle="round,pad=0.004,rounding_size=0.012",
        transform=fig.transFigure,
        facecolor="0.975",
        edgecolor="0.75",
        zorder=-10,
    )
    fig.patches.append(frame)
    fig.text(rect[0] + 0.004, rect[1] + rect[3] + 0.035, f"{number}. {title}", fontsize=12, weight="bold")
    return ax


def draw_gates(ax) -> None:
    """Source mini-batches, each through its own copy of the gates; one backward gives G_i,m."""
    for i, (angle, color) in enumerate(zip([0, 15, 30], DOMAIN_COLORS, strict=True)):
        y = 0.87 - 0.19 * i
        ax.add_patch(Rectangle((0.03, y - 0.06), 0.12, 0.12, facecolor="white", edgecolor=color, lw=2))
        ax.text(0.09, y, "7", rotation=angle, ha="center", va="center", fontsize=16, color=color)
        ax.text(0.09, y - 0.095, f"source {angle}°", ha="center", fontsize=7.5, color=color)
    ax.add_patch(
        Rectangle((0.03, 0.19), 0.12, 0.12, facecolor="white", edgecolor=TARGET_COLOR, lw=1.5, ls="--")
    )
    ax.text(0.09, 0.25, "7", rotation=75, ha="center", va="center", fontsize=16, color=TARGET_COLOR)
    ax.text(0.09, 0.08, "target 75°:\nnever seen", ha="center", fontsize=7.5, color=TARGET_COLOR)

    # One layer's channels (rows), each multiplied by a gate copy per domain (columns, same colours).
    x0 = 0.36
    for m in range(5):
        y = 0.80 - 0.11 * m
        ax.text(x0 - 0.02, y, f"ch {m + 1}", ha="right", va="center", fontsize=7.5)
        for i, color in enumerate(DOMAIN_COLORS):
            ax.add_patch(Rectangle((x0 + 0.07 * i, y - 0.035), 0.055, 0.07, facecolor=color, alpha=0.75))
    for i, color in enumerate(DOMAIN_COLORS):
        ax.text(x0 + 0.0275 + 0.07 * i, 0.875, f"$g^{{({i + 1})}}$", ha="center", fontsize=9, color=color)
    ax.annotate(
        "", xy=(0.25, 0.62), xytext=(0.165, 0.62), arrowprops={"arrowstyle": "-|>", "color": "0.3", "lw": 1.2}
    )
    ax.text(
        0.62,
        0.64,
        "gate copies, all equal\nto the 0/1 mask; domain\ni's images pass $g^{(i)}$\nonly",
        fontsize=8,
        va="center",
    )
    ax.text(
        0.63,
        0.12,
        "one backward of $\\bar R = \\frac{1}{N}\\sum_i R_i$\n"
        "gives every $G_{i,m} = \\partial R_i / \\partial g_m$\nexactly (domain i, channel m)",
        ha="center",
        fontsize=8.5,
    )


def draw_scores(ax) -> None:
    """Per-channel Taylor term and IoR's variance term, stacked; the lowest are marked for removal."""
    taylor = [0.9, 0.25, 0.6, 0.12, 0.75, 0.3, 0.08, 0.5, 0.2, 0.65]
    variance = [0.05, 0.28, 0.04, 0.02, 0.1, 0.03, 0.01, 0.06, 0.3, 0.02]
    total = [t + v for t, v in zip(taylor, variance, strict=True)]
    lowest = sorted(range(len(total)), key=total.__getitem__)[:3]
    inset = ax.inset_axes((0.1, 0.30, 0.86, 0.42))
    xs = range(1, len(total) + 1)
    inset.bar(xs, taylor, color=TAYLOR_COLOR, label="Taylor term")
    inset.bar(xs, variance, bottom=taylor, color=VARIANCE_COLOR, label="α · variance term")
    for m in lowest:
        inset.text(m + 1, total[m] + 0.04, "✕", ha="center", fontsize=10, color="black")
    inset.set_xticks(list(xs))
    inset.tick_params(labelsize=7)
    inset.set_xlabel("channel m", fontsize=8)
    inset.set_ylabel("score", fontsize=8)
    inset.set_yticks([])
    inset.legend(fontsize=7, loc="upper right", frameon=False)
    for side in ("top", "right"):
        inset.spines[side].set_visible(False)
    ax.text(0.02, 0.93, "Taylor-FO:  $\\left(\\frac{1}{N}\\sum_i G_{i,m}\\, g_m\\right)^2$", fontsize=9.5)
    ax.text(
        0.02,
        0.82,
        "IoR:  Taylor $+\\ \\alpha\\left(\\frac{\\partial\\, \\mathrm{Var}(R_1..R_N)}"
        "{\\partial g_m} g_m\\right)^2$",
        fontsize=9.5,
    )
    ax.text(
        0.5,
        0.04,
        "the variance term keeps channels that matter for\nthe spread of the domain risks (✕: lowest scores)",
        ha="center",
        fontsize=8,
    )


def draw_schedule(ax) -> None:
    """Filters alive against fine-tuning steps: at most 100 removed per interval until keep_ratio."""
    inset = ax.inset_axes((0.16, 0.30, 0.8, 0.55))
    total, keep, per_step, interval, steps = 448, 224, 100, 30, 300
    xs, ys, alive = [0], [total], total
    step = 0
    while alive > keep:
        step += interval
        xs += [step, step]
        ys += [alive, max(keep, alive - per_step)]
        alive = ys[-1]
    xs.append(steps)
    ys.append(alive)
    inset.plot(xs, ys, color="black", lw=1.8)
    inset.axhline(keep, color="0.5", ls=":", lw=1)
    inset.text(steps, keep + 12, "keep_ratio · M", ha="right", fontsize=7.5, color="0.35")
    inset.axvspan(step, steps, color="tab:green", alpha=0.12)
    inset.text(
        (step + steps) / 2, total - 45, "target reached:\nfine-tune, keep\nthe best source-\nval checkpoint",
        ha="center", fontsize=7.5,
    )  # fmt: skip
    inset.set_xlabel("fine-tuning step", fontsize=8)
    inset.set_ylabel("filters alive", fontsize=8)
    inset.tick_params(labelsize=7)
    inset.set_ylim(180, 480)
    for side in ("top", "right"):
        inset.spines[side].set_visible(False)
    ax.text(
        0.5,
        0.04,
        "fine-tuning (SGD) throughout; scores averaged over\neach interval, EMA across intervals; "
        "then the\nlowest (≤100 a step) are gated off for good",
        ha="center",
        fontsize=8,
    )


def draw_compression(ax) -> None:
    """Dense vs compressed conv widths; the compressed model is evaluated on sources and the target."""
    layers = ["conv1", "conv2", "conv3", "conv4"]
    dense = [64, 128, 128, 128]
    kept = [41, 66, 63, 54]
    inset = ax.inset_axes((0.2, 0.36, 0.76, 0.48))
    ys = range(len(layers))
    inset.barh(ys, dense, color="white", edgecolor="black", hatch="//", label="dense")
    inset.barh(ys, kept, color="tab:purple", edgecolor="black", label="compressed")
    inset.set_yticks(list(ys))
    inset.set_yticklabels(layers, fontsize=7.5)
    inset.invert_yaxis()
    inset.set_xlabel("output channels", fontsize=8)
    inset.tick_params(labelsize=7)
    inset.legend(fontsize=7.5, loc="lower center", bbox_to_anchor=(0.4, 1.0), ncol=2, frameon=False)
    for side in ("top", "right"):
        inset.spines[side].set_visible(False)
    ax.text(
        0.5,
        0.04,
        "Torch-Pruning deletes the gated-off channels\n(and the next layer's inputs); evaluate intra-\n"
        "domain (source val) and cross-domain (target)",
        ha="center",
        fontsize=8,
    )


def main() -> Path:
    fig = plt.figure(figsize=(15, 4.3))
    width, gap, bottom, height = 0.225, 0.025, 0.045, 0.82
    lefts = [0.012 + i * (width + gap) for i in range(4)]
    titles = ["Per-domain gates", "Scores", "Schedule", "Compression"]
    drawers = [draw_gates, draw_scores, draw_schedule, draw_compression]
    for number, (left, title, draw) in enumerate(zip(lefts, titles, drawers, strict=True), start=1):
        draw(_panel(fig, (left, bottom, width, height), number, title))
    for left in lefts[1:]:
        arrow = FancyArrowPatch(
            (left - gap + 0.001, bottom + height / 2),
            (left - 0.008, bottom + height / 2),
            transform=fig.transFigure,
            arrowstyle="-|>",
            mutation_scale=16,
            color="0.3",
        )
        fig.patches.append(arrow)
    fig.savefig(OUT, dpi=110)
    plt.close(fig)
    return OUT


if __name__ == "__main__":
    print(main())
