"""The embedded default dataset: rotated handwritten digits from scikit-learn's bundled `load_digits`.

Built the way DomainBed builds RotatedMNIST from MNIST: shuffle all images with a fixed data seed, deal
them into one disjoint subset per angle, rotate subset k by angles[k] degrees (bilinear). The data ship
inside scikit-learn, so nothing downloads. Unlike DomainBed, images are rotated as float tensors, not as
8-bit PIL images, so values are not re-quantised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from dgprune.data.domains import Domain, MultiDomainDataset
from dgprune.errors import ConfigError

DEFAULT_ANGLES: tuple[float, ...] = (0, 15, 30, 45, 60, 75)


def digit_domain_indices(n: int, num_domains: int, seed: int) -> list[torch.Tensor]:
    """Which original samples go to each domain: a seeded shuffle dealt round-robin (disjoint, sizes ±1)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[k::num_domains] for k in range(num_domains)]


def angle_name(angle: float) -> str:
    """Domain name of an angle: 15 -> "15", 7.5 -> "7.5"."""
    return format(float(angle), "g")


def load_rotated_digits(angles: Sequence[float] = DEFAULT_ANGLES, seed: int = 0) -> MultiDomainDataset:
    """Rotated 8x8 digits, one domain per angle, pixel values in [0, 1], 1 channel, 10 classes.

    `seed` is the data seed (which digit lands in which domain); it is independent of any training seed.
    """
    from sklearn.datasets import load_digits  # deferred: sklearn import is slow and only needed here

    angles = list(angles)
    names = [angle_name(a) for a in angles]
    if not angles:
        raise ConfigError("rotated_digits needs at least one angle")
    if len(set(names)) != len(names):
        raise ConfigError(f"rotated_digits angles must be distinct, got {angles}")
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # values 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    if len(angles) > len(images):
        raise ConfigError(f"rotated_digits: {len(angles)} angles but only {len(images)} images")

    domains = []
    subsets = digit_domain_indices(len(images), len(angles), seed)
    for angle, name, idx in zip(angles, names, subsets, strict=True):
        x = images[idx]
        if float(angle) % 360 != 0:  # identity: skip, so the "0" domain is bit-exact
            x = TF.rotate(x, float(angle), interpolation=InterpolationMode.BILINEAR)
        domains.append(Domain(name, x.contiguous(), labels[idx]))
    return MultiDomainDataset(_rotated_name(names), domains, [str(c) for c in range(10)])


def _rotated_name(names: list[str]) -> str:
    """``rotated_digits``, or ``rotated_digits-no-<angle>...`` when the angles are the default ones with
    some left out (a leave-one-source-out validation run without the true target): tables keep those
    runs apart. Any other choice of angles keeps the plain name."""
    defaults = [angle_name(a) for a in DEFAULT_ANGLES]
    if not set(names) < set(defaults):
        return "rotated_digits"
    return "-".join(["rotated_digits", *(f"no-{a}" for a in defaults if a not in names)])
