"""Leave-one-domain-out splits.

Each source domain is split train:val with a permutation seeded by (seed, domain name) only, so a
domain's split is the same whichever domain is the target and however the domains are ordered: every
criterion and every target sees identical source data for a given seed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from dgprune.data.domains import Domain, MultiDomainDataset
from dgprune.errors import ConfigError, DataError


@dataclass
class LodoSplit:
    """Leave-one-domain-out: the unseen target, whole, and the sources' train / val parts
    (``val_fraction`` of each source, drawn with ``seed``)."""

    target: Domain
    train: list[Domain]
    val: list[Domain]
    val_fraction: float = 0.1
    seed: int = 0

    @property
    def source_names(self) -> list[str]:
        return [d.name for d in self.train]

    def train_samples(self) -> list[Domain]:
        """Per source, a fixed sample of its train split as large as its val split: a train accuracy
        that costs an evaluation no more than the val split (seeded by the split's seed and the name)."""
        samples = []
        for train, val in zip(self.train, self.val, strict=True):
            # Salted: not the permutation that split the domain into train and val.
            salted = zlib.crc32(f"train-sample:{self.seed}:{train.name}".encode())
            generator = torch.Generator().manual_seed(salted)
            size = min(len(val), len(train))
            samples.append(train.subset(torch.randperm(len(train), generator=generator)[:size].sort().values))
        return samples

    def target_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rest, val) indices of the target: its val part is the samples that would be its val split
        were it a source (:func:`split_indices`), for oracle (target-validation) model selection."""
        return split_indices(self.target, self.val_fraction, self.seed)


def domain_seed(seed: int, name: str) -> int:
    """A stable integer from (seed, domain name). Python's hash() is salted per process, crc32 is not."""
    return zlib.crc32(f"{seed}:{name}".encode())


def split_indices(domain: Domain, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) sorted indices of a domain; val has round(n * val_fraction), at least 1 in each part."""
    n = len(domain)
    if n < 2:
        raise DataError(f"domain {domain.name!r} has {n} sample(s); a train/val split needs at least 2")
    # round, not floor: floor(0.29 * 100) would give 28.
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(domain_seed(seed, domain.name)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def split_domain(domain: Domain, val_fraction: float, seed: int) -> tuple[Domain, Domain]:
    """(train, val) parts of a domain (:func:`split_indices`)."""
    train_idx, val_idx = split_indices(domain, val_fraction, seed)
    return domain.subset(train_idx), domain.subset(val_idx)


def make_lodo_split(
    ds: MultiDomainDataset, target: str, val_fraction: float = 0.1, seed: int = 0
) -> LodoSplit:
    """Hold out `target` whole; split every other domain train:val = (1 - val_fraction):val_fraction."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(ds.domains) < 2:
        raise DataError(
            f"dataset {ds.name!r} has {len(ds.domains)} domain(s); leave-one-domain-out needs at least 2"
        )
    target_domain = ds.domain(target)  # raises DataError listing the valid names
    parts = [split_domain(d, val_fraction, seed) for d in ds.domains if d.name != target]
    return LodoSplit(
        target=target_domain,
        train=[t for t, _ in parts],
        val=[v for _, v in parts],
        val_fraction=val_fraction,
        seed=seed,
    )
