"""Mini-batches per domain: an infinite, resumable training iterator and an in-order evaluation one."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dgprune.data.domains import Domain
from dgprune.errors import ConfigError, DataError

Batch = tuple[torch.Tensor, torch.Tensor]


class _DomainStream:
    """Epochs of one domain: a fresh permutation each epoch, consumed in batches without replacement."""

    def __init__(self, domain: Domain, batch_size: int, seed: int) -> None:
        self.domain = domain
        self.batch_size = min(batch_size, len(domain))
        # Seeded per (seed, domain name): adding or reordering domains does not change this stream. The
        # "batches:" salt keeps it unrelated to the train/val split permutation of the same (seed, name).
        self.generator = torch.Generator().manual_seed(zlib.crc32(f"batches:{seed}:{domain.name}".encode()))
        self.perm = torch.randperm(len(domain), generator=self.generator)
        self.pos = 0

    def next(self) -> Batch:
        if self.pos + self.batch_size > len(self.perm):
            # Drop the epoch's remainder rather than pad it from the next epoch: no sample repeats within
            # a batch, and a new random order every epoch means no sample is skipped systematically.
            self.perm = torch.randperm(len(self.domain), generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.domain.images[idx], self.domain.labels[idx]


class DomainBatches:
    """Infinite iterator of one (x, y) mini-batch per domain, deterministic for a seed.

    Each domain gives min(batch_size, len(domain)) samples per step, drawn from a per-domain reshuffle
    every epoch of that domain. `state_dict()` / `load_state_dict()` let training resume exactly.
    """

    def __init__(self, domains: Sequence[Domain], batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not domains:
            raise DataError("DomainBatches needs at least one domain")
        empty = [d.name for d in domains if len(d) == 0]
        if empty:
            raise DataError(f"cannot draw batches from empty domain(s): {', '.join(empty)}")
        self.batch_size = batch_size
        self.seed = seed
        self._streams = [_DomainStream(d, batch_size, seed) for d in domains]

    @property
    def domain_names(self) -> list[str]:
        return [s.domain.name for s in self._streams]

    def next(self) -> list[Batch]:
        return [s.next() for s in self._streams]

    def __iter__(self) -> Iterator[list[Batch]]:
        return self

    def __next__(self) -> list[Batch]:
        return self.next()

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, ints and strings only, so it loads with torch.load(weights_only=True)."""
        return {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "streams": [
                {
                    "name": s.domain.name,
                    "size": len(s.domain),
                    "generator": s.generator.get_state(),
                    "perm": s.perm.clone(),
                    "pos": s.pos,
                }
                for s in self._streams
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [(s["name"], int(s["size"])) for s in state["streams"]]
        current = [(s.domain.name, len(s.domain)) for s in self._streams]
        if saved != current or int(state["batch_size"]) != self.batch_size:
            raise DataError(
                "batch iterator state does not match these domains: saved (name, size) "
                f"{saved} with batch_size {state['batch_size']}, current {current} with {self.batch_size}"
            )
        self.seed = int(state["seed"])
        for stream, s in zip(self._streams, state["streams"], strict=True):
            stream.generator.set_state(s["generator"])
            stream.perm = s["perm"].clone()
            stream.pos = int(s["pos"])


def iterate_batches(domain: Domain, batch_size: int) -> Iterator[Batch]:
    """The domain's samples in order, in batches of `batch_size` (the last may be smaller); for evaluation."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(domain), batch_size):
        yield domain.images[start : start + batch_size], domain.labels[start : start + batch_size]
