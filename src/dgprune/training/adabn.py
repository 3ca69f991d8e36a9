"""AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", 2016): the
BatchNorm statistics re-estimated on the target's images before evaluating on it.

Under ``prune.target_access: unlabeled`` a pruning run may see the target's images, so the simplest
transductive baseline, which needs no pruning criterion at all, is measured beside it: the cross-domain
accuracy of the pruned model and of the dense model after AdaBN (``ResultRecord.cross_acc_adabn`` and
``dense_cross_acc_adabn``). Only for models with BatchNorm (MNIST_CNN's GroupNorm has no statistics to
re-estimate: None).

Each BatchNorm's running mean and variance are reset and re-estimated as the plain average over
mini-batches of ``batch_size`` target images, in order (``momentum = None``: PyTorch's cumulative
average; the variance is each batch's unbiased one, averaged), every other layer in evaluation mode.
The model evaluated is a copy; the saved model keeps its source statistics. Only the images are read
for the statistics (``Domain.eval_batch``); the labels only by the accuracy itself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from dgprune.data import Domain
from dgprune.training.evaluation import correct_mask

_BatchNorm = nn.modules.batchnorm._BatchNorm


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def _images(domain: Domain, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The domain's model-ready images in order, in batches; never its labels."""
    n = len(domain.images)
    for start in range(0, n, batch_size):
        yield domain.eval_batch(torch.arange(start, min(start + batch_size, n))).to(device)


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterator[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` (in evaluation mode) whose BatchNorm statistics are the average over
    ``batches``."""
    adapted = copy.deepcopy(model).eval()
    norms = [m for m in adapted.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
        norm.train()
    for x in batches:
        adapted(x)
    for norm in norms:
        norm.eval()
    return adapted


def adabn_cross_accuracy(
    model: nn.Module, target: Domain, device: torch.device, batch_size: int = 256
) -> float | None:
    """The target accuracy after AdaBN on the target's images; None for a model without BatchNorm."""
    if not has_batchnorm(model):
        return None
    adapted = adapt_batchnorm(model, _images(target, batch_size, device))
    hits = correct_mask(adapted, target, device)  # the evaluation: the only use of the labels
    return int(hits.sum()) / len(hits)
