"""One alias rule for registered names (algorithms, datasets): any case, with or without ``_``/``-``.

So DomainBed's spellings work as they are (``ERM``, ``VREx``, ``GroupDRO``, ``RotatedMNIST``,
``OfficeHome``, ``TerraIncognita``, ``DomainNet``...) and resolve to dgprune's canonical names
(``erm``, ``rotated_mnist``, ``office_home``...) wherever a name is validated, so that a run's id
does not depend on how its names were spelt.
"""

from __future__ import annotations

from collections.abc import Iterable

from dgprune.errors import ConfigError, DgpruneError

SPELLING_NOTE = "any case; DomainBed's spelling such as ERM or RotatedMNIST works too"


def _fold(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def canonical_name(name: str, valid: Iterable[str]) -> str | None:
    """The registered name that ``name`` spells (exact, else case- and ``_``/``-``-insensitive), or None
    when there is none or more than one."""
    names = list(valid)
    if name in names:
        return name
    matches = [v for v in names if _fold(v) == _fold(name)]
    return matches[0] if len(matches) == 1 else None


def resolve_name(name: str, valid: Iterable[str], what: str, error: type[DgpruneError] = ConfigError) -> str:
    """``canonical_name`` or ``error`` naming ``what`` (e.g. "algorithm") and every valid name."""
    names = list(valid)
    found = canonical_name(name, names)
    if found is None:
        raise error(unknown_name_message(name, names, what))
    return found


def unknown_name_message(name: str, valid: Iterable[str], what: str) -> str:
    return f"unknown {what} {name!r}; valid: {', '.join(valid)} ({SPELLING_NOTE})"
