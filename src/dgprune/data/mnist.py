"""RotatedMNIST and ColoredMNIST built exactly as DomainBed builds them, from standard IDX files.

DomainBed (facebookresearch/DomainBed, `domainbed/datasets.py`, `MultipleEnvironmentMNIST`):

- the 60,000 training and 10,000 test images are concatenated (70,000), shuffled with
  `torch.randperm`, and dealt into one disjoint subset per environment: subset i = images[i::n_envs];
- **RotatedMNIST**: environments '0', '15', '30', '45', '60', '75' (degrees); each image is rotated
  as an 8-bit PIL image, bilinear, zero fill, then scaled to [0, 1]; 1 x 28 x 28, 10 classes;
- **ColoredMNIST**: environments '+90%', '+80%', '-90%' with colour-flip probabilities 0.1, 0.2,
  0.9; label = 1 if digit < 5 else 0, flipped with probability 0.25; colour = label, flipped with the
  environment's probability; the image is put in two channels and the channel (1 - colour) zeroed;
  2 x 28 x 28 (DomainBed no longer subsamples to 14 x 14 as the IRM paper did: `subsample=True`
  restores that), 2 classes, values in [0, 1].

Every random draw (the shuffle, then per environment the label noise and the colour noise) comes from
a generator seeded with the *data seed*, in DomainBed's order, so data seed s gives the environments
DomainBed builds after `torch.manual_seed(s)`. Unlike DomainBed, which seeds them with the training
seed, the data seed stays fixed across training seeds and criteria: every run sees the same domains.

Images are kept as uint8 (the exact values DomainBed divides by 255) and scaled per batch.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from dgprune.data.cache import CacheEntry, file_digest
from dgprune.data.digits import angle_name
from dgprune.data.domains import Domain, MultiDomainDataset
from dgprune.data.transforms import ScaleToUnit
from dgprune.errors import ConfigError, DataError

ROTATED_ANGLES: tuple[float, ...] = (0, 15, 30, 45, 60, 75)
COLOR_ENVIRONMENTS: tuple[tuple[str, float], ...] = (("+90%", 0.1), ("+80%", 0.2), ("-90%", 0.9))
LABEL_NOISE = 0.25

# IDX element types: code -> numpy dtype (big-endian, as the format stores them).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# The four files of an MNIST-format dataset, under their standard names (plain or .gz).
FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
STANDARD_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# variant -> (torchvision dataset class, i.e. the folder of a torchvision root; class names)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "mnist": ("MNIST", [str(d) for d in range(10)]),
    "fashion_mnist": (
        "FashionMNIST",
        [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ],
    ),
    "kmnist": ("KMNIST", ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]),
}


# ---------------------------------------------------------------- IDX files


def read_idx(path: str | Path) -> torch.Tensor:
    """An IDX file (plain, or gzip when the name ends in .gz) as a tensor; errors name the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            raise DataError(f"{path}: truncated gzip file (the compressed stream ends early)") from None
        except (OSError, zlib.error) as e:
            raise DataError(f"{path}: not a valid gzip file: {e}") from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file: {len(raw)} bytes, shorter than the 4-byte header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(
            f"{path}: not an IDX file (magic number {raw[:4].hex()}; expected 0000 then a type code "
            "such as 08 and the number of dimensions)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX file: the header of {ndim} dimensions needs {header} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual < expected:
        raise DataError(
            f"{path}: truncated IDX file: header declares shape {tuple(dims)} ({expected} bytes of data) "
            f"but the file holds {actual}"
        )
    if actual > expected:
        raise DataError(
            f"{path}: corrupt IDX file: {actual - expected} bytes after the declared shape {tuple(dims)}"
        )
    array = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True).reshape(dims))


def write_idx(path: str | Path, data: np.ndarray | torch.Tensor) -> None:
    """Write an array as an IDX file (gzip when the name ends in .gz); for tests and converted data."""
    array = np.asarray(data)
    code = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}.get(
        array.dtype.newbyteorder("=")
    )
    if code is None:
        raise ConfigError(f"no IDX type for dtype {array.dtype}")
    big = array.astype(np.dtype(_IDX_TYPES[code]), copy=False)
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _find_in(folder: Path) -> dict[str, Path] | None:
    """The four standard files in `folder` (plain preferred over .gz), or None if any is missing."""
    found = {}
    for key, name in STANDARD_NAMES.items():
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def candidate_folders(root: Path, variant: str) -> list[Path]:
    """Where the files may be: the folder itself, torchvision's root/<Class>/raw, or root/<Class>."""
    cls = VARIANTS[variant][0]
    return [root, root / cls / "raw", root / cls]


