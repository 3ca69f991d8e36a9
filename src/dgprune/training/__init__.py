"""Training loops and evaluation."""

from dgprune.training.evaluation import Accuracy, Evaluator, evaluate, intra_accuracy
from dgprune.training.pretrain import PretrainOutcome, pretrain
from dgprune.training.progress import LinePrinter, ProgressEvent
from dgprune.training.prune_finetune import PruneOutcome, prune_and_finetune
from dgprune.training.settings import PretrainSettings, PruneSettings

__all__ = [
    "Accuracy",
    "Evaluator",
    "LinePrinter",
    "PretrainOutcome",
    "PretrainSettings",
    "ProgressEvent",
    "PruneOutcome",
    "PruneSettings",
    "evaluate",
    "intra_accuracy",
    "pretrain",
    "prune_and_finetune",
]
