"""Top-1 accuracy: intra-domain (union of source val splits), cross-domain (whole target), per domain."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dgprune.data import Domain, LodoSplit, iterate_batches


@torch.no_grad()
def count_correct(model: nn.Module, domain: Domain, device: torch.device, batch_size: int = 512) -> int:
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in iterate_batches(domain, batch_size):
        logits = model(x.to(device))
        correct += int((logits.argmax(dim=1).cpu() == y).sum())
    model.train(was_training)
    return correct


@dataclass
class Accuracy:
    intra: float  # on the union of the source domains' val splits
    cross: float  # on the whole unseen target domain
    per_domain: dict[str, float] = field(default_factory=dict)  # sources: val split; target: whole
    target_name: str = ""

    @property
    def worst_source(self) -> float:
        sources = [acc for name, acc in self.per_domain.items() if name != self.target_name]
        return min(sources) if sources else float("nan")


def intra_accuracy(model: nn.Module, split: LodoSplit, device: torch.device) -> float:
    """Model selection metric: never looks at the target domain."""
    correct = sum(count_correct(model, d, device) for d in split.val)
    return correct / sum(len(d) for d in split.val)


def evaluate(model: nn.Module, split: LodoSplit, device: torch.device) -> Accuracy:
    per_domain: dict[str, float] = {}
    correct_val = 0
    for domain in split.val:
        correct = count_correct(model, domain, device)
        correct_val += correct
        per_domain[domain.name] = correct / len(domain)
    cross = count_correct(model, split.target, device) / len(split.target)
    per_domain[split.target.name] = cross
    intra = correct_val / sum(len(d) for d in split.val)
    return Accuracy(intra=intra, cross=cross, per_domain=per_domain, target_name=split.target.name)
