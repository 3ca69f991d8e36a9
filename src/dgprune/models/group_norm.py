"""GroupNorm whose statistics ignore pruned channels, and its Torch-Pruning pruner.

WHY: filter pruning removes channels. With GroupNorm, physically deleting a channel changes the
statistics of its normalisation group, so a masked model (channel zeroed after the norm) and the
physically pruned model would compute different things. `MaskableGroupNorm` normalises each group over
its *alive* channels only: masking a channel and deleting it give the same output for the other
channels, and a model can be masked during the pruning schedule and compressed at the end without any
change in function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc


class MaskableGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` with per-channel group membership and an alive mask.

    Buffers: `group_index` (long [C], each channel's group; initially c // (C // num_groups)) and
    `alive` (float [C], 1 = alive). Dead channels do not enter their group's mean and variance; they are
    still normalised (finite values) and must be masked downstream. Unpruned, it is bit-identical to
    `nn.GroupNorm`; after physical pruning groups may have unequal sizes and `num_groups` is unchanged.
    """

    group_index: torch.Tensor
    alive: torch.Tensor

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        per_group = num_channels // num_groups
        self.register_buffer("group_index", torch.arange(num_channels, device=device) // per_group)
        self.register_buffer("alive", torch.ones(num_channels, device=device))

    @torch.no_grad()
    def set_alive(self, mask: torch.Tensor) -> None:
        """Mark channels alive (nonzero / True) or dead (0 / False); `mask` has one entry per channel."""
        if mask.shape != (self.num_channels,):
            raise ValueError(f"alive mask must have shape ({self.num_channels},), got {tuple(mask.shape)}")
        self.alive.copy_((mask != 0).to(self.alive.dtype))

    def _check_consistent(self) -> None:
        if self.group_index.shape != (self.num_channels,) or self.alive.shape != (self.num_channels,):
            # Typical cause: pruned by torch-pruning's stock GroupNorm pruner, which ignores our buffers.
            raise RuntimeError(
                f"MaskableGroupNorm buffers do not match num_channels={self.num_channels} "
                f"(group_index {tuple(self.group_index.shape)}, alive {tuple(self.alive.shape)}); "
                "prune it with customized_pruners=CUSTOM_PRUNERS"
            )

    def is_plain(self) -> bool:
        """True when it computes exactly what `nn.GroupNorm` does: all alive, equal groups in order."""
        c, g = self.num_channels, self.num_groups
        if c % g != 0 or not bool(self.alive.all()):
            return False
        uniform = torch.arange(c, device=self.group_index.device) // (c // g)
        return bool(torch.equal(self.group_index, uniform))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_consistent()
        # Exporters cannot follow the data-dependent choice below; the general path computes the same.
        exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()
        if not exporting and self.is_plain():
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        # Autocast would run the statistics' matmuls in half precision; keep them in float32 as it
        # does for group_norm itself.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._alive_group_norm(x)

    def _alive_group_norm(self, x: torch.Tensor) -> torch.Tensor:
        # Only ops Torch-Pruning traces as element-wise (no view/reshape/expand/slice), so its dependency
        # graph can be built on a masked or already-pruned model too.
        out_dtype = x.dtype
        xf = x.float()
        groups = torch.arange(self.num_groups, device=x.device)
        member = (self.group_index.unsqueeze(1) == groups.unsqueeze(0)).float()  # [C, G]
        weighted = member * self.alive.float().unsqueeze(1)  # [C, G]: alive members only
        spatial = tuple(range(2, x.dim()))
        numel_per_channel = 1
        for s in x.shape[2:]:
            numel_per_channel *= s
        # An all-dead group has no statistics: count 0 -> mean 0, var 0, output x / sqrt(eps) (finite).
        count = (weighted.sum(0) * numel_per_channel).clamp_min(1.0)  # [G]

        def channel_sums(t: torch.Tensor) -> torch.Tensor:
            return t.sum(dim=spatial) if spatial else t  # [N, C]

        def per_channel(t: torch.Tensor) -> torch.Tensor:  # [N, C] -> broadcastable to x
            for _ in spatial:
                t = t.unsqueeze(-1)
            return t

        mean = (channel_sums(xf) @ weighted) / count  # [N, G]
        centred = xf - per_channel(mean.index_select(1, self.group_index))
        var = (channel_sums(centred * centred) @ weighted) / count  # biased, like GroupNorm
        y = centred * per_channel(torch.rsqrt(var + self.eps).index_select(1, self.group_index))
        if self.affine:
            y = y * per_channel(self.weight.unsqueeze(0)) + per_channel(self.bias.unsqueeze(0))
        return y.to(out_dtype)


class MaskableGroupNormPruner(BasePruningFunc):
    """Torch-Pruning handler for `MaskableGroupNorm`: slices weight, bias, group_index and alive.

    Channel groups are reported as 1, so Torch-Pruning does not force the same number of channels to be
    removed from every normalisation group; any channel may go, and `num_groups` stays as it was.
    """

    TARGET_MODULES = (MaskableGroupNorm,)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, MaskableGroupNorm)
        drop = set(int(i) for i in idxs)
        keep = [i for i in range(layer.num_channels) if i not in drop]
        keep_t = torch.tensor(keep, dtype=torch.long, device=layer.group_index.device)
        layer.num_channels = len(keep)
        if layer.affine:
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.group_index = layer.group_index.index_select(0, keep_t)
        layer.alive = layer.alive.index_select(0, keep_t)
        return layer

    # The same function for inputs and outputs: Torch-Pruning reads that as "in and out channels are
    # coupled" (intra-layer dependency), as for its own norm pruners.
    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.num_channels)

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.num_channels)

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return 1

    def get_in_channel_groups(self, layer: nn.Module) -> int:
        return 1


# Pass as `customized_pruners=` to torch_pruning.DependencyGraph().build_dependency.
CUSTOM_PRUNERS: dict[type[nn.Module], BasePruningFunc] = {MaskableGroupNorm: MaskableGroupNormPruner()}
