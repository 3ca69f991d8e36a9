"""Image-folder datasets in DomainBed's layout: root/<Dataset>/<domain>/<class>/<image>.

PACS, VLCS, OfficeHome, TerraIncognita and DomainNet by name, and any folder of that shape
(`folder:/path`). As DomainBed (torchvision's ImageFolder per domain): domains and classes are the
sorted sub-folder names, images are found recursively below a class folder by extension, and every
image is converted to RGB. Unlike DomainBed, the class list must be the same in every domain (its
ImageFolders number classes per domain, so a missing class silently shifts labels) and a corrupt or
truncated image is an error (DomainBed sets PIL's LOAD_TRUNCATED_IMAGES), unless
`skip_bad_images=True`, which leaves such files out with a warning and records them.

Loading: when the dataset fits `memory_budget_gb` at the working resolution, each domain is decoded
once (worker processes) into uint8 [n, 3, S, S] — exactly DomainBed's Resize((S, S)) of each file —
and cached on disk, keyed by the domain's file listing (path, size, mtime) and the settings. Larger
datasets stream: files are decoded on demand by worker processes, prefetched ahead of the batches.
Either way the training augmentation and evaluation transform run batched on tensors
(`dgprune.data.transforms`).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from dgprune.data.cache import CacheEntry
from dgprune.data.domains import Domain, MultiDomainDataset
from dgprune.data.streaming import IMAGE_EXTENSIONS, FileImages, decode_many, default_workers, to_chw
from dgprune.data.transforms import DomainBedAugment, EvalTransform
from dgprune.errors import ConfigError, DataError

DATA_ENV = "DGPRUNE_DATA_DIR"


class SkippedImagesWarning(UserWarning):
    """Images that could not be decoded were left out (skip_bad_images=True)."""


@dataclass(frozen=True)
class ImageFolderOptions:
    """How an image-folder dataset is loaded: the options every image-folder loader takes besides
    where the folder is (`data.options` of a run config). Each option's effect: the module docstring."""

    image_size: int = 224
    augment: bool = True
    skip_bad_images: bool = False
    cache: bool = True
    cache_dir: str | None = None
    workers: int | None = None
    stream: bool | None = None
    memory_budget_gb: float = 8.0
    transform_device: str | None = "auto"

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"image_size must be >= 8, got {self.image_size}")
        if self.memory_budget_gb < 0:
            raise ConfigError(f"memory_budget_gb must be >= 0, got {self.memory_budget_gb}")


@dataclass(frozen=True)
class NamedDataset:
    folders: tuple[str, ...]  # accepted names of the dataset folder under root (DomainBed's first)
    domains: tuple[tuple[str, ...], ...]  # each domain: accepted folder names (DomainBed's first)
    source: str  # where to get it


NAMED_DATASETS: dict[str, NamedDataset] = {
    "pacs": NamedDataset(
        ("PACS", "kfold"),  # kfold: the folder name inside the original PACS archive
        (("art_painting",), ("cartoon",), ("photo",), ("sketch",)),
        "https://domaingeneralization.github.io (DomainBed: python -m domainbed.scripts.download)",
    ),
    "vlcs": NamedDataset(
        ("VLCS",),
        (("Caltech101",), ("LabelMe",), ("SUN09",), ("VOC2007",)),
        "DomainBed's download script (VLCS.tar.gz)",
    ),
    "office_home": NamedDataset(
        ("office_home", "OfficeHome", "OfficeHomeDataset_10072016"),
        (("Art",), ("Clipart",), ("Product",), ("Real World", "Real_World")),
        "https://www.hemanthdv.org/officeHomeDataset.html (DomainBed's download script)",
    ),
    "terra_incognita": NamedDataset(
        ("terra_incognita", "TerraIncognita"),
        (("location_100",), ("location_38",), ("location_43",), ("location_46",)),
        "DomainBed's download script (Caltech Camera Traps, 4 locations, 10 classes)",
    ),
    "domain_net": NamedDataset(
        ("domain_net", "DomainNet"),
        (("clipart",), ("infograph",), ("painting",), ("quickdraw",), ("real",), ("sketch",)),
        "http://ai.bu.edu/M3SDA/ (DomainBed's download script removes its duplicate files)",
    ),
}


