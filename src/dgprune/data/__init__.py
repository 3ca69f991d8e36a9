"""Multi-domain data: datasets, leave-one-domain-out splits, per-domain batches."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from dgprune.data.batches import DomainBatches, image_sample, iterate_batches, probe_batch
from dgprune.data.digit_styles import load_colored_digits, load_styled_digits
from dgprune.data.digits import load_rotated_digits
from dgprune.data.domains import Domain, ImageStore, MultiDomainDataset
from dgprune.data.image_folder import NAMED_DATASETS, SkippedImagesWarning, load_image_folder, named_loader
from dgprune.data.mnist import load_colored_mnist, load_rotated_mnist, read_idx, write_idx
from dgprune.data.splits import LodoSplit, make_lodo_split, split_domain
from dgprune.errors import ConfigError, DataError
from dgprune.registry import DATA_KINDS, DataKind, Registry

DatasetLoader = Callable[..., MultiDomainDataset]

FOLDER_PREFIX = "folder:"

# Loader options that change how data are found, cached or decoded, never the samples a run sees
# (streamed and cached batches are identical): leave them out of a run's id.
RESULT_NEUTRAL_OPTIONS = frozenset(
    {"root", "files", "download", "cache", "cache_dir", "workers", "stream", "memory_budget_gb"}
)


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its loader and its kind, known before loading it (the kind chooses the
    algorithms' default optimiser settings when a run config is built, docs/algorithms.md)."""

    loader: DatasetLoader
    data_kind: DataKind


# Listed sorted in errors; folder:/path datasets are handled by load_dataset, outside the registry.
DATASETS: Registry[DatasetEntry] = Registry(
    "dataset", error=DataError, sort_names=True, extra_names=(f"{FOLDER_PREFIX}/path",)
)
DATASETS.register("rotated_digits", DatasetEntry(load_rotated_digits, "mnist"))
DATASETS.register("styled_digits", DatasetEntry(load_styled_digits, "mnist"))
DATASETS.register("colored_digits", DatasetEntry(load_colored_digits, "mnist"))
DATASETS.register("rotated_mnist", DatasetEntry(load_rotated_mnist, "mnist"))
DATASETS.register("colored_mnist", DatasetEntry(load_colored_mnist, "mnist"))
for _key in NAMED_DATASETS:  # pacs, vlcs, office_home, terra_incognita, domain_net
    DATASETS.register(_key, DatasetEntry(named_loader(_key), "image"))


def register_dataset(name: str, loader: DatasetLoader, data_kind: DataKind = "mnist") -> None:
    """Make ``load_dataset(name, **options)`` call ``loader(**options)``; ``data_kind`` must be the
    ``data_kind`` of the datasets it returns ("mnist": small images, DomainBed's MNIST-type defaults;
    "image": photographs). A name already registered is replaced."""
    if data_kind not in DATA_KINDS:
        raise ConfigError(f"unknown data kind {data_kind!r}; valid: {', '.join(DATA_KINDS)}")
    DATASETS.register(name, DatasetEntry(loader, data_kind), replace=True)


def dataset_names() -> list[str]:
    return list(DATASETS.listing())


def dataset_name(name: str) -> str:
    """The canonical name of dataset ``name`` in any case or DomainBed's spelling (``RotatedMNIST``,
    ``OfficeHome``, ``PACS``); a ``folder:`` name is returned as it is. DataError listing the valid
    names otherwise."""
    if name.startswith(FOLDER_PREFIX):
        return name
    return DATASETS.resolve(name)


def dataset_kind(name: str) -> DataKind:
    """The kind of dataset ``name`` (any spelling) without loading it: ``"image"`` for a ``folder:``
    dataset, else the registered one."""
    if name.startswith(FOLDER_PREFIX):
        return "image"
    return DATASETS.lookup(name).data_kind


def load_dataset(name: str, **options: object) -> MultiDomainDataset:
    """Load a registered dataset by name; options are the loader's keyword arguments.

    `folder:/path` loads any folder of shape /path/<domain>/<class>/<image> (`load_image_folder`).
    """
    if name.startswith(FOLDER_PREFIX):
        loader: DatasetLoader = load_image_folder
        options = {"path": name[len(FOLDER_PREFIX) :], **options}
        if not options["path"]:
            raise ConfigError(
                f"dataset {name!r}: give the folder after {FOLDER_PREFIX!r}, e.g. folder:/data/PACS"
            )
    else:
        name = dataset_name(name)  # also DomainBed's spelling: PACS, RotatedMNIST
        loader = DATASETS[name].loader
    try:
        inspect.signature(loader).bind(**options)
    except TypeError as e:  # report a bad option as a config problem, not a traceback
        accepted = ", ".join(inspect.signature(loader).parameters)
        raise ConfigError(f"dataset {name!r}: {e}; accepted options: {accepted}") from None
    dataset = loader(**options)
    expected = dataset_kind(name)
    if dataset.data_kind != expected:  # the config's optimiser defaults were chosen for `expected`
        raise DataError(
            f"dataset {name!r} is registered with data_kind {expected!r} but its loader returned "
            f"data_kind {dataset.data_kind!r}; register it with data_kind={dataset.data_kind!r}"
        )
    return dataset


__all__ = [
    "DATASETS",
    "RESULT_NEUTRAL_OPTIONS",
    "DatasetEntry",
    "DatasetLoader",
    "Domain",
    "DomainBatches",
    "ImageStore",
    "LodoSplit",
    "MultiDomainDataset",
    "SkippedImagesWarning",
    "dataset_kind",
    "dataset_name",
    "dataset_names",
    "image_sample",
    "iterate_batches",
    "load_colored_digits",
    "load_colored_mnist",
    "load_dataset",
    "load_image_folder",
    "load_rotated_digits",
    "load_rotated_mnist",
    "load_styled_digits",
    "make_lodo_split",
    "probe_batch",
    "read_idx",
    "register_dataset",
    "split_domain",
    "write_idx",
]
