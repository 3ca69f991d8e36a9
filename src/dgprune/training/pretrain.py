"""Pretraining over the source domains; the kept model is the best intra-domain val checkpoint."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dgprune.algorithms import make_algorithm
from dgprune.data import DomainBatches, LodoSplit
from dgprune.training.checkpoint import Checkpointer, rng_state, set_rng_state
from dgprune.training.divergence import DivergenceGuard
from dgprune.training.evaluation import Evaluator
from dgprune.training.identity import Identity
from dgprune.training.oracle_selection import target_halves
from dgprune.training.progress import ProgressCallback, ProgressEvent
from dgprune.training.settings import PretrainSettings


@dataclass
class PretrainOutcome:
    best_state: dict[str, torch.Tensor]
    best_val: float
    best_step: int
    history: list[dict[str, float]] = field(default_factory=list)


def pretrain(
    model: nn.Module,
    split: LodoSplit,
    settings: PretrainSettings,
    seed: int,
    device: torch.device,
    progress: ProgressCallback | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 50,
    checkpoint_identity: Identity | None = None,
    log_every: int = 1,
) -> PretrainOutcome:
    """Train ``model`` in place; returns the state of the best checkpoint (also loaded into ``model``).

    With ``checkpoint_dir``, the whole training state (model, algorithm and its optimiser, batch
    streams, RNG, best checkpoint so far) is saved every ``checkpoint_every`` steps, and a later call
    with the same arguments continues from it: the result equals that of an uninterrupted run.
    With ``checkpoint_identity``, only a checkpoint of that run is resumed (see Checkpointer).
    A non-finite loss or weight raises DivergenceError; no checkpoint is written after it.
    ``progress`` gets an event every ``log_every`` steps, at every evaluation and at the last step.
    """
    torch.manual_seed(seed)
    # The run seed drives the algorithm's own draws (Mixup) unless the config sets one explicitly.
    # The optimiser settings come from `settings` (resolved for the dataset's kind by RunConfig).
    optimiser = {"lr": settings.lr, "weight_decay": settings.weight_decay, "batch_size": settings.batch_size}
    hparams = {"seed": seed, **settings.hparams, **optimiser}
    algorithm = make_algorithm(settings.algorithm, model, len(split.train), hparams)
    batches = DomainBatches(split.train, settings.batch_size, seed=seed)
    best_val, best_step, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    checkpointer = Checkpointer(checkpoint_dir, checkpoint_every, checkpoint_identity)
    guard = DivergenceGuard("pretrain", settings.lr, checkpointer)
    evaluator = Evaluator(split, device)
    start = 1
    if (saved := checkpointer.load()) is not None:
        model.load_state_dict(saved["model"])
        algorithm.load_state_dict(saved["algorithm"])
        batches.load_state_dict(saved["batches"])
        set_rng_state(saved["rng"])
        best_val, best_step, best_state = saved["best_val"], saved["best_step"], saved["best_state"]
        history, start = saved["history"], saved["step"] + 1
    model.train()
    started = time.monotonic()
    for step in range(start, settings.steps + 1):
        minibatches = [(x.to(device), y.to(device)) for x, y in batches.next()]
        losses = algorithm.update(minibatches)
        guard.check_stats(step, losses)
        val = acc = None
        if step % settings.eval_every == 0 or step == settings.steps:
            guard.check_weights(step, model)  # never select a diverged model
            acc = evaluator(model)
            val = acc.intra  # selection: source val only; the other splits are only logged
            history.append({"step": step, "loss": losses["loss"], "val_acc": val, **target_halves(acc)})
            if val > best_val:
                best_val, best_step = val, step
                best_state = copy.deepcopy(model.state_dict())
        if progress and (step % log_every == 0 or step == settings.steps or val is not None):
            stats = {k: float(v) for k, v in losses.items() if k != "loss"}
            progress(
                ProgressEvent(
                    "pretrain",
                    step,
                    settings.steps,
                    losses["loss"],
                    val_acc=val,
                    elapsed_s=time.monotonic() - started,
                    stats=stats or None,
                    domain_acc=acc.splits if acc is not None else None,
                )
            )
        if checkpointer.due(step):
            guard.check_weights(step, model)  # the checkpoint on disk stays the last good one
            checkpointer.save(
                {
                    "step": step,
                    "model": model.state_dict(),
                    "algorithm": algorithm.state_dict(),
                    "batches": batches.state_dict(),
                    "rng": rng_state(),
                    "best_val": best_val,
                    "best_step": best_step,
                    "best_state": best_state,
                    "history": history,
                }
            )
    model.load_state_dict(best_state)
    return PretrainOutcome(best_state, best_val, best_step, history)
