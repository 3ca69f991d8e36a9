"""Mean feature maps of every gated channel, per domain (the input of ``dss`` and ``dss_sources``).

A channel's feature map is the output of its gate site (``groups.py``: the normalisation layer of the
group, or its conv when it has none) *after* the gate, i.e. where the gate defines the channel: after
the BatchNorm / GroupNorm, before the non-linearity and any residual addition. For one domain the
channel's mean map is the mean over the domain's images of that map, flattened over space
(``[H * W]``). The model is forwarded in evaluation mode (BatchNorm with its running statistics), as
DSS's authors score; no gradient is taken and nothing of the model changes.

A coupled (residual) group has one gate but several gate sites: each member (each normalisation whose
outputs meet at the same additions) has its own map of the channel. Similarities are computed per
member and averaged over the members (``FeatureMaps.cosine``), so that every member counts once
whatever its spatial size.

Cost: one forward (no backward) of every image measured; memory: one ``[C, H * W]`` float64 sum per
gate site and domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from dgprune.pruning.gates import GateSet

MapsPerSite = list[list[torch.Tensor]]  # [group][member] -> [C_g, S] (one domain, or pooled domains)


@dataclass(frozen=True)
class FeatureMaps:
    """``maps[g][s]``: ``[D, C_g, S]`` (float64), the mean over domain ``d``'s images of group ``g``'s
    channels (in group position order) at its gate site ``s``, flattened over space. Domains: the
    sources in order, then the target when it was measured."""

    maps: list[list[torch.Tensor]]
    counts: torch.Tensor  # [D] images measured per domain (float64)
    num_sources: int

    @property
    def has_target(self) -> bool:
        return self.counts.numel() > self.num_sources

    def pooled(self, weights: torch.Tensor) -> MapsPerSite:
        """Per site ``sum_d w_d maps[d] / sum_d w_d``: the mean map over the images of the domains
        with ``w_d > 0`` when ``w`` is their image counts (a pooled mean over their images)."""
        w = weights.to(torch.float64)
        w = w / w.sum()
        return [[torch.einsum("d,dcs->cs", w.to(site.device), site) for site in group] for group in self.maps]

    def cosine(self, left: MapsPerSite, right: MapsPerSite) -> torch.Tensor:
        """[M] per channel: the cosine similarity of the two maps, averaged over the group's gate sites;
        0 where either map is all zeros (a pruned channel)."""
        per_group = []
        for left_group, right_group in zip(left, right, strict=True):
            sims = torch.stack([_cosine(a, b) for a, b in zip(left_group, right_group, strict=True)])
            per_group.append(sims.mean(dim=0))
        return torch.cat(per_group)

    def domain_mask(self, index: int) -> torch.Tensor:
        """[D] weights selecting domain ``index`` alone."""
        mask = torch.zeros_like(self.counts)
        mask[index] = 1.0
        return mask

    def source_weights(self, exclude: int | None = None) -> torch.Tensor:
        """[D] the sources' image counts (0 for the target and for source ``exclude``)."""
        weights = self.counts.clone()
        weights[self.num_sources :] = 0.0
        if exclude is not None:
            weights[exclude] = 0.0
        return weights


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[C] row-wise cosine similarity of [C, S] tensors; 0 where a row is all zeros."""
    dot = (a * b).sum(dim=1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norms > 0, dot / torch.where(norms > 0, norms, 1.0), torch.zeros_like(dot))


@torch.no_grad()
def measure_feature_maps(
    model: nn.Module,
    gates: GateSet,
    domains: Sequence[torch.Tensor],
    num_sources: int,
    batch_size: int = 256,
) -> FeatureMaps:
    """Mean maps of every gated channel over each domain's images (``domains``: one ``[n, C, H, W]``
    model-ready tensor per domain, the sources then the target), in evaluation mode. ``gates`` must be
    attached (the maps are taken after the gate: a pruned channel's map is zero)."""
    modules = dict(model.named_modules())
    sums: dict[tuple[int, int], torch.Tensor] = {}
    current = {"domain": 0}

    def record(key: tuple[int, int], index: torch.Tensor, _module: nn.Module, _inputs, output: torch.Tensor):
        channels = output.index_select(1, index.to(output.device))  # [B, C_g, ...] in group position order
        total = channels.to(torch.float64).sum(dim=0).reshape(len(index), -1)
        if key not in sums:
            sums[key] = torch.zeros(len(domains), *total.shape, dtype=torch.float64, device=total.device)
        sums[key][current["domain"]] += total

    handles = []
    for group_idx, group in enumerate(gates.groups):
        for site_idx, site in enumerate(group.gate_sites):
            index = torch.tensor(site.channel_index, dtype=torch.long)
            hook = partial(record, (group_idx, site_idx), index)
            # Registered after the gate's own hook (GateSet.attach), so it sees the gated output.
            handles.append(modules[site.module_name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for domain_idx, images in enumerate(domains):
            current["domain"] = domain_idx
            for start in range(0, len(images), batch_size):
                model(images[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    counts = torch.tensor([float(len(images)) for images in domains], dtype=torch.float64)
    maps = [
        [sums[(g, s)] / counts.to(sums[(g, s)].device).view(-1, 1, 1) for s in range(len(group.gate_sites))]
        for g, group in enumerate(gates.groups)
    ]
    return FeatureMaps(maps, counts, num_sources)
