"""DSS (Sun, "Pruning for Better Domain Generalizability", ICML 2023 SCIS workshop) and a source-only
counterpart. Both are scored once per pruning event, in evaluation mode, from every gated channel's
mean feature map per domain (``feature_maps.py``); higher = more similar across domains = kept.

- ``dss``: the cosine similarity between a channel's mean map over the source images (pooled over the
  sources) and its mean map over the target's images (unlabeled: never its labels). Needs
  ``prune.target_access: unlabeled``. Channels whose maps differ most between the domains go first.
- ``dss_sources``: the same without the target. Each source plays the target in turn: its mean map
  against the pooled mean map of the other sources' images, one similarity per source, reduced by
  ``min`` (default) or ``mean``. ``min`` keeps a channel only if no held-out source moves it: DSS
  prunes channels that move under a domain shift, and one source that moves a channel is evidence of
  that which a mean over the sources that do not would dilute. Needs at least two sources.

``allocation``: ``per_layer`` (the authors': the same share of every layer) replaces each channel's
similarity by its rank among the alive channels of its group divided by their number, ``j / a_g``
(1 = the most similar), so that any cut of the schedule's global ranking removes the same share of
every group, to one channel; ``global`` ranks the raw similarities across layers.

For a coupled (residual) group the similarity is the mean of its members' similarities (each member
is a gate site: a normalisation whose outputs meet at the same additions).

Cost per pruning event: one forward, without gradients, of ``images`` images of every source (and of
the target for ``dss``); the images are drawn once per run, so every event sees the same images.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dgprune.pruning.criterion_spec import CriterionSpec, EventParams, ScoreInputs, require
from dgprune.pruning.feature_maps import FeatureMaps

Allocation = Literal["per_layer", "global"]


class DssParams(EventParams):
    allocation: Allocation = Field(
        "per_layer",
        description="per_layer: the same share of every layer (the authors'); global: across layers",
    )


class DssSourcesParams(DssParams):
    reduce: Literal["min", "mean"] = Field(
        "min", description="over the sources, each against the others pooled: min (default) or mean"
    )


def dss_similarity(maps: FeatureMaps) -> torch.Tensor:
    """[M] cosine similarity of each channel's pooled source map and target map."""
    if not maps.has_target:
        raise ValueError("dss needs the target's feature maps (prune.target_access unlabeled)")
    target = maps.domain_mask(maps.num_sources) * maps.counts
    return maps.cosine(maps.pooled(maps.source_weights()), maps.pooled(target))


def dss_sources_similarities(maps: FeatureMaps) -> torch.Tensor:
    """[N, M]: per source i, the similarity of its mean map and the other sources' pooled mean map."""
    if maps.num_sources < 2:
        raise ValueError("dss_sources needs at least two source domains")
    rows = [
        maps.cosine(maps.pooled(maps.domain_mask(i)), maps.pooled(maps.source_weights(exclude=i)))
        for i in range(maps.num_sources)
    ]
    return torch.stack(rows)


def per_layer_ranks(scores: torch.Tensor, gates: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """[M] each alive channel's rank within its group (ascending, 1-based, ties by position) divided by
    the group's alive count; 0 for pruned channels."""
    out = torch.zeros_like(scores)
    start = 0
    for size in sizes:
        part, alive = scores[start : start + size], gates[start : start + size] > 0
        positions = torch.nonzero(alive).flatten()
        if len(positions):
            order = positions[torch.argsort(part[positions], stable=True)]
            ranks = torch.arange(1, len(order) + 1, dtype=scores.dtype, device=scores.device)
            out[start + order] = ranks / len(order)
        start += size
    return out


def allocate(
    similarity: torch.Tensor, maps: FeatureMaps, gates: torch.Tensor, allocation: str
) -> torch.Tensor:
    if allocation == "global":
        return similarity
    sizes = [group[0].shape[1] for group in maps.maps]
    return per_layer_ranks(similarity, gates.to(similarity.device), sizes)


def _dss(inputs: ScoreInputs, params: DssParams) -> torch.Tensor:
    maps = require(inputs.feature_maps, "feature_maps")
    return allocate(dss_similarity(maps), maps, inputs.gates, params.allocation)


def _dss_sources(inputs: ScoreInputs, params: DssSourcesParams) -> torch.Tensor:
    maps = require(inputs.feature_maps, "feature_maps")
    sims = dss_sources_similarities(maps)
    reduced = sims.min(dim=0).values if params.reduce == "min" else sims.mean(dim=0)
    return allocate(reduced, maps, inputs.gates, params.allocation)


DSS = CriterionSpec(
    "dss", _dss, DssParams, needs=frozenset({"feature_maps", "target_images"}), scored="per_pruning_event"
)
DSS_SOURCES = CriterionSpec(
    "dss_sources",
    _dss_sources,
    DssSourcesParams,
    min_domains=2,  # each source against the others pooled
    needs=frozenset({"feature_maps"}),
    scored="per_pruning_event",
)
