"""Image decoding in worker processes: the one-off decode of a dataset, and streaming for big ones.

`decode_image` is the whole per-file work (PIL: open, convert to RGB, resize to S x S bilinear — the
same calls DomainBed's `Resize((S, S))` makes), so a streamed image is bit-identical to the cached
one. Workers are processes (fork on Linux, so they start instantly and share the parent's memory);
they only run PIL and numpy.

`FileImages` is the `ImageStore` of a streaming domain: `load(indices)` returns uint8 [k, 3, S, S],
waiting for images already submitted by `prefetch` and decoding the rest at once. DomainBatches
knows its future indices (the permutation), so it prefetches the next batches while the model
trains on the current one; the order of samples and of random augmentation never depends on timing.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from dgprune.errors import DataError

# Extensions torchvision's ImageFolder accepts (compared in lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

DecodeResult = tuple[np.ndarray | None, str | None]


def decode_image(path: str, size: int | None) -> DecodeResult:
    """(HWC uint8 array, None) or (None, reason). size None: decode fully but return no pixels (a check).

    Errors are returned, not raised, so one bad file does not stop a pool map and every bad file of
    a dataset can be listed at once.
    """
    from PIL import Image  # deferred: keeps `import dgprune.data` light

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")  # forces a full decode: truncated files fail here
            if size is None:
                return None, None
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.array(rgb, dtype=np.uint8), None  # a writable copy (torch warns on read-only)
    except Exception as e:  # any failure to read user data is a "bad image", reported with its path
        return None, f"{type(e).__name__}: {e}"


def _decode_args(args: tuple[str, int | None]) -> DecodeResult:
    return decode_image(*args)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# Keyed by (process id, size): a pool belongs to the process that created it. A process forked
# later (e.g. a parallel sweep worker) inherits the dict but must not use the parent's workers.
_POOLS: dict[tuple[int, int], ProcessPoolExecutor] = {}


def _context() -> Any:
    # fork: instant start and no re-import of torch in workers; they only use PIL/numpy, which is safe.
    # Elsewhere (macOS, Windows) spawn, the platform default.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def get_pool(workers: int) -> ProcessPoolExecutor:
    """This process's shared pool of `workers` decoding processes, created on first use."""
    key = (os.getpid(), workers)
    pool = _POOLS.get(key)
    if pool is None:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context())
        _POOLS[key] = pool
    return pool


@atexit.register
def shutdown_pools() -> None:
    for (pid, _), pool in list(_POOLS.items()):
        if pid == os.getpid():
            pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()


def decode_many(paths: Sequence[str], size: int | None, workers: int) -> Iterator[DecodeResult]:
    """Decode `paths` in order; workers=0 decodes in this process (no pool)."""
    if workers <= 0 or len(paths) < 2:
        for p in paths:
            yield decode_image(p, size)
        return
    chunk = max(1, min(64, len(paths) // (4 * workers)))
    try:
        yield from get_pool(workers).map(_decode_args, [(p, size) for p in paths], chunksize=chunk)
    except Exception as e:  # a worker died (e.g. out of memory): say so instead of a pool traceback
        _POOLS.pop((os.getpid(), workers), None)
        raise DataError(f"image decoding workers failed: {type(e).__name__}: {e}") from None


def to_chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


class FileImages:
    """Streaming `ImageStore`: images decoded from files on demand, at size x size, by worker processes."""

    def __init__(self, paths: Sequence[str], size: int, workers: int, max_pending: int = 2048) -> None:
        self.paths = list(paths)
        self.size = size
        self.workers = workers
        self.max_pending = max_pending
        self._pending: dict[int, Future] = {}

    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self.paths), 3, self.size, self.size])

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, Any]:  # futures do not pickle; they are only a cache
        state = self.__dict__.copy()
        state["_pending"] = {}
        return state

    def select(self, indices: torch.Tensor) -> FileImages:
        return FileImages([self.paths[int(i)] for i in indices], self.size, self.workers, self.max_pending)

    def prefetch(self, indices: torch.Tensor) -> None:
        if self.workers <= 0:
            return
        pool = get_pool(self.workers)
        for i in indices.tolist():
            if i not in self._pending and len(self._pending) < self.max_pending:
                self._pending[i] = pool.submit(decode_image, self.paths[i], self.size)

    def load(self, indices: torch.Tensor) -> torch.Tensor:
        index_list = indices.tolist()
        self.prefetch(indices)
        out = torch.empty((len(index_list), 3, self.size, self.size), dtype=torch.uint8)
        for k, i in enumerate(index_list):
            future = self._pending.pop(i, None)
            array, error = future.result() if future is not None else decode_image(self.paths[i], self.size)
            if array is None:
                # Every file was checked when the dataset was opened, so it changed since: stop clearly.
                raise DataError(
                    f"cannot decode image {self.paths[i]} (it decoded when the dataset was opened): {error}"
                )
            out[k] = to_chw(array)
        return out
