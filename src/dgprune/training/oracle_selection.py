"""The target domain's test half at two checkpoints of one stage: the one selected on the sources'
validation split (training-domain validation, what dgprune ships) and the one a test-domain oracle
would select (best accuracy on the target's validation half; DomainBed's third selection method, an
upper bound that reads target labels: for reporting only, never used to choose a model).

Both are read from the stage's evaluations (the loops' ``history``: each evaluated step carries the
target's ``target_val`` and ``target_test`` accuracies, ``Evaluator``'s two halves of the target), so
the two numbers are measured on the same images and differ only by which checkpoint they come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dgprune.training.evaluation import Accuracy


@dataclass(frozen=True)
class TestHalfAccuracies:
    selected: float  # target_test at the checkpoint chosen on source validation
    oracle: float  # target_test at the checkpoint with the best target_val (first one on ties)
    oracle_step: int


def target_halves(acc: Accuracy) -> dict[str, float]:
    """The target's two halves of one evaluation, for a history entry ({} if the target has one image)."""
    parts = acc.splits.get(acc.target_name, {})
    return {k: parts[k] for k in ("target_val", "target_test") if k in parts}


def test_half_accuracies(history: list[dict[str, Any]], selected_step: int) -> TestHalfAccuracies | None:
    """None when the evaluations carry no target halves (a one-image target, or a run resumed from a
    checkpoint of an older dgprune)."""
    evaluated = [h for h in history if "target_val" in h and "target_test" in h]
    if not evaluated or all(h["step"] != selected_step for h in evaluated):
        return None
    oracle = max(evaluated, key=lambda h: h["target_val"])  # max keeps the first of equal values
    selected = next(h for h in evaluated if h["step"] == selected_step)
    return TestHalfAccuracies(selected["target_test"], oracle["target_test"], oracle["step"])
