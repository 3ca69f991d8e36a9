"""Weight-based statistics per prunable channel, for the magnitude criteria (l1, bn_scale)."""

from __future__ import annotations

import torch
from torch import nn

from dgprune.pruning.groups import ChannelGroup


@torch.no_grad()
def weight_statistics(model: nn.Module, groups: list[ChannelGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat [M] tensors: sum over a group's convs of each output filter's L1 norm, and sum of |gamma|.

    Coupled channels (a residual stage) add up their members, as the group's gate does.
    """
    modules = dict(model.named_modules())
    l1_parts, scale_parts = [], []
    for group in groups:
        device = next(model.parameters()).device
        l1 = torch.zeros(group.size, device=device)
        for member in group.convs:
            weight = modules[member.module_name].weight
            per_filter = weight.abs().flatten(1).sum(dim=1)
            l1 += per_filter[list(member.channel_index)]
        scale = torch.zeros(group.size, device=device)
        for member in group.norms:
            norm = modules[member.module_name]
            if getattr(norm, "weight", None) is not None:
                scale += norm.weight.abs()[list(member.channel_index)]
        l1_parts.append(l1)
        scale_parts.append(scale)
    return torch.cat(l1_parts), torch.cat(scale_parts)
