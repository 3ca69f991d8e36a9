"""Multi-domain data: datasets, leave-one-domain-out splits, per-domain batches."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from dgprune.data.batches import DomainBatches, iterate_batches, probe_batch
from dgprune.data.digit_styles import load_colored_digits, load_styled_digits
from dgprune.data.digits import load_rotated_digits
from dgprune.data.domains import Domain, ImageStore, MultiDomainDataset
from dgprune.data.image_folder import NAMED_DATASETS, SkippedImagesWarning, load_image_folder, named_loader
from dgprune.data.mnist import load_colored_mnist, load_rotated_mnist, read_idx, write_idx
from dgprune.data.splits import LodoSplit, make_lodo_split, split_domain
from dgprune.errors import ConfigError, DataError
from dgprune.names import canonical_name, unknown_name_message

DatasetLoader = Callable[..., MultiDomainDataset]

FOLDER_PREFIX = "folder:"

# Loader options that change how data are found, cached or decoded, never the samples a run sees
# (streamed and cached batches are identical): leave them out of a run's id.
RESULT_NEUTRAL_OPTIONS = frozenset(
    {"root", "files", "download", "cache", "cache_dir", "workers", "stream", "memory_budget_gb"}
)

_DATASETS: dict[str, DatasetLoader] = {
    "rotated_digits": load_rotated_digits,
    "styled_digits": load_styled_digits,
    "colored_digits": load_colored_digits,
    "rotated_mnist": load_rotated_mnist,
    "colored_mnist": load_colored_mnist,
    **{key: named_loader(key) for key in NAMED_DATASETS},
}


def register_dataset(name: str, loader: DatasetLoader) -> None:
    """Make `load_dataset(name, **options)` call `loader(**options)`."""
    _DATASETS[name] = loader


def dataset_names() -> list[str]:
    return [*sorted(_DATASETS), f"{FOLDER_PREFIX}/path"]


def dataset_name(name: str) -> str:
    """The canonical name of dataset ``name`` in any case or DomainBed's spelling (``RotatedMNIST``,
    ``OfficeHome``, ``PACS``); a ``folder:`` name is returned as it is. DataError listing the valid
    names otherwise."""
    if name.startswith(FOLDER_PREFIX):
        return name
    found = canonical_name(name, _DATASETS)
    if found is None:
        raise DataError(unknown_name_message(name, dataset_names(), "dataset"))
    return found


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
        loader = _DATASETS[name]
    try:
        inspect.signature(loader).bind(**options)
    except TypeError as e:  # report a bad option as a config problem, not a traceback
        accepted = ", ".join(inspect.signature(loader).parameters)
        raise ConfigError(f"dataset {name!r}: {e}; accepted options: {accepted}") from None
    return loader(**options)


__all__ = [
    "RESULT_NEUTRAL_OPTIONS",
    "DatasetLoader",
    "Domain",
    "DomainBatches",
    "ImageStore",
    "LodoSplit",
    "MultiDomainDataset",
    "SkippedImagesWarning",
    "dataset_name",
    "dataset_names",
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
