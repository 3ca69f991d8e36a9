"""Out-of-distribution importance, measured: does any source-only signal predict it?

The paper's claim is that IoR scores a channel's *out-of-distribution* importance. This module
measures that importance directly and compares every criterion with it:

- the **target oracle** of a channel: the rise of the target domain's risk (mean cross-entropy on a
  fixed target batch) when that one channel is removed, signed (``R_T(g - e_m) - R_T(g)``; a
  channel whose removal *lowers* the target risk has a negative rise);
- the **source oracle**: the same rise of the mean source risk (signed), and its square (paper
  Eq. 1); each source domain's own rise, and their minimum and maximum over the sources (the mean of
  the per-source rises *is* the signed source oracle);
- every registered criterion's score (``criteria.CRITERIA`` except ``oracle``, which is the
  measurement itself), computed from one training-mode step on the source batches as pruning does
  (per-domain gate gradients of one backward, no optimizer step), plus a few IoR weightings; the
  criteria scored per pruning event (``dss_sources``; and ``dss`` and ``target_entropy`` with both
  signs, which read the target batch's *images* as under ``prune.target_access: unlabeled``: their
  rows are marked ``[unlabeled target]``) as at a pruning event, in evaluation mode; and
  ``learned_masks``' logits after all its mask-training steps on the fixed source batches.

For each of these signals (source-only but for the marked rows): Spearman's rank correlation with the
target oracle (signed and squared) and with the source oracle (Eq. 1), and the overlap of its lowest-k
channels (those it would prune first) with the target oracle's lowest-k, ``|A & B| / k``, at k = 50%
and 70% of the analysed channels; a random ranking overlaps k / K on average (K analysed channels).

All oracles come from one set of forwards (``oracle.removal_risks``: one forward of every batch per
channel), in evaluation mode (BatchNorm with its running statistics: the risk the deployed model
has). The target's labels are used for this analysis only, never for pruning, selection or any
setting; its images only by the marked rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from dgprune.errors import ConfigError
from dgprune.pruning.criteria import (
    CRITERIA,
    REGISTRY,
    Criterion,
    LearnerContext,
    ScoreInputs,
    criterion_label,
    make_criterion,
)
from dgprune.pruning.event_inputs import event_score_inputs
from dgprune.pruning.gates import GateSet
from dgprune.pruning.oracle import Batch, removable_positions, removal_risks
from dgprune.pruning.scoring import DomainStep, per_domain_forward_backward
from dgprune.pruning.weight_stats import weight_statistics

TARGET_NOTE = (
    "The target domain is used here for analysis only: "
    "never for pruning, checkpoint selection or any setting."
)
PRUNED_FRACTIONS: tuple[float, ...] = (0.5, 0.7)
# IoR weightings added as extra rows (the registry's `ior` row is the default alpha = 1).
EXTRA_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ior", {"alpha": 100.0}),
    ("ior", {"alpha": 1e4}),
    ("ior", {"alpha_mode": "share", "share": 1.0}),
    # target_entropy has no default sign: both are rows (its sign must be chosen without target labels)
    ("target_entropy", {"sign": 1}),
    ("target_entropy", {"sign": -1}),
)
SKIPPED_CRITERIA = ("oracle",)  # the measurement itself
Values = Sequence[float] | np.ndarray | torch.Tensor


# ---------------------------------------------------------------- statistics


def spearman(a: Values, b: Values) -> float:
    """Spearman's rank correlation (ties get average ranks); NaN when either side is constant."""
    x, y = _numpy(a), _numpy(b)
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def lowest_k(values: Values, k: int) -> np.ndarray:
    """Indices of the k smallest values (what a criterion prunes first); ties broken by index."""
    return np.argsort(_numpy(values), kind="stable")[:k]


