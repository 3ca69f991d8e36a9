"""Mini-batches per domain: an infinite, resumable training iterator and an in-order evaluation one."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dgprune.data.domains import Domain
from dgprune.errors import ConfigError, DataError

Batch = tuple[torch.Tensor, torch.Tensor]

# Batches decoded ahead per streaming domain: enough to hide decoding behind a training step.
PREFETCH_BATCHES = 2


def _seeded(salt: str, seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{salt}:{seed}:{name}".encode()))


class _DomainStream:
    """Epochs of one domain: a fresh permutation each epoch, consumed in batches without replacement."""

    def __init__(self, domain: Domain, batch_size: int, seed: int) -> None:
        self.domain = domain
        self.batch_size = min(batch_size, len(domain))
        # Seeded per (seed, domain name): adding or reordering domains does not change this stream. The
        # "batches:" salt keeps it unrelated to the train/val split permutation of the same (seed, name).
        self.generator = _seeded("batches", seed, domain.name)
        # Augmentation draws its own stream, so the sample order does not depend on the transforms.
        self.augment_generator = _seeded("augment", seed, domain.name)
        self.perm = torch.randperm(len(domain), generator=self.generator)
        self.pos = 0

    def _upcoming(self, count: int) -> list[torch.Tensor]:
        """Indices of the next `count` batches after the current one, without consuming anything."""
        perm, pos, generator = self.perm, self.pos, None
        out = []
        for _ in range(count):
            if pos + self.batch_size > len(perm):
                if generator is None:  # a copy: peeking must not advance the real stream
                    generator = torch.Generator()
                    generator.set_state(self.generator.get_state())
                perm, pos = torch.randperm(len(self.domain), generator=generator), 0
            out.append(perm[pos : pos + self.batch_size])
            pos += self.batch_size
        return out

    def next(self) -> Batch:
        if self.pos + self.batch_size > len(self.perm):
            # Drop the epoch's remainder rather than pad it from the next epoch: no sample repeats within
            # a batch, and a new random order every epoch means no sample is skipped systematically.
            self.perm = torch.randperm(len(self.domain), generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        if self.domain.streaming:
            for upcoming in self._upcoming(PREFETCH_BATCHES):
                self.domain.prefetch(upcoming)
        return self.domain.train_batch(idx, self.augment_generator), self.domain.labels[idx]


class DomainBatches:
    """Infinite iterator of one (x, y) mini-batch per domain, deterministic for a seed.

    Each domain gives min(batch_size, len(domain)) samples per step, drawn from a per-domain reshuffle
    every epoch of that domain, passed through the domain's training transform (augmentation) with a
    per-domain generator. `state_dict()` / `load_state_dict()` let training resume exactly.
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
                    "augment_generator": s.augment_generator.get_state(),
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
            if "augment_generator" in s:  # absent in states saved before augmentation existed
                stream.augment_generator.set_state(s["augment_generator"])
            stream.perm = s["perm"].clone()
            stream.pos = int(s["pos"])


def iterate_batches(domain: Domain, batch_size: int) -> Iterator[Batch]:
    """The domain's samples in order, in batches of `batch_size` (the last may be smaller), through the
    evaluation transform; for evaluation."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n = len(domain)
    if domain.streaming and n:
        domain.prefetch(torch.arange(0, min(batch_size, n)))
    for start in range(0, n, batch_size):
        if domain.streaming and start + batch_size < n:
            domain.prefetch(torch.arange(start + batch_size, min(start + 2 * batch_size, n)))
        idx = torch.arange(start, min(start + batch_size, n))
        yield domain.eval_batch(idx), domain.labels[idx]


def probe_batch(domains: Sequence[Domain], per_domain: int = 64) -> torch.Tensor:
    """The first `per_domain` model-ready samples of each domain, concatenated (evaluation transform):
    a fixed batch for checks such as masked-vs-compressed outputs."""
    return torch.cat([d.eval_batch(torch.arange(min(per_domain, len(d)))) for d in domains])


def image_sample(domain: Domain, count: int, seed: int) -> torch.Tensor:
    """Model-ready images (evaluation transform) of a seeded sample of ``count`` of the domain's samples
    (all of them when it has fewer), in index order. Reads the images only, never the labels: what a
    criterion may be given of an unlabeled target (``prune.target_access: unlabeled``)."""
    if count < 1:
        raise ConfigError(f"count must be >= 1, got {count}")
    generator = _seeded("image-sample", seed, domain.name)
    indices = torch.randperm(len(domain.images), generator=generator)[:count].sort().values
    return domain.eval_batch(indices)
