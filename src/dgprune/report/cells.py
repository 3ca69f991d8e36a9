"""Formatting of table cells: mean over seeds, with the standard error when there are several."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, stdev


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)); se is 0 for one value."""
    if not values:
        return math.nan, math.nan
    se = stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean(values), se


@dataclass(frozen=True)
class Stat:
    """A cell's numbers (what a CSV holds as separate columns): the mean over ``n`` runs in percent
    (points for a difference) and its standard error (NaN for one run: the cell shows no ±)."""

    mean: float
    se: float
    n: int


def pct_stat(values: list[float]) -> Stat | None:
    """Accuracies (fractions) as a :class:`Stat` in percent; None when there are none."""
    if not values:
        return None
    m, se = mean_se([100 * v for v in values])
    return Stat(m, se if len(values) > 1 else math.nan, len(values))


def stat_text(stat: Stat | None, signed: bool = False) -> str:
    """The cell as shown: "93.33", or "93.33 ± 0.41" over several runs; "-" for no value."""
    if stat is None:
        return "-"
    text = f"{stat.mean:+.2f}" if signed else f"{stat.mean:.2f}"
    return f"{text} ± {stat.se:.2f}" if stat.n > 1 else text


def pct_cell(values: list[float], signed: bool = False) -> str:
    """Accuracies (fractions) as percent: "93.33", or "93.33 ± 0.41" over several seeds."""
    return stat_text(pct_stat(values), signed)


def natural_key(name: str) -> tuple:
    """Sort numeric domain names (rotation angles) by value, others alphabetically after them."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)
