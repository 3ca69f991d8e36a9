"""Worked example of docs/architecture.md: a criterion scored once per pruning event, ``steady``.

``steady`` keeps the channels whose mean feature map moves least across the source domains: channel
m's score is ``min_i cos(mu_{i,m}, mu_m)``, the smallest cosine similarity between source i's mean map
of the channel and the mean map over all the sources' images (notation of ``pruning/feature_maps.py``).
It needs the feature maps, not the per-step gate gradients, so it declares ``needs={"feature_maps"}``
and ``scored="per_pruning_event"``, and its parameters derive from ``EventParams`` (``images`` per
domain, measured once per pruning event in evaluation mode).

To ship it, copy this file to ``src/dgprune/pruning/steady.py`` and add its one registry line to
``_SPECS`` in ``src/dgprune/pruning/criteria.py`` (with the import of the module)::

    steady.SPEC,
"""

from __future__ import annotations

import torch

from dgprune.pruning.criterion_spec import CriterionSpec, EventParams, ScoreInputs, require


def steady_scores(inputs: ScoreInputs, params: EventParams) -> torch.Tensor:
    """[M] ``min_i cos(source i's mean map, the sources' pooled mean map)``."""
    maps = require(inputs.feature_maps, "feature_maps")
    pooled = maps.pooled(maps.source_weights())
    per_source = [maps.cosine(maps.pooled(maps.domain_mask(i)), pooled) for i in range(maps.num_sources)]
    return torch.stack(per_source).min(dim=0).values


SPEC = CriterionSpec(
    "steady", steady_scores, EventParams, needs=frozenset({"feature_maps"}), scored="per_pruning_event"
)
