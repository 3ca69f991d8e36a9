"""Prunable channel groups, found with Torch-Pruning's dependency graph.

A *channel group* is a set of channels that must be removed together: a conv's output
channels, the normalisation that follows it and the next layers' input channels; for a
residual stage, every conv whose output meets at the same additions. Each group gets one
gate vector (see ``gates.py``), applied at the group's *gate sites*: the output of every
normalisation layer in the group (or of the conv itself when it has no normalisation),
i.e. after normalisation and before the non-linearity or the residual addition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn

from dgprune.models.features import find_classifier
from dgprune.models.group_norm import CUSTOM_PRUNERS

Scope = Literal["all", "internal"]
SCOPES: tuple[str, ...] = ("all", "internal")
NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm)


@dataclass(frozen=True)
class MemberChannels:
    """One module of a group, and which of its channels each group position maps to."""

    module_name: str
    channel_index: tuple[int, ...]  # channel_index[p] = this module's channel for group position p


@dataclass(frozen=True)
class ChannelGroup:
    """A set of coupled channels that share one gate; positions are the root layer's channels."""

    name: str  # the root conv's module name, stable across runs for the same architecture
    size: int
    gate_sites: tuple[MemberChannels, ...]  # where the gate multiplies outputs
    convs: tuple[MemberChannels, ...]  # convs whose *output* filters belong to the group
    norms: tuple[MemberChannels, ...]  # normalisation layers of the group
    residual: bool  # True when several convs feed the same channels (coupled by additions)
    # convs and linear layers whose *input* channels are the group's (what a budget in params, MACs or
    # latency prices: pruning/cost_model.py)
    consumers: tuple[MemberChannels, ...] = ()


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Trace the model. Must run with autograd on (Torch-Pruning follows grad_fn) and no gate hooks.

    Torch-Pruning switches the model to eval mode while tracing; the caller's modes are restored.
    """
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, customized_pruners=CUSTOM_PRUNERS, verbose=False
            )
    finally:
        for module, training in modes.items():
            module.train(training)


def _is_out_channel_fn(graph: tp.DependencyGraph, handler: object) -> bool:
    # Handlers are bound methods: compare with ==, never `is`.
    return any(handler == fn for fn in graph._out_channel_pruning_fn)


def _is_in_channel_fn(graph: tp.DependencyGraph, handler: object) -> bool:
    return any(handler == fn for fn in graph._in_channel_pruning_fn)


def find_channel_groups(
    model: nn.Module, example_input: torch.Tensor, scope: Scope = "all"
) -> list[ChannelGroup]:
    """All prunable conv channel groups of ``model``, in a deterministic order.

    ``scope="internal"`` keeps only groups fed by a single conv (inside residual blocks);
    ``scope="all"`` also prunes residual-coupled stage channels.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    graph = build_dependency_graph(model, example_input)
    names = {module: name for name, module in model.named_modules()}
    classifier = find_classifier(model)
    groups: list[ChannelGroup] = []
    for tp_group in graph.get_all_groups(ignored_layers=[classifier], root_module_types=[nn.Conv2d]):
        group = _describe_group(graph, tp_group, names)
        if group is None or (scope == "internal" and group.residual):
            continue
        groups.append(group)
    groups.sort(key=lambda g: _module_order(model, g.name))
    return groups


def _module_order(model: nn.Module, name: str) -> int:
    return [n for n, _ in model.named_modules()].index(name)


def _describe_group(graph: tp.DependencyGraph, tp_group, names: dict[nn.Module, str]) -> ChannelGroup | None:
    root_dep, root_idxs = tp_group[0]
    size = len(root_idxs)
    # Re-derive the group from its root so every member carries (member idx, root idx) pairs.
    tp_group = graph.get_pruning_group(root_dep.target.module, root_dep.handler, list(range(size)))
    convs: list[MemberChannels] = []
    norms: list[MemberChannels] = []
    consumers: list[MemberChannels] = []
    for item in tp_group.items:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        if (
            module in names
            and isinstance(module, nn.Conv2d | nn.Linear)
            and _is_in_channel_fn(graph, dep.handler)
        ):
            consumers.append(MemberChannels(names[module], tuple(idxs)))
        if module not in names or not _is_out_channel_fn(graph, dep.handler):
            continue
        if len(idxs) != size:  # a member that sees only part of the group (e.g. a split): not gated
            continue
        index = [0] * size
        for member_idx, root_idx in zip(idxs, item.root_idxs, strict=True):
            index[root_idx] = member_idx
        member = MemberChannels(names[module], tuple(index))
        if isinstance(module, nn.Conv2d):
            convs.append(member)
        elif isinstance(module, NORM_TYPES):
            norms.append(member)
    if not convs:
        return None
    root_name = names[root_dep.target.module]
    # Gate after normalisation when the group has it; a group of plain convs is gated at the conv.
    sites = tuple(norms) if norms else tuple(convs)
    return ChannelGroup(
        name=root_name,
        size=size,
        gate_sites=sites,
        convs=tuple(convs),
        norms=tuple(norms),
        residual=len(convs) > 1,
        consumers=tuple(consumers),
    )