def locate_files(
    root: str | Path | None, variant: str, files: dict[str, str] | None, download: bool
) -> dict[str, Path]:
    """The four IDX files to read; downloads them with torchvision only when `download` is set."""
    if files is not None:
        unknown = set(files) - set(FILE_KEYS)
        missing = [k for k in FILE_KEYS if k not in files]
        if unknown or missing:
            raise ConfigError(
                f"files must name exactly {', '.join(FILE_KEYS)}; "
                f"missing {missing or 'none'}, unknown {sorted(unknown) or 'none'}"
            )
        paths = {k: Path(v).expanduser() for k, v in files.items()}
        for key, path in paths.items():
            if not path.is_file():
                raise DataError(f"{key} file not found: {path}")
        return paths
    if root is None:
        raise ConfigError("MNIST-type datasets need `root` (the folder with the IDX files) or `files`")
    root = Path(root).expanduser()
    for folder in candidate_folders(root, variant):
        found = _find_in(folder)
        if found:
            return found
    if download:
        _download(root, variant)
        for folder in candidate_folders(root, variant):
            found = _find_in(folder)
            if found:
                return found
    searched = ", ".join(str(f) for f in candidate_folders(root, variant))
    names = ", ".join(f"{n}[.gz]" for n in STANDARD_NAMES.values())
    hint = " Pass download=True (--download) to fetch them with torchvision." if not download else ""
    if not root.exists():
        raise DataError(
            f"data root not found: {root}. Expected the IDX files {names} in one of {searched}.{hint}"
        )
    raise DataError(f"IDX files not found: looked for {names} in {searched}.{hint}")


def _download(root: Path, variant: str) -> None:
    """torchvision's downloader (mirrors, checksums) into root/<Class>/raw; only when asked."""
    from torchvision import datasets

    cls = getattr(datasets, VARIANTS[variant][0])
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # offline, mirror down, disk full: one clear line
        raise DataError(f"download of {VARIANTS[variant][0]} into {root} failed: {e}") from None


def read_mnist(paths: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Train then test images (uint8 [70000, 28, 28]) and labels, concatenated as DomainBed does."""
    images, labels = [], []
    for part in ("train", "test"):
        x, y = read_idx(paths[f"{part}_images"]), read_idx(paths[f"{part}_labels"])
        if x.dim() != 3 or x.dtype != torch.uint8:
            raise DataError(
                f"{paths[part + '_images']}: expected uint8 images [n, H, W], got {x.dtype} {tuple(x.shape)}"
            )
        if y.dim() != 1 or len(y) != len(x):
            raise DataError(
                f"{paths[part + '_labels']}: expected {len(x)} labels for {paths[part + '_images']}, "
                f"got shape {tuple(y.shape)}"
            )
        images.append(x)
        labels.append(y.to(torch.int64))
    if images[0].shape[1:] != images[1].shape[1:]:
        raise DataError(
            f"train and test images differ in size: {images[0].shape[1:]} vs {images[1].shape[1:]}"
        )
    return torch.cat(images), torch.cat(labels)


# ---------------------------------------------------------------- DomainBed's environments


def shuffle_and_deal(
    images: torch.Tensor, labels: torch.Tensor, num_envs: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """DomainBed: one randperm over all images, then environment i takes every num_envs-th from i."""
    perm = torch.randperm(len(images), generator=generator)
    images, labels = images[perm], labels[perm]
    return [(images[i::num_envs], labels[i::num_envs]) for i in range(num_envs)]


def rotate_images(images: torch.Tensor, angle: float) -> torch.Tensor:
    """uint8 [n, H, W] -> uint8 [n, 1, H, W]: each rotated as an 8-bit PIL image (bilinear, fill 0),
    the calls DomainBed's `rotate_dataset` makes (ToPILImage, then torchvision's rotate)."""
    from PIL import Image

    out = np.empty((len(images), 1, *images.shape[1:]), dtype=np.uint8)
    array = images.numpy()
    for i in range(len(array)):
        pil = Image.fromarray(array[i], mode="L")
        rotated = TF.rotate(pil, float(angle), interpolation=InterpolationMode.BILINEAR, fill=(0,))
        out[i, 0] = np.asarray(rotated)
    return torch.from_numpy(out)


def color_images(
    images: torch.Tensor, digits: torch.Tensor, flip_color: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """DomainBed's `color_dataset`: binary noisy label, colour from it, one of two channels zeroed."""
    n = len(images)
    labels = (digits < 5).to(torch.int64)
    labels = labels ^ (torch.rand(n, generator=generator) < LABEL_NOISE).to(torch.int64)
    colors = labels ^ (torch.rand(n, generator=generator) < flip_color).to(torch.int64)
    x = torch.stack([images, images], dim=1)
    x[torch.arange(n), 1 - colors] = 0  # keep channel `colors`, zero the other
    return x, labels


