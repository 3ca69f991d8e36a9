"""Multi-domain data: datasets, leave-one-domain-out splits, per-domain batches."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from dgprune.data.batches import DomainBatches, iterate_batches
from dgprune.data.digits import load_rotated_digits
from dgprune.data.domains import Domain, MultiDomainDataset
from dgprune.data.splits import LodoSplit, make_lodo_split, split_domain
from dgprune.errors import ConfigError, DataError

DatasetLoader = Callable[..., MultiDomainDataset]

_DATASETS: dict[str, DatasetLoader] = {"rotated_digits": load_rotated_digits}


def register_dataset(name: str, loader: DatasetLoader) -> None:
    """Make `load_dataset(name, **options)` call `loader(**options)`."""
    _DATASETS[name] = loader


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def load_dataset(name: str, **options: object) -> MultiDomainDataset:
    """Load a registered dataset by name; options are the loader's keyword arguments."""
    loader = _DATASETS.get(name)
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(dataset_names())}")
    try:
        inspect.signature(loader).bind(**options)
    except TypeError as e:  # report a bad option as a config problem, not a traceback
        accepted = ", ".join(inspect.signature(loader).parameters)
        raise ConfigError(f"dataset {name!r}: {e}; accepted options: {accepted}") from None
    return loader(**options)


__all__ = [
    "DatasetLoader",
    "Domain",
    "DomainBatches",
    "LodoSplit",
    "MultiDomainDataset",
    "dataset_names",
    "iterate_batches",
    "load_dataset",
    "load_rotated_digits",
    "make_lodo_split",
    "register_dataset",
    "split_domain",
]
