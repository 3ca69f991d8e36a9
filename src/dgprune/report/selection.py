"""Choosing among hyper-parameter draws by training-domain validation, as DomainBed selects models.

A sweep with ``hparams_seed: [0, 1, ...]`` (or a grid over ``pretrain.lr``...) has several pretrained
models per (data, model, algorithm, target, seed) that differ only in their pretraining
hyper-parameters, and a report shows one run per table cell. For each such *slot* the draw whose
dense model has the best accuracy on the held-out source-domain validation split (``intra_acc``;
the target domain is never looked at) is kept with all its pruned runs; the other draws are left out
of the tables. Ties go to the draw listed first in the database.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from dgprune.experiments.records import ResultRecord

SEARCHED_PRETRAIN_KEYS = ("lr", "weight_decay", "batch_size", "hparams")


@dataclass(frozen=True)
class DrawSelection:
    slots: int = 0  # slots that had more than one draw
    draws: int = 0  # draws in those slots
    kept: dict[str, str] = field(default_factory=dict)  # dense run id kept -> its draw (pretrain settings)

    def summary(self) -> str:
        return (
            f"{self.slots} pretraining slot(s) had {self.draws} hyper-parameter draws; kept per slot the "
            "draw with the best source validation accuracy (training-domain validation)"
        )


def _slot_and_draw(config: dict[str, Any]) -> tuple[str, str]:
    pretrain = dict(config.get("pretrain") or {})
    draw = {key: pretrain.pop(key, None) for key in SEARCHED_PRETRAIN_KEYS}
    rest = {k: v for k, v in config.items() if k not in ("pretrain", "prune", "device")}
    return json.dumps({**rest, "pretrain": pretrain}, sort_keys=True), json.dumps(draw, sort_keys=True)


def select_draws_by_validation(
    records: list[ResultRecord], configs: dict[str, dict[str, Any]] | None
) -> tuple[list[ResultRecord], DrawSelection]:
    """``records`` with, in every slot of several draws, only the best-validated draw's runs."""
    if not configs or any(r.run_id not in configs for r in records):
        return records, DrawSelection()
    place = {r.run_id: _slot_and_draw(configs[r.run_id]) for r in records}  # run id -> (slot, draw)
    draws_of_slot: dict[str, dict[str, float | None]] = defaultdict(dict)  # slot -> draw -> dense intra
    dense_of: dict[tuple[str, str], str] = {}
    for r in records:
        slot, draw = place[r.run_id]
        best = draws_of_slot[slot].setdefault(draw, None)
        if r.criterion == "none":
            draws_of_slot[slot][draw] = r.intra_acc if best is None else max(best, r.intra_acc)
            dense_of[slot, draw] = r.run_id
    chosen: dict[str, str] = {}
    slots = draws = 0
    kept: dict[str, str] = {}
    for slot, by_draw in draws_of_slot.items():
        if len(by_draw) == 1:
            chosen[slot] = next(iter(by_draw))
            continue
        slots, draws = slots + 1, draws + len(by_draw)
        validated = {d: acc for d, acc in by_draw.items() if acc is not None}
        if not validated:  # no dense model finished yet: nothing to select by, so keep none
            continue
        best = max(validated, key=lambda d: validated[d])  # first of equals: database order
        chosen[slot] = best
        kept[dense_of[slot, best]] = best
    selected = [r for r in records if chosen.get(place[r.run_id][0]) == place[r.run_id][1]]
    return selected, DrawSelection(slots, draws, kept)
