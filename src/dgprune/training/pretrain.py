"""Pretraining over the source domains; the kept model is the best intra-domain val checkpoint."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from dgprune.algorithms import make_algorithm
from dgprune.data import DomainBatches, LodoSplit
from dgprune.training.evaluation import intra_accuracy
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
) -> PretrainOutcome:
    """Train ``model`` in place; returns the state of the best checkpoint (also loaded into ``model``)."""
    torch.manual_seed(seed)
    hparams = {**settings.hparams, "lr": settings.lr, "weight_decay": settings.weight_decay}
    algorithm = make_algorithm(settings.algorithm, model, len(split.train), hparams)
    batches = DomainBatches(split.train, settings.batch_size, seed=seed)
    best_val, best_step, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    model.train()
    started = time.monotonic()
    for step in range(1, settings.steps + 1):
        minibatches = [(x.to(device), y.to(device)) for x, y in batches.next()]
        losses = algorithm.update(minibatches)
        if step % settings.eval_every == 0 or step == settings.steps:
            val = intra_accuracy(model, split, device)
            history.append({"step": step, "loss": losses["loss"], "val_acc": val})
            if val > best_val:
                best_val, best_step = val, step
                best_state = copy.deepcopy(model.state_dict())
            if progress:
                progress(
                    ProgressEvent(
                        "pretrain",
                        step,
                        settings.steps,
                        losses["loss"],
                        val_acc=val,
                        elapsed_s=time.monotonic() - started,
                    )
                )
    model.load_state_dict(best_state)
    return PretrainOutcome(best_state, best_val, best_step, history)
