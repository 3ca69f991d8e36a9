"""Run a small grid on one machine: for each target domain and pretraining algorithm, pretrain once,
then prune the same pretrained model in every requested variant. Resumable: a finished stage is
read back from its directory instead of being recomputed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dgprune.data import MultiDomainDataset
from dgprune.experiments.config import RunConfig, build_config
from dgprune.experiments.pipeline import make_context, run_pretrain, run_prune
from dgprune.experiments.records import ResultRecord, write_records
from dgprune.training.progress import ProgressCallback


@dataclass(frozen=True)
class PruneVariant:
    criterion: str
    keep_ratio: float
    finetune_algorithm: str = "erm"

    @property
    def dirname(self) -> str:
        name = f"{self.criterion}-keep{self.keep_ratio:g}"
        return name if self.finetune_algorithm == "erm" else f"{name}-ft-{self.finetune_algorithm}"

    def overrides(self) -> dict:
        return {
            "prune": {
                "criterion": self.criterion,
                "keep_ratio": self.keep_ratio,
                "finetune_algorithm": self.finetune_algorithm,
            }
        }


def run_grid(
    out_dir: Path,
    base: RunConfig,
    dataset: MultiDomainDataset,
    targets: Iterable[str],
    algorithms: Iterable[str],
    variants_for: Callable[[str], list[PruneVariant]],
    progress_for: Callable[[str], ProgressCallback | None] = lambda label: None,
    tensorboard: Path | None = None,
) -> list[ResultRecord]:
    """Writes ``out_dir/results.json`` after every model, so an interruption loses one model at most.

    ``tensorboard``: a folder for TensorBoard logs, one run per model directory (same relative path)."""

    def tensorboard_dir(model_dir: Path) -> Path | None:
        return tensorboard / model_dir.relative_to(out_dir) if tensorboard is not None else None

    targets, algorithms = list(targets), list(algorithms)
    for target in targets:
        dataset.domain(target)  # unknown names fail before any work
    for algorithm in algorithms:  # validate every config before the first step of work
        for variant in variants_for(algorithm):
            build_config(base=base.model_dump(), overrides={"target": targets[0], **variant.overrides()})
    records: list[ResultRecord] = []
    for target in targets:
        for algorithm in algorithms:
            config = build_config(
                base=base.model_dump(), overrides={"target": target, "pretrain": {"algorithm": algorithm}}
            )
            run_dir = out_dir / f"target-{target}" / algorithm
            records.append(
                run_pretrain(
                    make_context(config, dataset),
                    run_dir / "pretrained",
                    progress_for(f"[{target} {algorithm}] "),
                    tensorboard_dir=tensorboard_dir(run_dir / "pretrained"),
                )
            )
            write_records(out_dir / "results.json", records)
            for variant in variants_for(algorithm):
                variant_config = build_config(base=config.model_dump(), overrides=variant.overrides())
                label = f"[{target} {algorithm} {variant.dirname}] "
                records.append(
                    run_prune(
                        make_context(variant_config, dataset),
                        run_dir / "pretrained",
                        run_dir / variant.dirname,
                        progress_for(label),
                        tensorboard_dir=tensorboard_dir(run_dir / variant.dirname),
                    )
                )
                write_records(out_dir / "results.json", records)
    return records
