"""The first phase of pruning for a criterion with trainable parameters of its own (learned_masks).

Steps 1..K of the pruning stage train the criterion's parameters (``ParameterLearner``, see
pruning/criterion_spec.py) on one mini-batch per source domain each, from the stage's own batch
stream; the model is not trained. Then one pruning step removes every channel down to the target by
the learned scores (``PruningSchedule.prune_at_once``), and fine-tuning runs as for any criterion
from step K + 1 on. The phase is checkpointed like the rest of the stage (same ``Checkpointer``, same
step numbers, ``phase: learn``), so an interrupted run resumes to the same parameters.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dgprune.data import DomainBatches
from dgprune.pruning.criterion_spec import ParameterLearner
from dgprune.pruning.gates import GateSet
from dgprune.training.checkpoint import Checkpointer, rng_state, set_rng_state
from dgprune.training.divergence import DivergenceGuard
from dgprune.training.progress import ProgressCallback, ProgressEvent

LEARN_PHASE = "learn"  # a checkpoint's "phase" while the criterion's parameters are trained


def is_learning_checkpoint(saved: dict[str, Any] | None) -> bool:
    return saved is not None and saved.get("phase") == LEARN_PHASE


def learn_criterion(
    learner: ParameterLearner,
    batches: DomainBatches,
    gates: GateSet,
    device: torch.device,
    checkpointer: Checkpointer,
    total_steps: int,
    saved: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    log_every: int = 1,
) -> torch.Tensor:
    """Train ``learner`` for its steps (resuming from ``saved``, a checkpoint of this phase, if given);
    returns its [M] scores (finite, else DivergenceError)."""
    guard = DivergenceGuard("prune (criterion training)", learner.lr, checkpointer)
    start = 1
    if saved is not None:
        learner.load_state_dict(saved["learner"])
        batches.load_state_dict(saved["batches"])
        set_rng_state(saved["rng"])
        start = saved["step"] + 1
    started = time.monotonic()
    for step in range(start, learner.steps + 1):
        minibatches = [(x.to(device), y.to(device)) for x, y in batches.next()]
        stats = learner.step(minibatches)
        guard.check_stats(step, stats)  # the loss: non-finite logits make it non-finite at once
        if progress and (step % log_every == 0 or step == learner.steps):
            others = {k: v for k, v in stats.items() if k != "loss"}
            progress(
                ProgressEvent(
                    "prune",
                    step,
                    total_steps,
                    stats["loss"],
                    gates.num_alive(),
                    gates.total,
                    elapsed_s=time.monotonic() - started,
                    stats=others or None,
                )
            )
        if checkpointer.due(step):
            checkpointer.save(
                {
                    "step": step,
                    "phase": LEARN_PHASE,
                    "total_steps": total_steps,
                    "learner": learner.state_dict(),
                    "batches": batches.state_dict(),
                    "rng": rng_state(),
                }
            )
    scores = learner.scores()
    guard.check_tensor(learner.steps, "learned scores", scores)  # NaN would rank channels by position
    return scores
