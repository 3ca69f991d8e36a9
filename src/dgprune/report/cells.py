"""Formatting of table cells: mean over seeds, with the standard error when there are several."""

from __future__ import annotations

import math
from statistics import mean, stdev


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)); se is 0 for one value."""
    if not values:
        return math.nan, math.nan
    se = stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean(values), se


def pct_cell(values: list[float], signed: bool = False) -> str:
    """Accuracies (fractions) as percent: "93.33", or "93.33 ± 0.41" over several seeds."""
    if not values:
        return "-"
    m, se = mean_se([100 * v for v in values])
    text = f"{m:+.2f}" if signed else f"{m:.2f}"
    return f"{text} ± {se:.2f}" if len(values) > 1 else text


def natural_key(name: str) -> tuple:
    """Sort numeric domain names (rotation angles) by value, others alphabetically after them."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)
