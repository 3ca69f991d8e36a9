"""The default experiment: the paper's Table 1 protocol, in small, on the embedded rotated digits.

For every target domain: pretrain once (ERM), then prune with Taylor-FO and IoR to keep 50% and
30% of the filters. Budgets are cut so that the whole grid runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dgprune.data import load_dataset
from dgprune.experiments.config import build_config
from dgprune.experiments.pipeline import make_context, run_pretrain, run_prune
from dgprune.experiments.records import ResultRecord, write_records
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


def run_demo(
    out_dir: Path,
    targets: list[str] | None = None,
    keep_ratios: tuple[float, ...] = DEMO_KEEP_RATIOS,
    criteria: tuple[str, ...] = DEMO_CRITERIA,
    seed: int = 0,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
    progress_for: Callable[[str], ProgressCallback | None] = lambda label: None,
) -> list[ResultRecord]:
    """Run (or resume) the demo grid; writes ``out_dir/results.json`` after every model."""
    base = build_config(base=DEMO_SETTINGS, overrides={**(overrides or {}), "seed": seed, "device": device})
    dataset = load_dataset(base.data.name, seed=base.data.data_seed)
    for ratio in keep_ratios:
        build_config(base=base.model_dump(), overrides={"prune": {"keep_ratio": ratio}})  # validate early
    targets = targets or dataset.domain_names
    for target in targets:
        dataset.domain(target)  # unknown names fail before any work
    records: list[ResultRecord] = []
    for target in targets:
        config = build_config(base=base.model_dump(), overrides={"target": target})
        ctx = make_context(config, dataset)
        pretrained_dir = out_dir / f"target-{target}" / "pretrained"
        records.append(run_pretrain(ctx, pretrained_dir, progress_for(f"[{target}] ")))
        write_records(out_dir / "results.json", records)
        for ratio in keep_ratios:
            for criterion in criteria:
                run_config = build_config(
                    base=config.model_dump(),
                    overrides={"prune": {"criterion": criterion, "keep_ratio": ratio}},
                )
                run_dir = out_dir / f"target-{target}" / f"{criterion}-keep{ratio:g}"
                label = f"[{target} {criterion} {ratio:g}] "
                records.append(
                    run_prune(make_context(run_config, dataset), pretrained_dir, run_dir, progress_for(label))
                )
                write_records(out_dir / "results.json", records)
    return records
