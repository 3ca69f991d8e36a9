"""`dgprune analyze`: out-of-distribution importance of a saved model's channels (pruning.ood_importance).

The settings come, in order of precedence, from the command's flags, the ``--config`` file and the
model directory's own ``run.json`` (the resolved settings of the run that wrote it), so that
``dgprune analyze --model pre/`` analyses a model with the data, target and split it was trained on.

Fixed, seeded batches: for each source domain ``batch_size`` images of its *training* split (what
pruning scores on), for each source domain ``batch_size`` images of its validation split (only for
criteria that use validation gradients), and ``batch_size`` images of the target domain (all of it
when smaller). All through the evaluation transform (no augmentation), so every signal sees the same
images whatever it is.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dgprune.data import Domain
from dgprune.errors import ConfigError
from dgprune.experiments.config import RunConfig
from dgprune.experiments.pipeline import METRICS_FILE, make_context
from dgprune.experiments.records import write_json_atomic
from dgprune.pruning.criteria import REGISTRY
from dgprune.pruning.gates import GateSet
from dgprune.pruning.groups import find_channel_groups
from dgprune.pruning.ood_importance import (
    TARGET_NOTE,
    OodImportance,
    criterion_variants,
    measure_ood_importance,
    sample_positions,
)
from dgprune.pruning.oracle import removable_positions

ALL_CHANNELS_LIMIT = 512  # by default, every removable channel up to this many (MNIST_CNN: 448) ...
DEFAULT_SAMPLE = 256  # ... else a seeded sample of this many (ResNet-18: 4,800 channels)
DEFAULT_BATCH_SIZE = 64


@dataclass
class AnalysisReport:
    """An OodImportance plus how it was obtained."""

    result: OodImportance
    model_dir: str
    dataset: str
    seed: int
    batch_size: int
    channel_selection: str  # "all N removable channels" or "a seeded sample of K of N ..."
    device: str
    wall_time_s: float
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_dir": self.model_dir,
            "dataset": self.dataset,
            "seed": self.seed,
            "batch_size_per_domain": self.batch_size,
            "channel_selection": self.channel_selection,
            "device": self.device,
            "wall_time_s": self.wall_time_s,
            "warnings": self.warnings,
            **self.result.to_dict(),
        }



def fixed_batch(domain: Domain, size: int, seed: int, salt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` images of ``domain`` (all when fewer), chosen by a permutation seeded by (salt, seed,
    domain name), through the evaluation transform."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"analysis-{salt}:{seed}:{domain.name}".encode()))
    idx = torch.randperm(len(domain), generator=generator)[: min(size, len(domain))].sort().values
    return domain.eval_batch(idx), domain.labels[idx]


def analyze_model(
    model_dir: Path,
    config: RunConfig,
    channels: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> AnalysisReport:
    """Measure the target and source oracles of a saved model's channels and every criterion's
    agreement with them. ``channels``: analyse at most this many (seeded sample); None: all up to
    ALL_CHANNELS_LIMIT, else a sample of DEFAULT_SAMPLE."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if channels is not None and channels < 2:
        raise ConfigError(f"--channels must be >= 2 (channels to rank), got {channels}")
    started = time.monotonic()
    warnings = _target_warnings(model_dir, config)
    ctx = make_context(config)
    model = ctx.load_model_dir(model_dir)
    device, seed = ctx.device, config.seed
    gates = GateSet(model, find_channel_groups(model, ctx.example_input, config.prune.scope)).attach()
    try:
        candidates = removable_positions(gates)
        limit = (
            channels
            if channels is not None
            else (None if len(candidates) <= ALL_CHANNELS_LIMIT else DEFAULT_SAMPLE)
        )
        positions = sample_positions(candidates, limit, seed)
        if len(positions) == len(candidates):
            selection = f"all {len(candidates)} removable channels"
        else:
            selection = (
                f"a seeded sample (seed {seed}) of {len(positions)} of {len(candidates)} removable channels"
            )

        def move(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            return batch[0].to(device), batch[1].to(device)

        split = ctx.split
        sources = [move(fixed_batch(d, batch_size, seed, "train")) for d in split.train]
        val = [move(fixed_batch(d, batch_size, seed, "val")) for d in split.val]
        target = move(fixed_batch(split.target, batch_size, seed, "target"))
        result = measure_ood_importance(
            model,
            gates,
            sources,
            split.source_names,
            target,
            split.target.name,
            positions,
            val_batches=val,
            seed=seed,
            bn_mode=getattr(config.prune, "bn_mode", "per_domain"),
            keep_ratio=config.prune.keep_ratio,  # what learned_masks' logits are trained towards
            variants=_variants(config),
        )
    finally:
        gates.detach()
    return AnalysisReport(
        result=result,
        model_dir=str(model_dir),
        dataset=ctx.dataset.name,
        seed=seed,
        batch_size=batch_size,
        channel_selection=selection,
        device=str(device),
        wall_time_s=time.monotonic() - started,
        warnings=warnings,
    )


def _variants(config: RunConfig) -> list[tuple[str, dict[str, Any] | None]]:
    """Every criterion's row (ood_importance.criterion_variants); a criterion that trains parameters of
    its own (learned_masks) takes the config's ``prune.criterion_params`` when the config names it, so
    that its training steps can be chosen (``--set prune.criterion_params.mask_steps=...``)."""
    chosen = config.prune.criterion
    own = chosen in REGISTRY and REGISTRY[chosen].learner is not None
    return [
        (name, dict(config.prune.criterion_params) if own and name == chosen and params is None else params)
        for name, params in criterion_variants()
    ]


def _target_warnings(model_dir: Path, config: RunConfig) -> list[str]:
    """The analysis is meaningful only on the domain the model never saw: say so when it is not."""
    metrics = model_dir / METRICS_FILE
    if not metrics.is_file():
        return []
    try:
        trained = json.loads(metrics.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    out = []
    if trained.get("target_domain") not in (None, config.target):
        out.append(
            f"the model was trained with target {trained['target_domain']!r} held out; target "
            f"{config.target!r} was one of its training domains"
        )
    return out


def write_report(report: AnalysisReport, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report.to_dict())


TABLE_HEADER = ("signal", "ρ target", "ρ target²", "ρ source² (Eq. 1)", "overlap@50%", "overlap@70%")


def table_rows(result: OodImportance) -> list[list[str]]:
    """One row per source-only signal (oracle signals, then criteria), then the chance baseline."""

    def rho(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:+.3f}"

    rows = []
    for row in result.rows:
        label = row.name if row.kind == "oracle" else f"criterion {row.name}"
        rows.append(
            [
                label,
                rho(row.spearman_target),
                rho(row.spearman_target_squared),
                rho(row.spearman_source),
                *(f"{row.overlap[f]:.3f}" for f in result.fractions),
            ]
        )
    chance = result.chance_overlap
    rows.append(["random ranking (expected)", "0", "0", "0", *(f"{chance[f]:.3f}" for f in result.fractions)])
    return rows


def to_markdown(report: AnalysisReport) -> str:
    rows = table_rows(report.result)
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_lines(report: AnalysisReport) -> list[str]:
    """What was measured, in a few lines (printed above the table)."""
    r = report.result
    risks = ", ".join(f"{name} {value:.3f}" for name, value in r.risks_now.items())
    return [
        TARGET_NOTE,
        f"model {report.model_dir} on {report.dataset}: target {r.target_name!r}, sources "
        f"{', '.join(r.source_names)}; {report.channel_selection}; {report.batch_size} images per "
        f"domain (sources: train split; target: the target domain); seed {report.seed}",
        f"risk now (mean cross-entropy on these batches): {risks}",
        "ρ: Spearman rank correlation of each source-only signal with the target oracle (signed rise of "
        "the target risk when the channel is removed), its square, and the source oracle of Eq. 1; "
        "overlap@p: share of the p lowest-scored channels that are among the target oracle's p lowest.",
        "Rows marked [unlabeled target] (dss, target_entropy) read the target's images, never its labels: "
        "they are transductive signals, not source-only ones.",
        *(f"warning: {w}" for w in report.warnings),
    ]