# ---------------------------------------------------------------- layout


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name)), key=lambda p: p.name
    )


def _images_below(folder: Path) -> list[Path]:
    """Image files anywhere below `folder`, sorted by path (as ImageFolder's sorted os.walk)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found.extend(
            Path(dirpath) / f
            for f in sorted(filenames)
            if not _is_hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return found


@dataclass
class DomainFiles:
    """One domain's files and labels, in ImageFolder's order (class by class, sorted paths)."""

    name: str
    path: Path
    files: list[Path]
    labels: list[int]

    def listing(self) -> list[tuple[str, int, int]]:
        """(relative path, size, mtime) of every file: what the cache key depends on."""
        out = []
        for f in self.files:
            st = f.stat()
            out.append((f.relative_to(self.path).as_posix(), st.st_size, st.st_mtime_ns))
        return out


def scan_domains(domain_dirs: list[tuple[str, Path]]) -> tuple[list[str], list[DomainFiles]]:
    """Classes (shared by all domains) and each domain's files; DataError on any layout problem."""
    per_domain: list[tuple[str, Path, dict[str, list[Path]]]] = []
    problems: list[str] = []
    for name, path in domain_dirs:
        classes = {c.name: _images_below(c) for c in _subdirs(path)}
        if not classes:
            loose = [f for f in path.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS)]
            if loose:
                problems.append(
                    f"{path}: images directly in the domain folder; expected <domain>/<class>/<image>"
                )
            else:
                problems.append(f"{path}: domain {name!r} has no images (no class folders)")
        elif not any(classes.values()):
            problems.append(f"{path}: domain {name!r} has no images (class folders are empty)")
        per_domain.append((name, path, classes))
    if problems:
        raise DataError("; ".join(problems))
    all_classes = sorted({c for _, _, classes in per_domain for c, files in classes.items() if files})
    for name, path, classes in per_domain:
        for c in all_classes:
            if c not in classes:
                problems.append(f"class {c!r} missing in domain {name!r} (no folder {path / c})")
            elif not classes[c]:
                problems.append(f"class {c!r} missing in domain {name!r} (folder {path / c} has no images)")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)" if len(problems) > 10 else "")
        raise DataError(f"the class list must be the same in every domain: {shown}")
    domains = []
    for name, path, classes in per_domain:
        files, labels = [], []
        for label, c in enumerate(all_classes):
            files.extend(classes[c])
            labels.extend([label] * len(classes[c]))
        domains.append(DomainFiles(name, path, files, labels))
    return all_classes, domains


def resolve_named_root(key: str, root: str | Path | None) -> tuple[Path, list[tuple[str, Path]]]:
    """The dataset folder under `root` (or `root` itself) and its expected domain folders."""
    spec = NAMED_DATASETS[key]
    if root is None:
        root = os.environ.get(DATA_ENV)
        if not root:
            raise ConfigError(
                f"dataset {key!r} needs `root` (the folder holding {spec.folders[0]}/), "
                f"e.g. data.options.root in the config, or ${DATA_ENV}"
            )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data root not found: {root} (expected {root}/{spec.folders[0]}/<domain>/<class>/<image>; "
            f"get {spec.folders[0]} from {spec.source})"
        )
    candidates = [root / f for f in spec.folders] + [root]
    for folder in candidates:
        if any((folder / alt).is_dir() for alt in spec.domains[0]):
            break
    else:
        raise DataError(
            f"{key}: no dataset folder found; looked for {', '.join(str(c) for c in candidates[:-1])} "
            f"(or domain folders directly in {root}); get it from {spec.source}"
        )
    domains = []
    for alternatives in spec.domains:
        path = next((folder / a for a in alternatives if (folder / a).is_dir()), None)
        if path is None:
            raise DataError(f"{key}: domain folder not found: {folder / alternatives[0]}")
        domains.append((alternatives[0], path))
    return folder, domains


def folder_domains(path: str | Path) -> tuple[Path, list[tuple[str, Path]]]:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder} (expected {folder}/<domain>/<class>/<image>)")
    domains = [(d.name, d) for d in _subdirs(folder)]
    if not domains:
        raise DataError(f"{folder}: no domain folders (expected {folder}/<domain>/<class>/<image>)")
    return folder, domains


