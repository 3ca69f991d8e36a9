"""One registry style for everything a config chooses by name: datasets, models, algorithms, criteria.

A :class:`Registry` maps names to entries (a loader, a model builder, an algorithm class, a criterion
spec). Every registry resolves names the same way (``names.py``: any case, with or without ``_``/``-``,
so DomainBed's spellings work) and reports an unknown name with the same one-line error, which lists
the valid names. See docs/architecture.md ("Extending dgprune").

Also here, because both the dataset registry (which records it) and the algorithm registry (whose
optimiser defaults depend on it) need it and neither may import the other: :data:`DataKind`.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from typing import Generic, Literal, TypeVar

from dgprune.errors import ConfigError, DgpruneError
from dgprune.names import canonical_name, unknown_name_message

# DomainBed's two families of datasets: small images (RotatedMNIST, ColoredMNIST: "mnist") and the
# others (PACS, VLCS, OfficeHome...: "image"). The optimiser defaults and the random search
# distributions differ between them (docs/algorithms.md).
DataKind = Literal["mnist", "image"]
DATA_KINDS: tuple[DataKind, ...] = ("mnist", "image")

T = TypeVar("T")


class Registry(MutableMapping[str, T], Generic[T]):
    """Entries by name, in a stable order (registration order, or sorted with ``sort_names``).

    ``registry.lookup(name)`` / ``registry.resolve(name)`` accept any spelling that ``names.py`` folds to
    one registered name and raise ``error`` (a :class:`DgpruneError`) listing the valid names
    otherwise. As a mapping (``registry[name]``, ``name in registry``, iteration) it uses the exact
    registered names; ``registry[name] = entry`` registers or replaces (so a test can
    ``monkeypatch.setitem`` an entry in). ``extra_names`` are listed in errors as valid too (e.g. the
    ``folder:/path`` datasets that are handled outside the registry).
    """

    def __init__(
        self,
        what: str,
        *,
        error: type[DgpruneError] = ConfigError,
        sort_names: bool = False,
        extra_names: Sequence[str] = (),
    ) -> None:
        self.what = what
        self.error = error
        self.sort_names = sort_names
        self.extra_names = tuple(extra_names)
        self._entries: dict[str, T] = {}

    # ---- registering -------------------------------------------------------------------------------
    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``name`` and return it. A name that is already taken, or that would be
        ambiguous with another one under the spelling rule (``my_algo`` vs ``myalgo``), is a ValueError
        (a programming error) unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} needs a non-empty name, got {name!r}")
        if not replace:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is already registered")
            clash = canonical_name(name, self._entries)
            if clash is not None:
                raise ValueError(f"{self.what} {name!r} would be spelt like the registered {clash!r}")
        self._entries[name] = entry
        return entry

    # ---- looking up --------------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        """The registered name that ``name`` spells; ``error`` listing the valid names otherwise."""
        found = canonical_name(name, self._entries) if isinstance(name, str) else None
        if found is None:
            raise self.unknown(name)
        return found

    def lookup(self, name: str) -> T:
        """The entry of ``name`` in any spelling; ``error`` listing the valid names if there is none."""
        return self._entries[self.resolve(name)]

    def unknown(self, name: object) -> DgpruneError:
        """The error for an unknown name: ``unknown <what> 'x'; valid: a, b, c (<spelling rule>)``."""
        return self.error(unknown_name_message(str(name), self.listing(), self.what))

    def names(self) -> tuple[str, ...]:
        """The registered names in the registry's stable order."""
        return tuple(sorted(self._entries)) if self.sort_names else tuple(self._entries)

    def listing(self) -> tuple[str, ...]:
        """What errors list as valid: the names, then ``extra_names``."""
        return (*self.names(), *self.extra_names)

    # ---- the mapping API (exact names) -----------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self.register(name, entry, replace=True)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"
