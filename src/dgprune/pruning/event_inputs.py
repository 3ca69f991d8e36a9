"""The inputs of a criterion scored once per pruning event (``CriterionSpec.scored``), by its ``needs``:
one place for the training loop, ``dgprune analyze`` and the Torch-Pruning integration.

- ``feature_maps``: every gated channel's mean map per domain (``feature_maps.measure_feature_maps``)
  over the sources' images, and over the target's when the criterion also needs ``target_images``;
- ``probe``: the model, its gates and the images (the target's only for ``target_images``), for
  criteria that forward them themselves (``target_entropy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from dgprune.pruning.criteria import Criterion, ScoreInputs
from dgprune.pruning.criterion_spec import EventProbe
from dgprune.pruning.feature_maps import measure_feature_maps
from dgprune.pruning.gates import GateSet


def event_score_inputs(
    criterion: Criterion,
    model: nn.Module,
    gates: GateSet,
    sources: Sequence[torch.Tensor],
    target: torch.Tensor | None,
    base: ScoreInputs | None = None,
) -> ScoreInputs:
    """``base`` (or the plain gates) with what ``criterion.needs``, measured now. ``target``: the
    target's images (never labels), required when the criterion needs them, else ignored."""
    needs_target = "target_images" in criterion.needs
    if needs_target and target is None:
        raise ValueError(
            f"criterion {criterion.name!r} needs the target's images: prune.target_access unlabeled"
        )
    target = target if needs_target else None
    domains = [*sources, *([target] if target is not None else [])]
    maps = None
    if "feature_maps" in criterion.needs:
        maps = measure_feature_maps(model, gates, domains, num_sources=len(sources))
    inputs = base if base is not None else ScoreInputs(gates=gates.flat_gates())
    return replace(inputs, feature_maps=maps, probe=EventProbe(model, gates, list(sources), target))