# ---------------------------------------------------------------- decoding, caching, checking


def _bad_images_error(bad: list[tuple[str, str]]) -> DataError:
    shown = "; ".join(f"{p}: {why}" for p, why in bad[:10])
    more = f"; ... ({len(bad)} in all)" if len(bad) > 10 else ""
    return DataError(
        f"{len(bad)} image(s) cannot be decoded: {shown}{more}. Fix or remove them, or pass "
        "skip_bad_images=True (--skip-bad-images) to leave them out"
    )


def _decode_domain(
    dom: DomainFiles, size: int, workers: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """uint8 [n_good, 3, size, size], labels, and the (path, reason) of files that failed."""
    paths = [str(f) for f in dom.files]
    images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    good: list[int] = []
    bad: list[tuple[str, str]] = []
    for k, (array, error) in enumerate(decode_many(paths, size, workers)):
        if array is None:
            bad.append((paths[k], error or "unknown error"))
        else:
            images[k] = to_chw(array)
            good.append(k)
    labels = torch.tensor(dom.labels, dtype=torch.int64)
    if bad:  # keep what decoded: it is cached, so fixing or skipping the bad files costs no re-decode
        keep = torch.tensor(good, dtype=torch.int64)
        images, labels = images[keep], labels[keep]
    return images, labels, bad


def _check_domain(dom: DomainFiles, workers: int) -> list[tuple[str, str]]:
    paths = [str(f) for f in dom.files]
    return [(paths[k], err or "") for k, (_, err) in enumerate(decode_many(paths, None, workers)) if err]


def _settings(label: str, dom: DomainFiles, classes: list[str], size: int, kind: str) -> dict:
    from PIL import __version__ as pil_version  # a new decoder may give other pixels

    return {
        "kind": kind,
        "dataset": label,
        "domain_dir": str(dom.path.resolve()),
        "classes": classes,
        "size": size,
        "resize": "PIL bilinear, RGB",
        "pil": pil_version,
    }


@dataclass
class _Loaded:
    domain: Domain
    bad: list[tuple[str, str]]
    cache: str


def _in_memory_domain(
    label: str,
    dom: DomainFiles,
    classes: list[str],
    size: int,
    workers: int,
    cache: bool,
    cache_dir: str | Path | None,
    transforms: tuple,
) -> _Loaded:
    entry = (
        CacheEntry(
            cache_dir, f"{label}-{dom.name}", _settings(label, dom, classes, size, "decoded"), dom.listing()
        )
        if cache
        else None
    )
    hit = entry.load() if entry else None
    if hit is not None:
        bad = list(zip(hit["skipped"], hit["reasons"], strict=True))
        images, labels, status = hit["images"], hit["labels"], "hit"
    else:
        images, labels, bad = _decode_domain(dom, size, workers)
        status = "off"
        if entry:
            entry.save(
                {
                    "images": images,
                    "labels": labels,
                    "skipped": [p for p, _ in bad],
                    "reasons": [r for _, r in bad],
                }
            )
            status = "written"
    return _Loaded(Domain(dom.name, images, labels, *transforms), bad, status)


def _streaming_domain(
    label: str,
    dom: DomainFiles,
    classes: list[str],
    size: int,
    workers: int,
    cache: bool,
    cache_dir: str | Path | None,
    transforms: tuple,
) -> _Loaded:
    # Every file is decoded once up front (and the verdict cached) so that a bad image stops the run
    # now, with all bad files listed, rather than hours into training.
    entry = (
        CacheEntry(
            cache_dir,
            f"{label}-{dom.name}-check",
            _settings(label, dom, classes, 0, "checked"),
            dom.listing(),
        )
        if cache
        else None
    )
    hit = entry.load() if entry else None
    if hit is not None:
        bad, status = list(zip(hit["skipped"], hit["reasons"], strict=True)), "hit"
    else:
        bad = _check_domain(dom, workers)
        status = "off"
        if entry:
            entry.save({"skipped": [p for p, _ in bad], "reasons": [r for _, r in bad]})
            status = "written"
    skipped = {p for p, _ in bad}
    keep = [k for k, f in enumerate(dom.files) if str(f) not in skipped]
    store = FileImages([str(dom.files[k]) for k in keep], size, workers)
    labels = torch.tensor([dom.labels[k] for k in keep], dtype=torch.int64)
    return _Loaded(Domain(dom.name, store, labels, *transforms), bad, status)


def build_image_dataset(
    name: str, domain_dirs: list[tuple[str, Path]], options: ImageFolderOptions | None = None
) -> MultiDomainDataset:
    """The dataset of these domain folders, loaded as ``options`` say (default: their defaults)."""
    opts = ImageFolderOptions() if options is None else options
    image_size, transform_device = opts.image_size, opts.transform_device  # used often below
    workers = default_workers() if opts.workers is None else opts.workers
    classes, domains = scan_domains(domain_dirs)
    total = sum(len(d.files) for d in domains)
    nbytes = total * 3 * image_size * image_size
    streaming = nbytes > opts.memory_budget_gb * 2**30 if opts.stream is None else opts.stream
    evaluation = EvalTransform(image_size, device=transform_device)
    training = DomainBedAugment(image_size, device=transform_device) if opts.augment else evaluation
    build = _streaming_domain if streaming else _in_memory_domain
    loaded = [
        build(name, d, classes, image_size, workers, opts.cache, opts.cache_dir, (training, evaluation))
        for d in domains
    ]
    bad = [b for item in loaded for b in item.bad]
    if bad and not opts.skip_bad_images:
        raise _bad_images_error(bad)
    skipped = [p for p, _ in bad]
    if skipped:
        listed = "\n".join(f"  {p}: {why}" for p, why in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        warnings.warn(
            f"{name}: skipped {len(skipped)} image(s) that cannot be decoded:\n{listed}{more}",
            SkippedImagesWarning,
            stacklevel=3,
        )
    info = {
        "streaming": streaming,
        "image_size": image_size,
        "images": total - len(skipped),
        "decoded_bytes": nbytes,
        "cache": {item.domain.name: item.cache for item in loaded},
        "augment": repr(training),
    }
    return MultiDomainDataset(
        name,
        [item.domain for item in loaded],
        classes,
        data_kind="image",
        skipped_files=skipped,
        info=info,
    )


def _with_option_parameters(loader: Callable[..., MultiDomainDataset]) -> Callable[..., MultiDomainDataset]:
    """Spell the options out in ``loader``'s signature instead of ``**options``: `load_dataset` checks a
    config's data.options against it and lists the accepted ones when one is unknown."""
    signature = inspect.signature(loader)
    named = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    named += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in fields(ImageFolderOptions)
    ]
    loader.__signature__ = signature.replace(parameters=named)  # type: ignore[attr-defined]
    return loader


@_with_option_parameters
def load_image_folder(
    path: str, name: str | None = None, seed: int = 0, **options: Any
) -> MultiDomainDataset:
    """Any folder of shape path/<domain>/<class>/<image> (`folder:/path`); every sub-folder is a domain.

    ``options``: the fields of :class:`ImageFolderOptions`. `seed` (the data seed) is accepted for a
    uniform interface; nothing here is random.
    """
    folder, domain_dirs = folder_domains(path)
    return build_image_dataset(name or folder.name, domain_dirs, ImageFolderOptions(**options))


def named_loader(key: str) -> Callable[..., MultiDomainDataset]:
    """The loader of a DomainBed dataset by registry name (pacs, vlcs, office_home, ...)."""

    def load(root: str | None = None, seed: int = 0, **options: Any) -> MultiDomainDataset:
        _, domain_dirs = resolve_named_root(key, root)
        return build_image_dataset(key, domain_dirs, ImageFolderOptions(**options))

    load.__name__ = f"load_{key}"
    load.__doc__ = (
        f"DomainBed's {NAMED_DATASETS[key].folders[0]} from root/{NAMED_DATASETS[key].folders[0]}/<domain>/"
        "<class>/<image> (root may also be that folder itself). Options as `load_image_folder`."
    )
    return _with_option_parameters(load)