def _digest_files(paths: dict[str, Path]) -> dict[str, str]:
    return {k: file_digest(p) for k, p in sorted(paths.items())}


def _cached_build(
    label: str, settings: dict, paths: dict[str, Path], cache: bool, cache_dir: str | Path | None, build
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """build() -> [(images, labels)] per domain, through the disk cache when `cache` is on."""
    if not cache:
        return build(), {"cache": "off"}
    entry = CacheEntry(cache_dir, label, settings, _digest_files(paths))
    hit = entry.load()
    if hit is not None:
        return list(zip(hit["images"], hit["labels"], strict=True)), {
            "cache": "hit",
            "cache_file": str(entry.path),
        }
    parts = build()
    entry.save({"images": [x for x, _ in parts], "labels": [y for _, y in parts]})
    return parts, {"cache": "written", "cache_file": str(entry.path)}


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown MNIST variant {variant!r}; valid: {', '.join(VARIANTS)}")


def load_rotated_mnist(
    root: str | None = None,
    seed: int = 0,
    download: bool = False,
    variant: str = "mnist",
    files: dict[str, str] | None = None,
    angles: Sequence[float] = ROTATED_ANGLES,
    cache: bool = True,
    cache_dir: str | None = None,
    transform_device: str | None = None,
) -> MultiDomainDataset:
    """DomainBed's RotatedMNIST (or the same transform of Fashion-MNIST / KMNIST: `variant`).

    `root`: a folder with the four IDX files, or a torchvision root (root/MNIST/raw/...). `files`:
    explicit paths instead (keys train_images, train_labels, test_images, test_labels). `seed` is the
    data seed. `download` fetches missing files with torchvision (off by default).
    """
    _check_variant(variant)
    angles = [float(a) for a in angles]
    names = [angle_name(a) for a in angles]
    if not angles or len(set(names)) != len(names):
        raise ConfigError(f"rotated_mnist needs distinct angles, got {angles}")
    paths = locate_files(root, variant, files, download)
    name = f"rotated_{variant}"  # rotated_mnist, rotated_fashion_mnist, ...

    def build() -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = read_mnist(paths)
        parts = shuffle_and_deal(images, labels, len(angles), torch.Generator().manual_seed(seed))
        return [(rotate_images(x, a), y) for (x, y), a in zip(parts, angles, strict=True)]

    settings = {
        "kind": "rotated",
        "seed": seed,
        "angles": angles,
        "files": sorted(str(p) for p in paths.values()),
    }
    parts, info = _cached_build(name, settings, paths, cache, cache_dir, build)
    scale = ScaleToUnit(transform_device)
    domains = [Domain(n, x, y, scale, scale) for n, (x, y) in zip(names, parts, strict=True)]
    return MultiDomainDataset(name, domains, list(VARIANTS[variant][1]), data_kind="mnist", info=info)


def load_colored_mnist(
    root: str | None = None,
    seed: int = 0,
    download: bool = False,
    variant: str = "mnist",
    files: dict[str, str] | None = None,
    subsample: bool = False,
    cache: bool = True,
    cache_dir: str | None = None,
    transform_device: str | None = None,
) -> MultiDomainDataset:
    """DomainBed's ColoredMNIST (environments +90%, +80%, -90%); `subsample=True` halves the images to
    14 x 14 as the IRM paper (and early DomainBed) did. Options as `load_rotated_mnist`."""
    _check_variant(variant)
    paths = locate_files(root, variant, files, download)
    name = f"colored_{variant}"

    def build() -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, digits = read_mnist(paths)
        generator = torch.Generator().manual_seed(seed)
        parts = shuffle_and_deal(images, digits, len(COLOR_ENVIRONMENTS), generator)
        out = []
        for (x, d), (_, flip) in zip(parts, COLOR_ENVIRONMENTS, strict=True):
            if subsample:
                x = x[:, ::2, ::2]
            out.append(color_images(x.contiguous(), d, flip, generator))
        return out

    settings = {
        "kind": "colored",
        "seed": seed,
        "subsample": subsample,
        "files": sorted(str(p) for p in paths.values()),
    }
    parts, info = _cached_build(name, settings, paths, cache, cache_dir, build)
    scale = ScaleToUnit(transform_device)
    domains = [
        Domain(env, x, y, scale, scale) for (env, _), (x, y) in zip(COLOR_ENVIRONMENTS, parts, strict=True)
    ]
    classes = ["5-9", "0-4"] if variant == "mnist" else ["classes 5-9", "classes 0-4"]
    return MultiDomainDataset(name, domains, classes, data_kind="mnist", info=info)
