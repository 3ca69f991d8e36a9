"""Domain-generalisation training algorithms, split into a reusable objective and a pretraining step.

``Algorithm.objective`` turns per-domain forward outputs into the training loss and never touches an
optimiser, so pruning + fine-tuning can evaluate the same objective on outputs of its own (gated)
forwards. ``Algorithm.update`` is one DomainBed pretraining step built on it: forward, objective,
backward, Adam step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dgprune.algorithms.hparams import DataKind, HParam, merge_hparams
from dgprune.errors import ConfigError
from dgprune.models.features import forward_with_features

Minibatches = Sequence[tuple[torch.Tensor, torch.Tensor]]
ForwardFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
ForwardMode = Literal["concat", "per_domain", "none"]


@dataclass
class DomainOutput:
    """One source domain's mini-batch after a forward pass."""

    logits: torch.Tensor  # [n, K]
    features: torch.Tensor  # [n, D]: the classifier's input
    y: torch.Tensor  # [n] class indices


def split_by_domain(
    logits: torch.Tensor, features: torch.Tensor, minibatches: Minibatches
) -> list[DomainOutput]:
    """Per-domain outputs of one forward of the concatenated mini-batches (views, graph kept)."""
    sizes = [len(y) for _, y in minibatches]
    return [
        DomainOutput(lg, ft, y)
        for lg, ft, (_, y) in zip(logits.split(sizes), features.split(sizes), minibatches, strict=True)
    ]


def domain_risks(outputs: Sequence[DomainOutput]) -> torch.Tensor:
    """[N] mean cross-entropy of each domain's mini-batch."""
    return torch.stack([F.cross_entropy(o.logits, o.y) for o in outputs])


class Algorithm:
    """A training algorithm over one mini-batch per source domain.

    Subclasses set ``name``, ``forward_mode`` and ``own_hparams`` and implement ``objective``; state
    other than the model (e.g. GroupDRO's domain weights) goes through ``_extra_state`` /
    ``_load_extra_state``.
    """

    name: ClassVar[str] = "base"
    # True only when `objective` is the mean of the per-domain cross-entropies (ERM, exactly so when the
    # per-domain batches have equal sizes): callers may then use a one-backward shortcut of their own.
    objective_is_mean_risk: ClassVar[bool] = False
    # How `update` produces the outputs, as DomainBed does for that algorithm: one forward of the
    # concatenated batch, one forward per domain, or none (Mixup only forwards mixed inputs).
    # It matters for train-mode BatchNorm, whose statistics depend on which samples share a forward.
    forward_mode: ClassVar[ForwardMode] = "concat"
    # The algorithm's own hyper-parameters (defaults, random-search distributions, docs); the common
    # ones (lr, weight_decay, batch_size, seed) are in algorithms/hparams.py.
    own_hparams: ClassVar[Mapping[str, HParam]] = {}

    def __init__(
        self,
        model: nn.Module,
        num_domains: int,
        hparams: Mapping[str, Any] | None = None,
        *,
        data_kind: DataKind = "image",
    ) -> None:
        # bool is an int: reject it, and floats (the old (model, lr, weight_decay) call order).
        if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 1:
            raise ConfigError(f"num_domains must be a positive int, got {num_domains!r}")
        if hparams is not None and not isinstance(hparams, Mapping):
            raise ConfigError(f"hparams must be a dict or None, got {type(hparams).__name__}")
        self.model = model
        self.num_domains = num_domains
        self.hparams: dict[str, Any] = merge_hparams(
            self.name, self.own_hparams, dict(hparams) if hparams is not None else None, data_kind
        )
        self.optimizer = self._new_optimizer()
        self.step_count = 0  # completed steps; VREx/IRM read it for their penalty annealing

    def _new_optimizer(self) -> torch.optim.Adam:
        return torch.optim.Adam(
            self.model.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )

    # ----------------------------------------------------------------------------------------------
    def objective(
        self, outputs: list[DomainOutput], minibatches: Minibatches, forward: ForwardFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss (scalar, with graph) and float statistics, one entry named ``"loss"``.

        ``outputs[i]`` is domain i's mini-batch ``minibatches[i]`` after a forward pass; ``forward`` maps
        new inputs to ``(logits, features)`` for algorithms that need extra passes (Mixup). It never
        calls an optimiser or ``backward``; algorithm state that DomainBed updates inside its step is
        updated here (see each subclass), so call it once per training step.
        """
        raise NotImplementedError

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        """One DomainBed pretraining step with the algorithm's Adam; returns the objective's statistics."""
        if len(minibatches) != self.num_domains:
            raise ValueError(f"expected {self.num_domains} per-domain mini-batches, got {len(minibatches)}")
        outputs = self._forward_outputs(minibatches)
        loss, stats = self.objective(outputs, minibatches, self._forward)
        self._before_step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return stats

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_with_features(self.model, x)

    def _forward_outputs(self, minibatches: Minibatches) -> list[DomainOutput]:
        if self.forward_mode == "none":
            return []
        if self.forward_mode == "per_domain":
            return [DomainOutput(*self._forward(x), y) for x, y in minibatches]
        logits, features = self._forward(torch.cat([x for x, _ in minibatches]))
        return split_by_domain(logits, features, minibatches)

    def _before_step(self) -> None:
        """Hook between the objective and the optimiser step (VREx/IRM reset Adam here)."""

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimiser, step count and algorithm state; only tensors, numbers, strings, lists and dicts, so
        ``torch.load(weights_only=True)`` reads it back. The model's own state is saved separately."""
        return {
            "name": self.name,
            "optimizer": self.optimizer.state_dict(),
            "step_count": self.step_count,
            "algorithm": self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state of algorithm {state.get('name')!r} cannot be loaded into {self.name!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])
        self._load_extra_state(state["algorithm"])

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass


class AnnealedPenaltyAlgorithm(Algorithm):
    """Penalty weight 1 for the first ``anneal_iters`` steps, then ``lambda``; Adam is re-created at the
    switch, as DomainBed does ("Adam doesn't like the sharp jump in gradient magnitudes")."""

    lambda_key: ClassVar[str]
    anneal_key: ClassVar[str]

    @property
    def penalty_weight(self) -> float:
        """Weight of the penalty at the current step (DomainBed: ``update_count >= anneal_iters``)."""
        if self.step_count >= self.hparams[self.anneal_key]:
            return float(self.hparams[self.lambda_key])
        return 1.0

    def penalised(self, nll: torch.Tensor, penalty: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``nll + w * penalty`` at the current weight, with its parts for the logs."""
        weight = self.penalty_weight
        loss = nll + weight * penalty
        return loss, {
            "loss": float(loss.detach()),
            "nll": float(nll.detach()),
            "penalty": float(penalty.detach()),
            "penalty_weight": weight,
        }

    def _before_step(self) -> None:
        # DomainBed re-creates Adam after computing the loss of step `anneal_iters`, before its backward.
        if self.step_count == self.hparams[self.anneal_key]:
            self.optimizer = self._new_optimizer()
