"""Top-1 accuracy: intra-domain (union of source val splits), cross-domain (whole target), per domain
and per split (:class:`Evaluator`: what every evaluation of a stage logs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dgprune.data import Domain, LodoSplit, iterate_batches


@torch.no_grad()
def correct_mask(
    model: nn.Module, domain: Domain, device: torch.device, batch_size: int = 512
) -> torch.Tensor:
    """[n] bool: which of the domain's samples the model classifies correctly (in order)."""
    was_training = model.training
    model.eval()
    hits = [model(x.to(device)).argmax(dim=1).cpu() == y for x, y in iterate_batches(domain, batch_size)]
    model.train(was_training)
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def count_correct(model: nn.Module, domain: Domain, device: torch.device, batch_size: int = 512) -> int:
    return int(correct_mask(model, domain, device, batch_size).sum())


# The splits every evaluation measures (history.jsonl's "acc", TensorBoard's acc/<domain>/<split>, the
# record's domain_split_acc): a source's fixed train sample and its val split; the target whole, and
# its two parts for oracle selection (choose by target_val, report target_test, as DomainBed's oracle).
SOURCE_SPLITS = ("train", "val")
TARGET_SPLITS = ("target", "target_val", "target_test")


@dataclass
class Accuracy:
    intra: float  # on the union of the source domains' val splits
    cross: float  # on the whole unseen target domain
    per_domain: dict[str, float] = field(default_factory=dict)  # sources: val split; target: whole
    target_name: str = ""
    # domain -> split (SOURCE_SPLITS, TARGET_SPLITS) -> accuracy: everything that was measured.
    splits: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def worst_source(self) -> float:
        sources = [acc for name, acc in self.per_domain.items() if name != self.target_name]
        return min(sources) if sources else float("nan")

    @property
    def per_domain_split(self) -> dict[str, str]:
        """Which split each number of ``per_domain`` comes from: ``val`` or ``target`` (whole)."""
        return {name: "target" if name == self.target_name else "val" for name in self.per_domain}


def intra_accuracy(model: nn.Module, split: LodoSplit, device: torch.device) -> float:
    """Model selection metric: never looks at the target domain."""
    correct = sum(count_correct(model, d, device) for d in split.val)
    return correct / sum(len(d) for d in split.val)


class Evaluator:
    """Every domain's accuracy on fixed data, for every evaluation of a stage: each source's val split
    and a fixed sample of its train split (``LodoSplit.train_samples``), the target whole and in its
    two parts (``LodoSplit.target_indices``). The target's numbers are logged, never used to select:
    ``Accuracy.intra`` (source val) is the selection metric."""

    def __init__(self, split: LodoSplit, device: torch.device) -> None:
        self.split = split
        self.device = device
        self.train_samples = split.train_samples()  # drawn once: every evaluation sees the same samples
        # A one-sample target has no two parts (split_indices needs two samples).
        self.target_parts = split.target_indices() if len(split.target) > 1 else None

    def __call__(self, model: nn.Module) -> Accuracy:
        split, device = self.split, self.device
        splits: dict[str, dict[str, float]] = {}
        per_domain: dict[str, float] = {}
        correct_val = 0
        for domain, sample in zip(split.val, self.train_samples, strict=True):
            correct = count_correct(model, domain, device)
            correct_val += correct
            per_domain[domain.name] = correct / len(domain)
            splits[domain.name] = {
                "train": count_correct(model, sample, device) / len(sample),
                "val": per_domain[domain.name],
            }
        hits = correct_mask(model, split.target, device)  # one pass over the target gives all three
        cross = int(hits.sum()) / len(hits)
        per_domain[split.target.name] = cross
        splits[split.target.name] = {"target": cross}
        if self.target_parts is not None:
            rest, val = self.target_parts
            splits[split.target.name]["target_val"] = int(hits[val].sum()) / len(val)
            splits[split.target.name]["target_test"] = int(hits[rest].sum()) / len(rest)
        intra = correct_val / sum(len(d) for d in split.val)
        return Accuracy(intra, cross, per_domain, split.target.name, splits)


def evaluate(model: nn.Module, split: LodoSplit, device: torch.device) -> Accuracy:
    return Evaluator(split, device)(model)
