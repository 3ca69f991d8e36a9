"""A run's identity, kept with its results (run.json) and inside its checkpoints.

A directory's results and checkpoint are reused only by the run that wrote them. The identity is a
small dict: ``stage`` (pretrain or prune), ``run_id`` (the hash of every result-relevant setting),
for pruning ``pretrained`` (the id of the model it started from), and ``config`` (the resolved
settings, less the device). The ids decide whether two runs are the same; ``config`` is kept only
to say, when they are not, which settings differ.
"""

from __future__ import annotations

import json
from typing import Any

from dgprune.errors import ConfigError

Identity = dict[str, Any]

_DESCRIPTIVE = frozenset({"config"})  # kept for the message; the ids alone decide
_MAX_SHOWN = 6  # differences named in the one-line message


def same_run(stored: Identity, current: Identity) -> bool:
    return _key(stored) == _key(current)


def _key(identity: Identity) -> Identity:
    return {k: v for k, v in identity.items() if k not in _DESCRIPTIVE}


def differences(
    stored: Identity, current: Identity, labels: tuple[str, str] = ("stored", "now")
) -> list[str]:
    """``field: old (stored) vs new (now)`` for every differing id and dotted setting (``labels``: the
    words in brackets)."""
    found = []
    old, new = labels
    for key, label in (("stage", "stage"), ("pretrained", "pretrained model")):
        if stored.get(key) != current.get(key):
            found.append(f"{label}: {_show(stored.get(key))} ({old}) vs {_show(current.get(key))} ({new})")
    found += _dotted_differences(stored.get("config") or {}, current.get("config") or {}, labels=labels)
    if not found and stored.get("run_id") != current.get("run_id"):  # e.g. a results version bump
        found.append(f"run id: {stored.get('run_id')} (stored) vs {current.get('run_id')} (now)")
    return found


def _dotted_differences(
    old: Any, new: Any, prefix: str = "", labels: tuple[str, str] = ("stored", "now")
) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            found += _dotted_differences(old.get(key, _UNSET), new.get(key, _UNSET), where, labels)
        return found
    if old == new:
        return []
    return [f"{prefix}: {_show(old)} ({labels[0]}) vs {_show(new)} ({labels[1]})"]


class _Unset:
    def __repr__(self) -> str:
        return "unset"


_UNSET = _Unset()


def _show(value: Any) -> str:
    if value is _UNSET:
        return "unset"
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def mismatch_error(where: str, stored: Identity, current: Identity) -> ConfigError:
    """One line: the place, what differs between the stored run and this one, and the way out."""
    found = differences(stored, current)
    shown = "; ".join(found[:_MAX_SHOWN])
    if len(found) > _MAX_SHOWN:
        shown += f"; and {len(found) - _MAX_SHOWN} more"
    return ConfigError(
        f"{where} holds another run ({shown}); rerun with --overwrite to replace it, or use another --out"
    )
