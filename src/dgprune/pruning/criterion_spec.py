"""What a pruning criterion is: the inputs it scores, its declaration (``CriterionSpec``) and its
parameters (a pydantic model). A criterion in a file of its own imports from here (not from
``pruning/criteria.py``, which imports it to register it): docs/architecture.md, "A pruning criterion".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from torch import nn

    from dgprune.pruning.feature_maps import FeatureMaps
    from dgprune.pruning.gates import GateSet

# What a criterion may need besides the per-step inputs of the boolean ``needs_*`` flags
# (docs/architecture.md, "A criterion scored per pruning event"):
# - "feature_maps": ``ScoreInputs.feature_maps``, every gated channel's mean feature map per domain
#   (pruning/feature_maps.py), measured in evaluation mode on a fixed sample of each source's images,
#   and of the target's when "target_images" is needed too;
# - "target_images": the target domain's images, never its labels (``ScoreInputs.probe.target``).
#   Only given under ``prune.target_access: unlabeled``; a config naming such a criterion is refused
#   under ``none`` before any training.
Need = Literal["feature_maps", "target_images"]
NEEDS: tuple[str, ...] = get_args(Need)
# Where a criterion is scored: every training step (scores summed over the interval, then an EMA across
# intervals: pruning/schedule.py), or once per pruning event from a few fixed batches (those scores
# rank the event's channels alone).
Scored = Literal["every_step", "per_pruning_event"]
SCORED: tuple[str, ...] = get_args(Scored)


@dataclass(frozen=True)
class ScoreInputs:
    gates: torch.Tensor  # [M] current gate values (1 alive, 0 pruned)
    domain_grads: torch.Tensor | None = None  # [N, M] G_i,m = dR_i/dg_m
    risks: torch.Tensor | None = None  # [N] per-domain mean cross-entropy
    filter_l1: torch.Tensor | None = None  # [M] sum of |W| over the group's output filters
    norm_scale: torch.Tensor | None = None  # [M] sum of |gamma| over the group's normalisations
    loss_change: torch.Tensor | None = None  # [M] mean risk minus mean risk with the channel removed
    val_domain_grads: torch.Tensor | None = None  # [N, M] dR_i/dg_m on a source-validation batch
    val_risks: torch.Tensor | None = None  # [N] per-domain risks on that validation batch
    # Criteria scored per pruning event (CriterionSpec.scored), by what they need (CriterionSpec.needs):
    feature_maps: FeatureMaps | None = None  # "feature_maps": mean maps per domain of every gated channel
    probe: EventProbe | None = None  # the model and the fixed images of the event, to forward them itself


def contributions(inputs: ScoreInputs) -> torch.Tensor:
    """[N, M] ``c_{i,m} = G_{i,m} g_m``: each domain's first-order Taylor contribution."""
    return require(inputs.domain_grads, "domain_grads") * inputs.gates


def require(value: torch.Tensor | None, name: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"this criterion needs {name}")
    return value


class CriterionParams(BaseModel):
    """Base of a criterion's parameters: frozen, and a misspelt name is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(CriterionParams):
    pass


class EventParams(CriterionParams):
    """Base of the parameters of a criterion scored per pruning event: how many images of each domain
    its inputs are measured on (a sample drawn once per run, seeded, the same at every event)."""

    images: int = Field(256, ge=1, description="images per domain (each source's train split, the target)")


@dataclass(frozen=True)
class EventProbe:
    """The model and fixed images at a pruning event, for a criterion that forwards them itself
    (target_entropy). The model is in evaluation mode with its gates attached; a score function must
    leave parameter gradients, BatchNorm statistics and the model's mode as it found them."""

    model: nn.Module
    gates: GateSet
    sources: list[torch.Tensor]  # per source domain [n, C, H, W], evaluation transform, on the device
    target: torch.Tensor | None = None  # the target's images (no labels), only for needs "target_images"


def plain(function: Callable[[ScoreInputs], torch.Tensor]) -> Callable[[ScoreInputs, Any], torch.Tensor]:
    return lambda inputs, _params: function(inputs)


@dataclass(frozen=True)
class LearnerContext:
    """What a criterion with trainable parameters of its own is built on (see ``CriterionSpec.learner``)."""

    model: nn.Module  # the model about to be pruned; its weights must be left as they are
    gates: GateSet  # attached to the model; flat positions as ScoreInputs'
    keep_ratio: float
    bn_mode: str  # how to forward the sources, as prune.bn_mode
    seed: int


class ParameterLearner(Protocol):
    """A criterion's own trainable parameters (learned_masks' mask logits), trained on the sources before
    any pruning; the training loop checkpoints its ``state_dict`` (plain tensors and numbers)."""

    steps: int  # training steps, each on one mini-batch per source domain
    lr: float  # named when the training diverges

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """One training step; statistics for the progress events, with the objective as ``loss``."""
        ...

    def scores(self) -> torch.Tensor:
        """[M] the learned ranking, higher = kept: the one pruning step goes by it."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class CriterionSpec:
    """Everything about one criterion: its score, its parameters and what must be computed for it."""

    name: str
    score: Callable[[ScoreInputs, Any], torch.Tensor]  # (inputs, validated params) -> [M]
    params: type[CriterionParams] = NoParams
    needs_gradients: bool = False  # per-domain gate gradients of the training batch
    needs_weights: bool = False  # filter L1 norms and normalisation scales
    needs_loss_changes: bool = False  # the oracle: one extra forward per alive channel
    needs_val_gradients: bool = False  # per-domain gate gradients of a source-validation batch
    random: bool = False  # draws from a seeded generator
    # Source domains the score needs to mean what it says: 2 for a score that compares the domains (a
    # variance, a worst or best domain, their agreement), which with one domain reduces to Taylor or a
    # constant. The Torch-Pruning integration refuses fewer (DomainImportance.update).
    min_domains: int = 1
    # Share of the score that is a variance term (IoR family); None: IoR at alpha = 1 is reported.
    variance_share: Callable[[ScoreInputs, Any], float] | None = None
    # Trainable parameters of its own (learned_masks): trained on the sources before pruning, then one
    # pruning step to the target by their scores (``score`` is not called per step).
    learner: Callable[[LearnerContext, Any], ParameterLearner] | None = None
    # Inputs beyond the per-step ones (Need above), and where the score is computed (Scored above). A
    # criterion with needs is scored per_pruning_event, and its params derive from EventParams.
    needs: frozenset[Need] = frozenset()
    scored: Scored = "every_step"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.needs) - set(NEEDS))
        if unknown:
            raise ValueError(f"criterion {self.name!r}: unknown needs {unknown}; valid: {', '.join(NEEDS)}")
        if self.scored not in SCORED:
            raise ValueError(f"criterion {self.name!r}: scored must be one of {', '.join(SCORED)}")
        if self.needs and self.scored != "per_pruning_event":
            raise ValueError(f"criterion {self.name!r}: a criterion with needs is scored per_pruning_event")
        if self.scored == "per_pruning_event" and not issubclass(self.params, EventParams):
            raise ValueError(f"criterion {self.name!r}: its params must derive from EventParams")

    @property
    def needs_target_images(self) -> bool:
        """Whether it reads the target domain's images (refused under prune.target_access none)."""
        return "target_images" in self.needs
