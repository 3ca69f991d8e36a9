"""Presets on the embedded rotated digits, sized for a laptop (2 CPU cores):

- the **demo** — the paper's Table 1 protocol in small: for every target domain, pretrain once with
  ERM, then prune with Taylor-FO and IoR to keep 50% and 30% of the filters;
- **table2** — the paper's Table 2 protocol: pretrain with ERM, CORAL and Mixup, prune to keep 50%
  (Taylor, as the paper) with ERM fine-tuning, and also with the pretraining algorithm's own objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dgprune.algorithms import algorithm_name
from dgprune.experiments.config import RunConfig, build_config
from dgprune.experiments.grid import PruneVariant, run_grid
from dgprune.experiments.pipeline import load_experiment_dataset
from dgprune.experiments.records import ResultRecord
from dgprune.training.progress import ProgressCallback

# MNIST_CNN on 8x8 digits, 5 source domains x 32 images a step. Pretraining reaches its best
# validation accuracy by about step 100. Pruning every 10 steps instead of 30, so that keep 0.3
# (314 of 448 filters removed, at most 100 a step) is reached at step 40 and fine-tuned 60 more.
DEMO_SETTINGS: dict[str, Any] = {
    "data": {"name": "rotated_digits", "val_fraction": 0.1, "data_seed": 0},
    "model": {"name": "mnist_cnn"},
    "pretrain": {"steps": 150, "batch_size": 32, "lr": 1e-3, "eval_every": 25},
    "prune": {"interval": 10, "max_per_step": 100, "steps": 100, "batch_size": 32, "eval_every": 20},
}
DEMO_KEEP_RATIOS = (0.5, 0.3)
DEMO_CRITERIA = ("taylor", "ior")
TABLE2_ALGORITHMS = ("erm", "coral", "mixup")

ProgressFactory = Callable[[str], ProgressCallback | None]


def demo_base_config(
    seed: int | None,
    device: str | None,
    overrides: dict[str, Any] | None,
    config_path: Path | None,
    sets: Sequence[str] | None,
) -> RunConfig:
    """DEMO_SETTINGS <- config file <- ``--set`` items <- ``overrides``, seed and device (None: not given).
    The grid's own axes (targets, algorithms, criteria, keep ratios) are set per run on top."""
    overrides = {**(overrides or {}), "seed": seed, "device": device}
    return build_config(config_path, overrides, base=DEMO_SETTINGS, sets=sets)


def run_demo(
    out_dir: Path,
    targets: list[str] | None = None,
    keep_ratios: tuple[float, ...] = DEMO_KEEP_RATIOS,
    criteria: tuple[str, ...] = DEMO_CRITERIA,
    seed: int | None = None,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress_for: ProgressFactory = lambda label: None,
    config_path: Path | None = None,
    sets: Sequence[str] | None = None,
    tensorboard: Path | None = None,
) -> list[ResultRecord]:
    """Run (or resume) the demo grid; writes ``out_dir/results.json`` after every model.

    ``seed``/``device`` None: the config file's or ``--set``'s, else 0 and auto."""
    base = demo_base_config(seed, device, overrides, config_path, sets)
    dataset = load_experiment_dataset(base)
    variants = [PruneVariant(c, r) for r in keep_ratios for c in criteria]
    return run_grid(
        out_dir,
        base,
        dataset,
        targets or dataset.domain_names,
        ["erm"],
        lambda _: variants,
        progress_for,
        tensorboard,
    )


def run_table2(
    out_dir: Path,
    targets: list[str] | None = None,
    algorithms: tuple[str, ...] = TABLE2_ALGORITHMS,
    keep_ratio: float = 0.5,
    criterion: str = "taylor",
    seed: int | None = None,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress_for: ProgressFactory = lambda label: None,
    config_path: Path | None = None,
    sets: Sequence[str] | None = None,
    tensorboard: Path | None = None,
) -> list[ResultRecord]:
    """Pretrain with each algorithm; prune with ERM fine-tuning and with the algorithm's own objective."""
    base = demo_base_config(seed, device, overrides, config_path, sets)
    dataset = load_experiment_dataset(base)
    algorithms = tuple(algorithm_name(a) for a in algorithms)  # ERM, CORAL: DomainBed's spelling

    def variants_for(algorithm: str) -> list[PruneVariant]:
        erm = PruneVariant(criterion, keep_ratio, "erm")
        return [erm] if algorithm == "erm" else [erm, PruneVariant(criterion, keep_ratio, algorithm)]

    return run_grid(
        out_dir,
        base,
        dataset,
        targets or dataset.domain_names,
        algorithms,
        variants_for,
        progress_for,
        tensorboard,
    )
