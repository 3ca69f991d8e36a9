"""Hyper-parameters of the training algorithms: DomainBed's defaults and its random-search distributions.

Every hyper-parameter is an :class:`HParam`: its default, the distribution DomainBed's random search
draws it from, and one line of documentation. The keys every algorithm accepts (lr, weight_decay,
batch_size, seed) are here, by data kind (``dgprune.registry.DataKind``: DomainBed's small-image
datasets are ``"mnist"``, the others ``"image"``; only the optimiser settings differ between them);
each algorithm declares its own keys on its class (``Algorithm.own_hparams``). The by-name functions
(``default_hparams``, ``random_hparams``...) are in ``algorithms/registry.py``. Facts and ranges:
docs/algorithms.md.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dgprune.errors import ConfigError
from dgprune.registry import DATA_KINDS, DataKind

__all__ = [
    "OPTIMISER_KEYS",
    "DataKind",
    "HParam",
    "LogUniform",
    "common_hparams",
    "draw_hparams",
    "merge_hparams",
]


@dataclass(frozen=True)
class LogUniform:
    """``base ** u`` with ``u`` uniform in ``[low, high]``, truncated to an int when ``integer``: the form
    of all of DomainBed's draws for the algorithms here."""

    low: float
    high: float
    base: float = 10.0
    integer: bool = False

    def draw(self, rng: random.Random) -> float | int:
        value = self.base ** rng.uniform(self.low, self.high)
        return int(value) if self.integer else value

    @property
    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value a draw can take."""
        low, high = self.base**self.low, self.base**self.high
        return (math.floor(low), math.floor(high)) if self.integer else (low, high)

    def describe(self) -> str:
        text = f"{self.base:g}^U({self.low:g}, {self.high:g})"
        return f"int({text})" if self.integer else text


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter: its default, its random-search distribution (None: the search keeps the
    default, as DomainBed does for e.g. MNIST-type weight decay) and what it means."""

    default: Any
    search: LogUniform | None
    doc: str


# Keys every algorithm accepts, by data kind (DomainBed's registry: lr, weight_decay and batch_size
# depend on the dataset only). DomainBed narrows DomainNet's batch-size draw to int(2^U(3, 5)); the
# "image" kind here draws every image dataset from the wider range.
_SEED = HParam(0, None, "seed of the algorithm's own random draws (only Mixup draws any: pairing and lambda)")
_COMMON: dict[str, dict[str, HParam]] = {
    "mnist": {
        "lr": HParam(
            1e-3, LogUniform(-4.5, -2.5), "learning rate of the algorithm's Adam optimiser (pretraining)"
        ),
        "weight_decay": HParam(0.0, None, "Adam's L2 weight decay"),
        "batch_size": HParam(64, LogUniform(3, 9, base=2, integer=True), "mini-batch size per source domain"),
        "seed": _SEED,
    },
    "image": {
        "lr": HParam(
            5e-5, LogUniform(-5, -3.5), "learning rate of the algorithm's Adam optimiser (pretraining)"
        ),
        "weight_decay": HParam(0.0, LogUniform(-6, -2), "Adam's L2 weight decay"),
        "batch_size": HParam(
            32, LogUniform(3, 5.5, base=2, integer=True), "mini-batch size per source domain"
        ),
        "seed": _SEED,
    },
}

# The optimiser settings, which a run config holds as pretrain.lr / weight_decay / batch_size.
OPTIMISER_KEYS: tuple[str, ...] = ("lr", "weight_decay", "batch_size")


def common_hparams(data_kind: str) -> dict[str, HParam]:
    """The keys every algorithm accepts, for ``data_kind`` ("mnist" or "image"; a fresh dict)."""
    if data_kind not in _COMMON:
        raise ConfigError(f"unknown data kind {data_kind!r}; valid: {', '.join(DATA_KINDS)}")
    return dict(_COMMON[data_kind])


def merge_hparams(
    algorithm: str,
    own: Mapping[str, HParam],
    overrides: Mapping[str, Any] | None,
    data_kind: DataKind = "image",
) -> dict[str, Any]:
    """The defaults of ``algorithm`` (its ``own`` keys and the common ones for ``data_kind``) updated with
    ``overrides``; a key the algorithm does not know is a ConfigError (a typo must not silently train
    with the default)."""
    specs = {**common_hparams(data_kind), **own}
    hparams = {key: spec.default for key, spec in specs.items()}
    if overrides is None:
        return hparams
    unknown = sorted(set(overrides) - set(hparams))
    if unknown:
        raise ConfigError(
            f"unknown hyper-parameter {unknown[0]!r} for algorithm {algorithm!r}; "
            f"valid: {', '.join(sorted(hparams))}"
        )
    hparams.update(overrides)
    return hparams


def draw_hparams(
    specs: Mapping[str, HParam], seed: int, fixed: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One draw of DomainBed's random search over ``specs``: each key from its own generator, seeded by a
    hash of (``seed``, key), so a key's value does not depend on which other keys exist (as in
    DomainBed); keys without a distribution keep their default; ``fixed`` values win over the draws."""
    values: dict[str, Any] = {}
    for key, spec in specs.items():
        if spec.search is None:
            values[key] = spec.default
            continue
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        values[key] = spec.search.draw(random.Random(int.from_bytes(digest[:8], "big")))
    if fixed:
        unknown = sorted(set(fixed) - set(specs))
        if unknown:
            raise ConfigError(f"unknown hyper-parameter {unknown[0]!r}; valid: {', '.join(sorted(specs))}")
        values.update(fixed)
    return values
