"""dgprune's domain-aware criteria (Taylor-FO, IoR, ...) as a Torch-Pruning ``Importance``.

``DomainImportance`` is fed from the user's own training loop, one call per step with the per-domain
mini-batches (``update``) or the per-domain losses (``observe`` inside ``domains``), and is then handed
to ``tp.pruner.MetaPruner`` / ``BasePruner`` unchanged as its ``importance``. See docs/torch_pruning.md.

How the per-domain gradients are obtained: exactly as in dgprune's own loop. The importance attaches
dgprune's channel gates (``GateSet``) to the model for the duration of one step only, each domain is
forwarded through its own gate copy (``per_domain_forward_backward``) and one backward pass yields the
exact ``dR_i/dg`` of every domain and channel. Gate gradients are per *channel group* (the gate sits
after the normalisation and covers every coupled conv of a residual stage at once), so no reduction over
a group's layers is needed and the scores are on one scale across layers: Torch-Pruning's global ranking
then ranks exactly what dgprune's schedule ranks. The hooks are removed between steps, so Torch-Pruning
can trace the bare model whenever it wants.

Averaging across steps, as the paper's schedule (``PruningSchedule``): scores are summed over the steps
between two pruning steps (an *interval*) and averaged; an exponential moving average with ``momentum``
runs across intervals (the first interval initialises it). An interval ends at the first importance
call after new observations, i.e. at ``pruner.step()``.

Channel identity across pruning steps: Torch-Pruning physically deletes channels, which renumbers them.
The importance reads the dependency graph's pruning history (every pruned group records its root module
and channel indices) and maps each removal back, by module name and channel index, onto dgprune's flat
channel positions, so the moving average of the surviving channels carries over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from dgprune.errors import ArgumentTypeError, ArgumentValueError, ConfigError, DivergenceError
from dgprune.pruning.criteria import Criterion, ScoreInputs, make_criterion
from dgprune.pruning.gates import GateSet
from dgprune.pruning.groups import SCOPES, ChannelGroup, MemberChannels, find_channel_groups
from dgprune.pruning.scoring import (
    BN_MODES,
    BnMode,
    DomainStep,
    Objective,
    gate_gradients,
    per_domain_forward_backward,
)
from dgprune.pruning.weight_stats import weight_statistics

Batch = tuple[torch.Tensor, torch.Tensor]

_NO_DATA = (
    "DomainImportance has no per-domain data yet: in the training loop call "
    "importance.update([(x_1, y_1), ..., (x_N, y_N)]) with one mini-batch per source domain "
    "(or importance.observe(per-domain losses) inside `with importance.domains(N)`) before pruner.step()"
)


class DomainImportance(tp.importance.Importance):
    """Per-channel importance from exact per-domain gate gradients, for Torch-Pruning's pruners.

    Args:
        model: the model the pruner prunes (the same object).
        example_inputs: an input batch for tracing the channel groups (as for the pruner).
        criterion: a name of ``dgprune.pruning.criteria.CRITERIA`` ("ior", "taylor", ...) or a Criterion.
        params: the criterion's hyperparameters (e.g. ``{"alpha": 1.0}`` for IoR).
        seed: for criteria that draw random numbers.
        momentum: of the moving average across pruning intervals (dgprune's ``ema``).
        scope: "all" or "internal"; with "internal" the groups coupled by residual additions are
            skipped (``__call__`` returns None for them, which Torch-Pruning's pruners skip).
        bn_mode: how ``update`` forwards the domains through train-mode BatchNorm, as dgprune's
            ``prune.bn_mode`` ("per_domain": each domain on its own; "mixed": one concatenated batch).

    Pass the classifier in the pruner's ``ignored_layers``: its outputs are the classes, not a channel
    group, and calling the importance on any group it does not know raises ConfigError. Models with
    dgprune's ``MaskableGroupNorm`` (mnist_cnn) need ``customized_pruners=dgprune.models.CUSTOM_PRUNERS``.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        criterion: str | Criterion = "ior",
        params: Mapping[str, Any] | None = None,
        seed: int = 0,
        momentum: float = 0.9,
        scope: str = "all",
        bn_mode: BnMode = "per_domain",
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"DomainImportance momentum must be in [0, 1), got {momentum}")
        if scope not in SCOPES:
            raise ConfigError(f"DomainImportance scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if bn_mode not in BN_MODES:
            raise ConfigError(
                f"DomainImportance bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}"
            )
        self.criterion = (
            criterion if isinstance(criterion, Criterion) else make_criterion(criterion, params, seed)
        )
        if self.criterion.needs_loss_changes:
            raise ConfigError(
                f"criterion {self.criterion.name!r} measures one forward per channel and cannot run as a "
                "Torch-Pruning importance; use a gradient criterion such as 'taylor' or 'ior'"
            )
        if getattr(self.criterion, "learner", None) is not None:
            raise ConfigError(
                f"criterion {self.criterion.name!r} trains parameters of its own before pruning and has no "
                "per-step score to feed a Torch-Pruning importance; use a gradient criterion such as 'taylor'"
            )
        if getattr(self.criterion, "scored", "every_step") != "every_step":
            raise ConfigError(
                f"criterion {self.criterion.name!r} is scored once per pruning event from feature maps or "
                "target images (docs/criteria.md), not from per-step gradients; use dgprune prune"
            )
        self.model = model
        self.momentum = momentum
        self.bn_mode = bn_mode
        self._input_dims = example_inputs.dim()  # what update() checks its inputs against
        all_groups = find_channel_groups(model, example_inputs, scope="all")
        self.groups = [g for g in all_groups if scope == "all" or not g.residual]
        if not self.groups:
            raise ConfigError(f"the model has no prunable conv channel groups (scope={scope!r})")
        # Members of groups left out by the scope: the importance answers None for them (skipped).
        self._skipped = {
            m.module_name for g in all_groups if g not in self.groups for m in (*g.convs, *g.norms)
        }
        self._offsets = [0]
        for group in self.groups:
            self._offsets.append(self._offsets[-1] + group.size)
        self.total = self._offsets[-1]
        # Each member module (conv output or normalisation) -> its group and channel map.
        self._owner: dict[str, tuple[int, MemberChannels]] = {
            member.module_name: (index, member)
            for index, group in enumerate(self.groups)
            for member in (*group.convs, *group.norms)
        }
        self._alive = torch.ones(self.total, dtype=torch.bool)  # flat positions still in the model
        self.ema: torch.Tensor | None = None  # flat [M] moving average of the interval means
        self._sum = torch.zeros(self.total, dtype=torch.float64)
        self._count = 0
        self._graphs: list[tp.DependencyGraph] = []  # the pruners' graphs whose history we follow
        self._history_seen: list[int] = []
        self._open: GateSet | None = None  # the gates of a `domains()` block in progress
        self._refresh()

    # ---- feeding: one call per training step ---------------------------------------------------
    def update(
        self,
        batches: Sequence[Batch],
        objective: Objective | None = None,
        val_batches: Sequence[Batch] | None = None,
    ) -> DomainStep:
        """Forward each domain's mini-batch through its own gates, backpropagate, record the scores.

        This *is* the training step's forward and backward: parameter gradients are accumulated in
        ``.grad`` (of ``mean_i R_i``, or of ``objective`` as in dgprune's fine-tuning); the caller zeroes
        them before and steps the optimizer after. Returns the step's loss, risks and accuracy counts.
        ``val_batches`` (one held-out source mini-batch per domain) is for criteria that need
        validation gradients (``ior_val``); it trains nothing.

        Checked before anything runs: ``batches`` must be a list (or tuple) of ``(x, y)`` tensor pairs,
        ``x`` of shape [B, ...] and ``y`` the [B] integer labels, on the model's device, with at least
        ``criterion.min_domains`` domains (2 for a criterion that compares them). Otherwise
        ``ArgumentTypeError`` (a TypeError) or ``ArgumentValueError`` (a ValueError), both ConfigError,
        saying what was expected and what came.
        """
        batches = _checked_batches(batches, "batches", self._device(), self._input_dims)
        minimum = self.criterion.min_domains
        if len(batches) < minimum:
            raise ArgumentValueError(
                f"DomainImportance.update: criterion {self.criterion.name!r} compares the source domains "
                f"and needs a mini-batch of each of at least {minimum}, got {len(batches)} (one domain "
                "has nothing to compare with: use criterion='taylor')"
            )
        if val_batches is not None:
            if not self.criterion.needs_val_gradients:
                raise ConfigError(f"criterion {self.criterion.name!r} does not use val_batches; drop them")
            val_batches = _checked_batches(val_batches, "val_batches", self._device(), self._input_dims)
            if len(val_batches) != len(batches):
                raise ArgumentValueError(
                    f"DomainImportance.update: val_batches must hold one mini-batch per domain of "
                    f"batches, in the same order: got {len(val_batches)} for {len(batches)} domains"
                )
        elif self.criterion.needs_val_gradients:
            raise ConfigError(
                f"criterion {self.criterion.name!r} needs update(batches, val_batches=[...]) with one "
                "held-out source-validation mini-batch per domain"
            )
        gates = self._gates()
        gates.attach()
        val = None
        try:
            step = per_domain_forward_backward(self.model, gates, batches, objective, self.bn_mode)
            if val_batches:  # before the caller's optimizer step, as in dgprune's loop
                val = gate_gradients(self.model, gates, list(val_batches), self.bn_mode)
        finally:
            gates.detach()  # Torch-Pruning must be able to trace the bare model between steps
        self._record(gates, step.domain_grads, step.risks, val)
        return step

    @contextmanager
    def domains(self, num_domains: int) -> Iterator[Callable[[int], AbstractContextManager[None]]]:
        """For a loop that computes its own per-domain losses: forward domain ``i`` inside
        ``with domain(i):`` and pass the losses to ``observe`` before leaving the block (each domain
        goes through its own gate copy, so train-mode BatchNorm sees it on its own, whatever
        ``bn_mode``; a batch mixing domains may pass a [B] tensor of sample domains to ``domain``)::

            with importance.domains(len(batches)) as domain:
                risks = []
                for i, (x, y) in enumerate(batches):
                    with domain(i):
                        risks.append(F.cross_entropy(model(x), y))
                importance.observe(risks)
            torch.stack(risks).mean().backward()
        """
        minimum = self.criterion.min_domains
        if isinstance(num_domains, bool) or not isinstance(num_domains, int):
            raise ArgumentTypeError(
                f"DomainImportance.domains: num_domains must be an int, got {num_domains!r}"
            )
        if num_domains < minimum:
            raise ArgumentValueError(
                f"DomainImportance.domains needs num_domains >= {minimum}"
                + (f" (criterion {self.criterion.name!r} compares the domains)" if minimum > 1 else "")
                + f", got {num_domains}"
            )
        gates = self._gates()
        gates.attach()
        gates.begin_scoring(num_domains)
        self._open = gates
        try:
            yield gates.domain
        finally:
            self._open = None
            gates.end_scoring()
            gates.detach()

    def observe(self, risks: Sequence[torch.Tensor]) -> None:
        """Record one step's scores from the per-domain losses ``risks[i]`` (domain i's mean loss,
        computed inside ``with domain(i)`` of the enclosing ``domains`` block). The graph is kept, so
        the caller can backpropagate its own training loss afterwards."""
        gates = self._open
        if self.criterion.needs_val_gradients:
            raise ConfigError(
                f"criterion {self.criterion.name!r} needs validation gradients: use update(..., val_batches)"
            )
        if gates is None:
            raise ConfigError(
                "DomainImportance.observe(risks) must be called inside `with importance.domains(N)`"
            )
        copies = gates.domain_gate_tensors()
        if len(risks) != copies[0].shape[0]:
            raise ConfigError(f"observe got {len(risks)} losses for {copies[0].shape[0]} domains")
        risk_vector = torch.stack([r.reshape(()) for r in risks])
        # d(sum R)/d(copy i) = dR_i/dg, since domain i's loss only sees its own gate copy.
        grads = torch.autograd.grad(risk_vector.sum(), copies, retain_graph=True, allow_unused=True)
        domain_grads = torch.cat(
            [torch.zeros_like(c) if g is None else g for g, c in zip(grads, copies, strict=True)], dim=1
        )
        self._record(gates, domain_grads.detach(), risk_vector.detach())

    # ---- Torch-Pruning's interface ---------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        """Importance of the group's root channels, in the order of ``group[0].idxs``."""
        graph = getattr(group, "_DG", None)
        if graph is not None and not any(graph is g for g in self._graphs):
            self._graphs.append(graph)
            self._history_seen.append(len(graph.pruning_history()))
        self._sync()
        if self.ema is None and self._count == 0:
            raise ConfigError(_NO_DATA)
        self._end_interval()
        assert self.ema is not None
        root_channels = list(group[0].idxs)
        for item in group.items:
            name = self._names.get(item.dep.target.module)
            if name is None or not _is_out_channels(graph, item.dep.handler, item.dep.target.module):
                continue
            if name in self._skipped:
                return None
            if name not in self._owner:
                continue
            channel_of_root = dict(zip(item.root_idxs, item.idxs, strict=True))
            if not all(r in channel_of_root for r in root_channels):
                continue
            positions = self._position_of[name][[channel_of_root[r] for r in root_channels]]
            return self.ema[positions].clone()
        root = group[0].dep.target.module
        root_name = self._names.get(root, type(root).__name__)
        raise ConfigError(
            f"Torch-Pruning group rooted at {root_name!r} ({type(root).__name__}) is not one of "
            "DomainImportance's conv channel groups; pass that layer (e.g. the classifier) in the "
            "pruner's ignored_layers, or build the importance on the model the pruner prunes"
        )

    # ---- state -------------------------------------------------------------------------------
    @property
    def alive(self) -> torch.Tensor:
        """[M] bool: which flat channel positions (dgprune's order, see ``groups``) the model still has."""
        self._sync()
        return self._alive.clone()

    @property
    def scores(self) -> torch.Tensor | None:
        """The current moving average over every flat channel position (dgprune's order), or None."""
        return None if self.ema is None else self.ema.clone()

    def _end_interval(self) -> None:
        if self._count == 0:
            return
        interval_mean = self._sum / self._count
        if self.ema is None:
            self.ema = interval_mean
        else:
            self.ema = self.momentum * self.ema + (1.0 - self.momentum) * interval_mean
        self._sum = torch.zeros_like(self._sum)
        self._count = 0

    def _record(
        self,
        gates: GateSet,
        domain_grads: torch.Tensor,
        risks: torch.Tensor,
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Score every flat position (pruned ones have gate 0, as in dgprune's masked model)."""
        device = domain_grads.device
        positions = self._current_positions.to(device)

        def full(grads: torch.Tensor) -> torch.Tensor:  # [N, M current] -> [N, M], zeros where pruned
            out = grads.new_zeros(grads.shape[0], self.total)
            out[:, positions] = grads
            return out

        filter_l1 = norm_scale = None
        if self.criterion.needs_weights:
            l1, scale = weight_statistics(self.model, gates.groups)
            filter_l1 = l1.new_zeros(self.total).index_copy(0, positions.to(l1.device), l1)
            norm_scale = scale.new_zeros(self.total).index_copy(0, positions.to(scale.device), scale)
        inputs = ScoreInputs(
            gates=self._alive.to(device).float(),
            domain_grads=full(domain_grads),
            risks=risks,
            filter_l1=filter_l1,
            norm_scale=norm_scale,
            val_risks=None if val is None else val[0],
            val_domain_grads=None if val is None else full(val[1]),
        )
        scores = self.criterion.score(inputs).detach().to("cpu", torch.float64)
        if not torch.isfinite(scores).all():
            raise DivergenceError(f"criterion {self.criterion.name!r} gave non-finite channel scores")
        self._sum += scores
        self._count += 1

    # ---- channel bookkeeping across physical pruning ------------------------------------------
    def _device(self) -> torch.device | None:
        """Where the model's parameters are (None for a model without any)."""
        parameter = next(self.model.parameters(), None)
        return None if parameter is None else parameter.device

    def _gates(self) -> GateSet:
        if self._open is not None:
            raise ConfigError("a `with importance.domains(N)` block is still open")
        self._sync()
        return GateSet(self.model, self._current_groups)

    def _sync(self) -> None:
        """Apply the removals recorded in the pruners' histories since the last call, then check widths."""
        for index, graph in enumerate(self._graphs):
            history = graph.pruning_history()
            for name, is_out, idxs in history[self._history_seen[index] :]:
                self._apply_removal(name, bool(is_out), list(idxs))
            self._history_seen[index] = len(history)
        for name, (group_index, _) in self._owner.items():
            width = _out_width(self._modules[name])
            expected = int(self._alive[self._offsets[group_index] : self._offsets[group_index + 1]].sum())
            if width != expected:
                raise ConfigError(
                    f"layer {name!r} has {width} output channels but DomainImportance expects {expected}: "
                    "the model was pruned by something whose Torch-Pruning history it has not seen; prune "
                    "only with pruners that use this importance (pruner.step() or the groups it yields)"
                )

    def _apply_removal(self, name: str, is_out: bool, idxs: list[int]) -> None:
        if name not in self._owner or not idxs:
            return  # a group this importance does not score; the width check catches any overlap
        module = self._modules[name]
        if not is_out and isinstance(module, nn.Conv2d):
            return  # a conv's input channels belong to another group; the width check catches it
        positions = self._position_of[name][idxs]
        self._alive[positions] = False
        self._refresh()  # later history entries index the channels as they are after this removal

    def _refresh(self) -> None:
        """Rebuild the current (pruned) model's groups and the maps channel -> flat position."""
        self._modules = dict(self.model.named_modules())
        self._names = {module: name for name, module in self._modules.items()}
        self._position_of: dict[str, torch.Tensor] = {}
        current_groups: list[ChannelGroup] = []
        current_positions: list[torch.Tensor] = []
        for index, group in enumerate(self.groups):
            offset = self._offsets[index]
            alive = torch.nonzero(self._alive[offset : offset + group.size]).flatten().tolist()

            def current(
                member: MemberChannels, alive: list[int] = alive, offset: int = offset
            ) -> MemberChannels:
                # The pruned module keeps its surviving channels in their original order.
                ranked = sorted(alive, key=lambda p: member.channel_index[p])
                rank = {p: r for r, p in enumerate(ranked)}
                self._position_of[member.module_name] = torch.tensor([offset + p for p in ranked])
                return MemberChannels(member.module_name, tuple(rank[p] for p in alive))

            convs = tuple(current(m) for m in group.convs)
            norms = tuple(current(m) for m in group.norms)
            by_name = {m.module_name: m for m in (*convs, *norms)}
            sites = tuple(by_name[s.module_name] for s in group.gate_sites)
            current_groups.append(ChannelGroup(group.name, len(alive), sites, convs, norms, group.residual))
            current_positions.append(torch.tensor(alive, dtype=torch.long) + offset)
        self._current_groups = current_groups
        self._current_positions = torch.cat(current_positions)


def _checked_batches(batches: Any, name: str, device: torch.device | None, input_dims: int) -> list[Batch]:
    """``batches`` as a list of per-domain ``(x, y)`` pairs, or an error saying what was expected and
    what came: a wrong one would otherwise fail deep inside the forward, or worse, be unpacked along
    its batch axis and scored as if it were several domains."""
    where = f"DomainImportance.update: {name}"
    expected = "a list of (x, y) mini-batches, one per source domain"
    if isinstance(batches, torch.Tensor | str | bytes | Mapping) or not isinstance(batches, Sequence):
        raise ArgumentTypeError(f"{where}: expected {expected}, got {_describe(batches)}")
    if len(batches) == 2 and all(isinstance(b, torch.Tensor) for b in batches):
        raise ArgumentTypeError(
            f"{where}: expected {expected}, got one (x, y) pair of tensors; for a single domain pass [(x, y)]"
        )
    if not batches:
        raise ArgumentValueError(f"{where}: expected {expected}, got an empty {type(batches).__name__}")
    checked: list[Batch] = []
    for index, batch in enumerate(batches):
        at = f"{where}[{index}]"
        if not isinstance(batch, Sequence) or isinstance(batch, str | bytes) or len(batch) != 2:
            raise ArgumentTypeError(f"{at}: expected an (x, y) pair of tensors, got {_describe(batch)}")
        x, y = batch
        for label, value in (("x", x), ("y", y)):
            if not isinstance(value, torch.Tensor):
                raise ArgumentTypeError(f"{at}: {label} must be a tensor, got {_describe(value)}")
        if x.dim() != input_dims or x.shape[0] == 0:
            raise ArgumentValueError(
                f"{at}: x must be a non-empty batch of {input_dims}-dimensional inputs [B, ...] as the "
                f"example inputs, got shape {tuple(x.shape)}"
            )
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ArgumentValueError(
                f"{at}: y must be the [B] integer class labels, got a {y.dtype} tensor of shape "
                f"{tuple(y.shape)}"
            )
        if y.shape[0] != x.shape[0]:
            raise ArgumentValueError(
                f"{at}: x holds {x.shape[0]} inputs but y {y.shape[0]} labels; they must match"
            )
        if device is not None and (x.device != device or y.device != device):
            raise ArgumentValueError(
                f"{at}: x is on {x.device} and y on {y.device}, the model on {device}; move them there"
            )
        checked.append((x, y))
    return checked


def _describe(value: Any) -> str:
    """What a wrong argument is, in a few words (a tensor by its shape, a container by its length)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Sequence | Mapping) and not isinstance(value, str | bytes):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    return f"a {type(value).__name__}"


def _is_out_channels(graph: tp.DependencyGraph | None, handler: Any, module: nn.Module) -> bool:
    """Does the group item prune the module's outputs? Normalisations: always (their in = out)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
        return True
    if graph is not None:
        return graph.is_out_channel_pruning_fn(handler)
    return getattr(handler, "__name__", "").endswith("out_channels")


def _out_width(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return int(module.weight.shape[0])