def lowest_k_overlap(score: Values, reference: Values, k: int) -> float:
    """``|A & B| / k`` for A, B the k lowest of ``score`` and of ``reference``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return len(set(lowest_k(score, k).tolist()) & set(lowest_k(reference, k).tolist())) / k


def pruned_count(total: int, fraction: float) -> int:
    """k for "fraction of the analysed channels pruned", at least 1."""
    return max(1, round(fraction * total))


def _numpy(values: Values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


# ---------------------------------------------------------------- measurement


@dataclass
class SignalStats:
    """How one source-only signal agrees with the target oracle (and with the source oracle)."""

    name: str
    kind: str  # "oracle" (a measured source signal) or "criterion"
    spearman_target: float  # vs the signed target oracle
    spearman_target_squared: float  # vs the squared target oracle (Eq. 1 on the target)
    spearman_source: float  # vs the source oracle of Eq. 1 (squared)
    overlap: dict[float, float]  # fraction pruned -> lowest-k overlap with the target oracle's


@dataclass
class OodImportance:
    """The measurement on K analysed channels (flat gate positions ``positions``)."""

    positions: list[int]  # analysed flat gate positions
    removable: int  # how many alive channels could be removed (K <= removable)
    source_names: list[str]
    target_name: str
    risks_now: dict[str, float]  # each domain's risk on its fixed batch, current model
    target_rise: torch.Tensor  # [K] signed rise of the target risk
    source_rises: torch.Tensor  # [N, K] each source domain's signed rise
    signals: dict[str, torch.Tensor]  # name -> [K] source-only signal (oracle signals, then criteria)
    kinds: dict[str, str]  # name -> "oracle" | "criterion"
    rows: list[SignalStats] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # criterion -> why it has no row
    fractions: tuple[float, ...] = PRUNED_FRACTIONS

    @property
    def chance_overlap(self) -> dict[float, float]:
        """Expected overlap of a random ranking: k / K."""
        total = len(self.positions)
        return {f: pruned_count(total, f) / total for f in self.fractions}

    def to_dict(self) -> dict[str, Any]:
        def num(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {
            "note": TARGET_NOTE,
            "target_domain": self.target_name,
            "source_domains": self.source_names,
            "channels_analysed": len(self.positions),
            "channels_removable": self.removable,
            "risks_now": self.risks_now,
            "pruned_fractions": list(self.fractions),
            "k": {str(f): pruned_count(len(self.positions), f) for f in self.fractions},
            "chance_overlap": {str(f): v for f, v in self.chance_overlap.items()},
            "rows": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "spearman_target": num(r.spearman_target),
                    "spearman_target_squared": num(r.spearman_target_squared),
                    "spearman_source": num(r.spearman_source),
                    "overlap": {str(f): v for f, v in r.overlap.items()},
                }
                for r in self.rows
            ],
            "skipped_criteria": self.skipped,
            "positions": self.positions,
            "target_rise": self.target_rise.tolist(),
            "source_rises": {
                n: r.tolist() for n, r in zip(self.source_names, self.source_rises, strict=True)
            },
            "signals": {name: values.tolist() for name, values in self.signals.items()},
        }


def sample_positions(candidates: list[int], limit: int | None, seed: int) -> list[int]:
    """All candidates when ``limit`` is None or not below their number, else a seeded sample of
    ``limit`` of them (kept in flat order)."""
    if limit is None or limit >= len(candidates):
        return list(candidates)
    if limit < 2:
        raise ConfigError(f"channels: need at least 2 channels to rank, got {limit}")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(candidates), generator=generator)[:limit].sort().values
    return [candidates[i] for i in chosen.tolist()]


def criterion_variants() -> list[tuple[str, dict[str, Any] | None]]:
    """Every registered criterion but the oracle (default parameters), then the extra IoR rows."""
    variants: list[tuple[str, dict[str, Any] | None]] = [
        (name, None) for name in CRITERIA if name not in SKIPPED_CRITERIA and _has_defaults(name)
    ]
    return variants + [(name, params) for name, params in EXTRA_VARIANTS if name in CRITERIA]


def _has_defaults(name: str) -> bool:
    """Whether every parameter of the criterion has a default (target_entropy's sign has none)."""
    return not any(info.is_required() for info in REGISTRY[name].params.model_fields.values())


def criterion_scores(
    model: nn.Module,
    gates: GateSet,
    source_batches: list[Batch],
    val_batches: list[Batch] | None,
    seed: int = 0,
    variants: Sequence[tuple[str, Mapping[str, Any] | None]] | None = None,
    bn_mode: str = "per_domain",
    keep_ratio: float = 0.5,
    target_images: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each criterion's [M] scores at the current weights: one training-mode forward/backward of the
    source batches (and of the validation batches when a criterion needs them), as pruning scores;
    no optimizer step, parameter gradients cleared and BatchNorm statistics restored afterwards.
    A criterion with trainable parameters of its own (learned_masks) trains them on the source batches
    first (all its steps on these same batches, aiming at ``keep_ratio``); the model is left as it was.

    A criterion scored per pruning event (dss, dss_sources, target_entropy) is scored as at an event,
    in evaluation mode, on the source batches' images and, when it needs them, on ``target_images``
    (images only): its row is labelled ``[unlabeled target]`` then (criterion_label).

    Returns (label -> scores, label -> why skipped) for criteria that cannot be scored here.
    """
    criteria = []
    skipped: dict[str, str] = {}
    for name, params in variants if variants is not None else criterion_variants():
        try:
            criteria.append(make_criterion(name, params=params, seed=seed))
        except ConfigError as err:  # e.g. a parameter this version of the criterion does not take
            skipped[f"{name} {dict(params or {})}"] = str(err)
    needs_val = bool(val_batches) and any(getattr(c, "needs_val_gradients", False) for c in criteria)
    step = val_step = None
    if needs_val or any(c.needs_gradients for c in criteria):
        step, val_step = _gradient_steps(
            model, gates, source_batches, val_batches if needs_val else None, bn_mode
        )
    filter_l1, norm_scale = weight_statistics(model, gates.groups)
    dtype = next(model.parameters()).dtype  # float64 models get float64 scores
    available = {
        "gates": gates.flat_gates().to(dtype),
        "domain_grads": step.domain_grads if step is not None else None,
        "risks": step.risks if step is not None else None,
        "filter_l1": filter_l1,
        "norm_scale": norm_scale,
        "val_domain_grads": val_step.domain_grads if val_step is not None else None,
        "val_risks": val_step.risks if val_step is not None else None,
    }
    accepted = {f.name for f in fields(ScoreInputs)}
    inputs = ScoreInputs(**{k: v for k, v in available.items() if k in accepted})
    scores: dict[str, torch.Tensor] = {}
    for criterion in criteria:
        label = getattr(criterion, "label", criterion.name)
        if getattr(criterion, "learner", None) is not None:
            learned = _learned_scores(criterion, model, gates, source_batches, keep_ratio, bn_mode, seed)
            scores[label] = learned
            continue
        if criterion.needs_loss_changes:
            skipped[label] = "needs the measured loss changes: it is the source oracle (Eq. 1) row"
            continue
        if getattr(criterion, "scored", "every_step") == "per_pruning_event":
            if criterion.needs_target_images:
                label = criterion_label(criterion.name, criterion.params, target_access="unlabeled")
                if target_images is None:
                    skipped[label] = "needs the target's images"
                    continue
            sources = [x for x, _ in source_batches]
            event = event_score_inputs(criterion, model, gates, sources, target_images, inputs)
            try:
                scores[label] = criterion.score(event).detach().double().cpu()
            except ValueError as err:  # e.g. dss_sources with a single source
                skipped[label] = str(err)
            continue
        try:
            scores[label] = criterion.score(inputs).detach().double().cpu()
        except ValueError as err:  # an input this analysis does not compute (e.g. no val batches)
            skipped[label] = str(err)
    return scores, skipped


def _learned_scores(
    criterion: Criterion,
    model: nn.Module,
    gates: GateSet,
    source_batches: list[Batch],
    keep_ratio: float,
    bn_mode: str,
    seed: int,
) -> torch.Tensor:
    """[M] the learned scores (learned_masks: the mask logits) after the learner's steps on the fixed
    source batches; the learner leaves the weights and BatchNorm statistics untouched."""
    assert criterion.learner is not None
    learner = criterion.learner(LearnerContext(model, gates, keep_ratio, bn_mode, seed))
    for _ in range(learner.steps):
        learner.step(source_batches)
    return learner.scores().detach().double().cpu()


def _gradient_steps(
    model: nn.Module,
    gates: GateSet,
    source_batches: list[Batch],
    val_batches: list[Batch] | None,
    bn_mode: str = "per_domain",
) -> tuple[DomainStep, DomainStep | None]:
    """Per-domain risks and gate gradients of the source (and validation) batches, in training mode as
    pruning scores (``bn_mode`` as ``prune.bn_mode``); leaves no parameter gradient and no BatchNorm
    statistics update behind."""
    was_training = model.training
    saved_buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        step = per_domain_forward_backward(model, gates, source_batches, bn_mode=bn_mode)
        val_step = None
        if val_batches:
            model.zero_grad(set_to_none=True)
            val_step = per_domain_forward_backward(model, gates, val_batches, bn_mode=bn_mode)
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, buffer in model.named_buffers():  # undo BatchNorm running-statistics updates
                buffer.copy_(saved_buffers[name])
        model.train(was_training)
    return step, val_step


def measure_ood_importance(
    model: nn.Module,
    gates: GateSet,
    source_batches: list[Batch],
    source_names: list[str],
    target_batch: Batch,
    target_name: str,
    positions: list[int] | None = None,
    val_batches: list[Batch] | None = None,
    seed: int = 0,
    fractions: tuple[float, ...] = PRUNED_FRACTIONS,
    variants: Sequence[tuple[str, Mapping[str, Any] | None]] | None = None,
    bn_mode: str = "per_domain",
    keep_ratio: float = 0.5,
) -> OodImportance:
    """Target and source oracles of the removable channels (or of ``positions``, a subset of them) and
    every criterion's agreement with them. ``gates`` must be attached to ``model``; ``bn_mode`` is how
    the criteria's training-mode step forwards the sources (``prune.bn_mode``)."""
    if len(source_batches) != len(source_names):
        raise ValueError("one name per source batch")
    candidates = removable_positions(gates)
    if positions is None:
        positions = candidates
    else:
        outside = sorted(set(positions) - set(candidates))
        if outside:
            raise ValueError(f"positions {outside[:5]} are not removable alive channels")
    if len(positions) < 2:
        raise ConfigError(f"only {len(positions)} removable channel(s): nothing to rank")
    scores, skipped = criterion_scores(
        model, gates, source_batches, val_batches, seed, variants, bn_mode, keep_ratio, target_batch[0]
    )

    was_training = model.training
    model.eval()  # the deployed model's risk: BatchNorm with running statistics
    try:
        risks = removal_risks(model, gates, [*source_batches, target_batch], positions)
    finally:
        model.train(was_training)
    index = torch.tensor(positions, dtype=torch.long)
    rises = risks.rises().cpu()[:, index]  # [N + 1, K]
    source_rises, target_rise = rises[:-1], rises[-1]
    source_signed = source_rises.mean(dim=0)  # the rise of the mean source risk

    signals: dict[str, torch.Tensor] = {
        "source oracle^2 (Eq. 1)": source_signed**2,
        "source oracle, signed (mean over sources)": source_signed,
        "min over sources": source_rises.min(dim=0).values,
        "max over sources": source_rises.max(dim=0).values,
        **{f"source {name}": rise for name, rise in zip(source_names, source_rises, strict=True)},
    }
    kinds = dict.fromkeys(signals, "oracle")
    for label, values in scores.items():
        signals[label] = values[index]
        kinds[label] = "criterion"

    names = [*source_names, target_name]
    result = OodImportance(
        positions=list(positions),
        removable=len(candidates),
        source_names=list(source_names),
        target_name=target_name,
        risks_now={n: float(r) for n, r in zip(names, risks.base.cpu(), strict=True)},
        target_rise=target_rise,
        source_rises=source_rises,
        signals=signals,
        kinds=kinds,
        skipped=skipped,
        fractions=fractions,
    )
    result.rows = [
        agreement(name, kinds[name], values, target_rise, signals["source oracle^2 (Eq. 1)"], fractions)
        for name, values in signals.items()
    ]
    return result


def agreement(
    name: str,
    kind: str,
    signal: torch.Tensor,
    target_rise: torch.Tensor,
    source_oracle: torch.Tensor,
    fractions: tuple[float, ...] = PRUNED_FRACTIONS,
) -> SignalStats:
    """One row: Spearman with the target oracle (signed, squared) and the source oracle (Eq. 1), and
    the lowest-k overlap with the signed target oracle at each pruned fraction."""
    total = len(signal)
    return SignalStats(
        name=name,
        kind=kind,
        spearman_target=spearman(signal, target_rise),
        spearman_target_squared=spearman(signal, target_rise**2),
        spearman_source=spearman(signal, source_oracle),
        overlap={f: lowest_k_overlap(signal, target_rise, pruned_count(total, f)) for f in fractions},
    )
