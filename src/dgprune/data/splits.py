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
    """Leave-one-domain-out: the unseen target, whole, and the sources' train / val parts."""

    target: Domain
    train: list[Domain]
    val: list[Domain]

    @property
    def source_names(self) -> list[str]:
        return [d.name for d in self.train]


def domain_seed(seed: int, name: str) -> int:
    """A stable integer from (seed, domain name). Python's hash() is salted per process, crc32 is not."""
    return zlib.crc32(f"{seed}:{name}".encode())


def split_domain(domain: Domain, val_fraction: float, seed: int) -> tuple[Domain, Domain]:
    """(train, val) parts of a domain; val has round(n * val_fraction) samples, at least 1 in each part."""
    n = len(domain)
    if n < 2:
        raise DataError(f"domain {domain.name!r} has {n} sample(s); a train/val split needs at least 2")
    # round, not floor: floor(0.29 * 100) would give 28.
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(domain_seed(seed, domain.name)))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
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
    return LodoSplit(target=target_domain, train=[t for t, _ in parts], val=[v for _, v in parts])
