"""`dgprune plot`: a run's training curves from its model directory's history.jsonl (matplotlib, Agg).

One figure, panels stacked on a shared step axis: the training loss (and, in the pruning stage,
each source domain's risk), the intra-domain validation accuracy at the evaluated steps, and the
filters still alive (pruning stage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files, never to a window
import matplotlib.pyplot as plt

from dgprune.errors import ConfigError
from dgprune.experiments.pipeline import RUN_FILE, model_dir_settings
from dgprune.training.history import HISTORY_FILE, read_history

CURVES_FILE = "curves.png"


def plot_curves(history: list[dict[str, Any]], out: Path, title: str) -> Path:
    """Write the curves of ``history`` (records of history.jsonl) to ``out`` (PNG); returns it."""
    steps = [r["step"] for r in history]
    evaluated = [r for r in history if r.get("val_acc") is not None]
    alive = [r for r in history if r.get("filters_alive") is not None]
    panels = 2 + bool(alive)
    fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(7, 2.3 * panels + 0.6), squeeze=False)
    loss_ax, val_ax = axes[0, 0], axes[1, 0]
    domains = sorted({d for r in history for d in (r.get("risks") or {})})
    for domain in domains:
        points = [(r["step"], r["risks"][domain]) for r in history if domain in (r.get("risks") or {})]
        loss_ax.plot(*zip(*points, strict=True), linewidth=0.7, alpha=0.6, label=f"risk, domain {domain}")
    loss_ax.plot(steps, [r["loss"] for r in history], color="black", linewidth=1.2, label="training loss")
    loss_ax.set_ylabel("loss (cross-entropy)")
    loss_ax.legend(fontsize=7, ncol=2 if domains else 1)
    if evaluated:
        val_ax.plot(
            [r["step"] for r in evaluated], [100 * r["val_acc"] for r in evaluated], marker="o", markersize=3
        )
    else:
        val_ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=val_ax.transAxes)
    val_ax.set_ylabel("intra-domain val\naccuracy (%)")
    if alive:
        alive_ax = axes[2, 0]
        counts = [r["filters_alive"] for r in alive]  # after the step's removals: a step function
        alive_ax.plot([r["step"] for r in alive], counts, color="tab:red", drawstyle="steps-post")
        total = alive[0].get("filters_total")
        alive_ax.set_ylabel("filters alive" + (f"\n(of {total})" if total else ""))
        alive_ax.set_ylim(bottom=0)
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def describe_model_dir(model_dir: Path) -> str:
    """A figure title from the directory's settings: stage, model, dataset, target."""
    stage = None
    if (model_dir / RUN_FILE).is_file():
        try:
            stage = json.loads((model_dir / RUN_FILE).read_text()).get("stage")
        except (OSError, json.JSONDecodeError, AttributeError):
            stage = None
    settings = model_dir_settings(model_dir)
    parts = [stage or "training"]
    model = (settings.get("model") or {}).get("name")
    data = (settings.get("data") or {}).get("name")
    if model and data:
        parts.append(f"{model} on {data}")
    if settings.get("target") is not None:
        parts.append(f"target {settings['target']}")
    return f"{model_dir.name}: " + ", ".join(parts)


def plot_model_dir(model_dir: Path, out: Path | None = None) -> Path:
    """Plot ``model_dir/history.jsonl`` to ``out`` (default: ``model_dir/curves.png``)."""
    path = model_dir / HISTORY_FILE
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: no such model directory")
    history = read_history(path, skip_bad=True)  # a damaged line: a warning, the others plotted
    if not history:
        raise ConfigError(
            f"--model {model_dir}: no training curves ({HISTORY_FILE} missing or empty: the directory was "
            "written by an older dgprune, or its stage has not run a step yet)"
        )
    return plot_curves(history, out or model_dir / CURVES_FILE, describe_model_dir(model_dir))
