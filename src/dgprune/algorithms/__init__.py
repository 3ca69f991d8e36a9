"""Pretraining algorithms (DESIGN.md §4); one small class each, registered by name."""

from dgprune.algorithms.base import Algorithm, Minibatches
from dgprune.algorithms.erm import ERM

ALGORITHMS: dict[str, type[Algorithm]] = {"erm": ERM}


def make_algorithm(name: str, model, lr: float, weight_decay: float = 0.0) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](model, lr=lr, weight_decay=weight_decay)


__all__ = ["ALGORITHMS", "ERM", "Algorithm", "Minibatches", "make_algorithm"]
