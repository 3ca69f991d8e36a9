"""Multi-domain datasets: named domains sharing one label set.

A domain holds its images either in memory (a tensor) or as an `ImageStore` that decodes files on
demand (streaming, for datasets larger than the memory budget). Images may be stored ready for the
model (float32, e.g. the embedded digits) or as uint8 pixels with a `train_transform` (augmentation,
applied by `DomainBatches`) and an `eval_transform` (applied by `iterate_batches` / `eval_batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from dgprune.errors import DataError

# (uint8 or float batch, per-domain augmentation generator or None) -> float batch for the model.
BatchTransform = Callable[..., torch.Tensor]


@runtime_checkable
class ImageStore(Protocol):
    """Images that live outside memory (files): a lazy, indexable collection of uint8 [C, H, W]."""

    @property
    def shape(self) -> torch.Size: ...  # (n, C, H, W), without decoding anything

    def __len__(self) -> int: ...

    def select(self, indices: torch.Tensor) -> ImageStore: ...  # lazy subset, nothing decoded

    def load(self, indices: torch.Tensor) -> torch.Tensor: ...  # decoded uint8 [k, C, H, W]

    def prefetch(self, indices: torch.Tensor) -> None: ...  # start decoding what will be asked next


def _to_unit(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Default for uint8 images without a transform: ToTensor's scaling to [0, 1]."""
    return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x


@dataclass
class Domain:
    """One domain's samples.

    `images`: float [n, C, H, W] ready for the model, uint8 [n, C, H, W] pixels, or an `ImageStore`.
    `labels`: int64 [n]. `train_transform(x, generator)` / `eval_transform(x)` turn a stored batch
    into the model's input; without them float images are used as they are and uint8 ones are
    scaled to [0, 1]. Read batches with `train_batch` / `eval_batch`, not `images[...]`.
    """

    name: str
    images: torch.Tensor | ImageStore
    labels: torch.Tensor
    train_transform: BatchTransform | None = None
    eval_transform: BatchTransform | None = None

    def __post_init__(self) -> None:
        if isinstance(self.images, torch.Tensor):
            ok = self.images.dim() == 4 and (
                self.images.is_floating_point() or self.images.dtype == torch.uint8
            )
            if not ok:
                raise DataError(
                    f"domain {self.name!r}: images must be a float or uint8 tensor [n, C, H, W], "
                    f"got {self.images.dtype} {tuple(self.images.shape)}"
                )
            if self.images.is_floating_point():
                # One dtype everywhere, so batches from different domains concatenate and match weights.
                self.images = self.images.to(torch.float32)
        elif not isinstance(self.images, ImageStore):
            raise DataError(f"domain {self.name!r}: images must be a tensor or an ImageStore")
        if self.labels.dim() != 1 or self.labels.is_floating_point() or self.labels.dtype == torch.bool:
            raise DataError(
                f"domain {self.name!r}: labels must be an integer tensor [n], "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise DataError(f"domain {self.name!r}: {len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def streaming(self) -> bool:
        return not isinstance(self.images, torch.Tensor)

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one sample as the model sees it (after the evaluation transform)."""
        output_shape = getattr(self.eval_transform, "output_shape", None)
        if output_shape is None:
            return self.stored_shape
        c, h, w = output_shape(self.stored_shape)
        return int(c), int(h), int(w)

    def subset(self, indices: torch.Tensor) -> Domain:
        """The samples at `indices`, as a domain of the same name and transforms (e.g. its val part)."""
        images = (
            self.images[indices] if isinstance(self.images, torch.Tensor) else self.images.select(indices)
        )
        return Domain(self.name, images, self.labels[indices], self.train_transform, self.eval_transform)

    def _load(self, indices: torch.Tensor) -> torch.Tensor:
        if isinstance(self.images, torch.Tensor):
            return self.images[indices]
        return self.images.load(indices)

    def eval_batch(self, indices: torch.Tensor | slice) -> torch.Tensor:
        """Model-ready images at `indices` (a tensor of indices or a slice), evaluation transform."""
        if isinstance(indices, slice):
            indices = torch.arange(len(self))[indices]
        x = self._load(indices)
        return self.eval_transform(x) if self.eval_transform is not None else _to_unit(x)

    def train_batch(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Model-ready images at `indices` with the training transform (augmentation) drawn from
        `generator`; the evaluation transform when the domain has no training transform."""
        if self.train_transform is None:
            return self.eval_batch(indices)
        return self.train_transform(self._load(indices), generator)

    def prefetch(self, indices: torch.Tensor) -> None:
        """Hint that `indices` will be read soon (streaming domains start decoding them)."""
        if not isinstance(self.images, torch.Tensor):
            self.images.prefetch(indices)


@dataclass
class MultiDomainDataset:
    """Domains that share one label set and one input shape.

    `data_kind` is "mnist" (small images, DomainBed's MNIST-type defaults) or "image" (ImageNet-size
    photographs). `skipped_files` lists images left out because they could not be decoded (only with
    `skip_bad_images`); runners store their count with the results. `info` holds facts about how the
    data were loaded (cache files used or written, streaming, image size), for logs and tests.
    """

    name: str
    domains: list[Domain]
    classes: list[str]
    data_kind: str = "mnist"
    skipped_files: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.domains:
            raise DataError(f"dataset {self.name!r} has no domains")
        if not self.classes:
            raise DataError(f"dataset {self.name!r} has no classes")
        names = [d.name for d in self.domains]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DataError(f"dataset {self.name!r}: duplicate domain names {duplicates}")
        shape = self.domains[0].input_shape
        for d in self.domains:
            if len(d) == 0:
                raise DataError(f"dataset {self.name!r}: domain {d.name!r} is empty")
            if d.input_shape != shape:
                raise DataError(
                    f"dataset {self.name!r}: domain {d.name!r} has images of shape "
                    f"{d.input_shape}, domain {self.domains[0].name!r} has {shape}"
                )
            lo, hi = int(d.labels.min()), int(d.labels.max())
            if lo < 0 or hi >= len(self.classes):
                raise DataError(
                    f"dataset {self.name!r}: domain {d.name!r} has labels in [{lo}, {hi}], "
                    f"expected [0, {len(self.classes) - 1}]"
                )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.domains[0].input_shape

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def domain(self, name: str) -> Domain:
        for d in self.domains:
            if d.name == name:
                return d
        raise DataError(
            f"unknown domain {name!r} in dataset {self.name!r}; valid domains: {', '.join(self.domain_names)}"
        )
