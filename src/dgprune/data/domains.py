"""In-memory multi-domain datasets: named domains sharing one label set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgprune.errors import DataError


@dataclass
class Domain:
    """One domain's samples, held in memory.

    `images` are float32 [n, C, H, W], already normalised for the model; `labels` are int64 [n].
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or not self.images.is_floating_point():
            raise DataError(
                f"domain {self.name!r}: images must be a float tensor [n, C, H, W], "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or self.labels.is_floating_point() or self.labels.dtype == torch.bool:
            raise DataError(
                f"domain {self.name!r}: labels must be an integer tensor [n], "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise DataError(f"domain {self.name!r}: {len(self.images)} images but {len(self.labels)} labels")
        # One dtype everywhere, so batches from different domains concatenate and match float32 weights.
        self.images = self.images.to(torch.float32)
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> Domain:
        """The samples at `indices`, as a domain of the same name (e.g. its train or val part)."""
        return Domain(self.name, self.images[indices], self.labels[indices])


@dataclass
class MultiDomainDataset:
    """Domains that share one label set and one input shape."""

    name: str
    domains: list[Domain]
    classes: list[str]

    def __post_init__(self) -> None:
        if not self.domains:
            raise DataError(f"dataset {self.name!r} has no domains")
        if not self.classes:
            raise DataError(f"dataset {self.name!r} has no classes")
        names = [d.name for d in self.domains]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DataError(f"dataset {self.name!r}: duplicate domain names {duplicates}")
        shape = self.domains[0].images.shape[1:]
        for d in self.domains:
            if len(d) == 0:
                raise DataError(f"dataset {self.name!r}: domain {d.name!r} is empty")
            if d.images.shape[1:] != shape:
                raise DataError(
                    f"dataset {self.name!r}: domain {d.name!r} has images of shape "
                    f"{tuple(d.images.shape[1:])}, domain {self.domains[0].name!r} has {tuple(shape)}"
                )
            lo, hi = int(d.labels.min()), int(d.labels.max())
            if lo < 0 or hi >= len(self.classes):
                raise DataError(
                    f"dataset {self.name!r}: domain {d.name!r} has labels in [{lo}, {hi}], "
                    f"expected [0, {len(self.classes) - 1}]"
                )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.domains[0].images.shape[1:]
        return int(c), int(h), int(w)

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
