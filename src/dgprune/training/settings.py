"""Validated settings of the training stages (pretraining, pruning + fine-tuning)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dgprune.algorithms import ALGORITHMS, OPTIMISER_KEYS, DataKind, default_hparams, optimiser_defaults
from dgprune.errors import ConfigError
from dgprune.names import SPELLING_NOTE, canonical_name
from dgprune.pruning.budget import BudgetSettings
from dgprune.pruning.criteria import (
    CRITERIA,
    REGISTRY,
    criterion_param_defaults,
    criterion_param_names,
    validate_criterion_params,
)
from dgprune.pruning.schedule import RoundMode
from dgprune.pruning.scoring import BnMode

# What of the target domain a run may see (docs/criteria.md, "The unlabeled-target setting").
TargetAccess = Literal["none", "unlabeled"]
TARGET_ACCESS: tuple[str, ...] = ("none", "unlabeled")


# Upper bounds (docs/experiments.md, "Limits"): far beyond any real run but finite, so that a typo or a
# hostile value (steps: 1e26, lr: 1e39) is one error line here, not a run "for 8e24 s" or a float32
# overflow inside the optimiser (Adam's first step is 10 x lr; float32 ends at 3.4e38).
MAX_COUNT = 10**9  # steps, batch sizes, intervals
MAX_RATE = 1e6  # learning rates and weight decays
MAX_SEED = 2**63 - 1  # seeds: int64 (SQLite, torch); not negative (NumPy's generators refuse them)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not silently ignored


def _check_hparams_seed(hparams: dict[str, Any], where: str) -> None:
    """An algorithm's ``seed`` hyper-parameter (Mixup's NumPy generator) is a seed like the run's."""
    seed = hparams.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed <= MAX_SEED):
        raise ConfigError(f"{where}.seed must be a whole number between 0 and {MAX_SEED}, got {seed!r}")


def _known_algorithm(value: str) -> str:
    """The canonical name (``ERM``, ``VREx`` -> ``erm``, ``vrex``): run ids do not depend on spelling."""
    found = canonical_name(value, ALGORITHMS)
    if found is None:
        raise ValueError(f"must be one of {', '.join(ALGORITHMS)} ({SPELLING_NOTE})")
    return found


class PretrainSettings(_Strict):
    """Pretraining with a DG algorithm (Adam). lr, weight_decay and batch_size that a run config does not
    set are the algorithm registry's defaults for the dataset's kind (``with_defaults_for``, applied by
    ``RunConfig``: DomainBed's lr 1e-3 and 64 per domain for MNIST-type data, lr 5e-5 and 32 for
    images); on their own these settings hold the MNIST-type values."""

    algorithm: str = Field("erm", description=f"one of {', '.join(ALGORITHMS)}")
    hparams: dict[str, float | int | None] = Field(
        default_factory=dict, description="the algorithm's own hyper-parameters (see docs/algorithms.md)"
    )
    steps: int = Field(
        5000, ge=1, le=MAX_COUNT, description="training steps (one mini-batch per source domain each)"
    )
    batch_size: int = Field(
        64,
        ge=1,
        le=MAX_COUNT,
        description="mini-batch size per source domain (default by data kind: mnist 64, image 32)",
    )
    lr: float = Field(
        1e-3,
        gt=0,
        le=MAX_RATE,
        description="Adam learning rate (default by data kind: mnist 1e-3, image 5e-5)",
    )
    weight_decay: float = Field(0.0, ge=0, le=MAX_RATE, description="Adam's weight decay (default 0)")
    eval_every: int = Field(
        100, ge=1, le=MAX_COUNT, description="steps between intra-domain validations (checkpoints)"
    )

    @field_validator("algorithm")
    @classmethod
    def _check_algorithm(cls, value: str) -> str:
        return _known_algorithm(value)

    @model_validator(mode="after")
    def _check_hparams(self) -> PretrainSettings:
        """``hparams`` holds the algorithm's own keys (and ``seed``): an optimiser setting there would be
        silently overridden by its field, an unknown key would fail only when the run starts."""
        for key in self.hparams:
            if key in OPTIMISER_KEYS:
                raise ConfigError(f"pretrain.hparams.{key}: set pretrain.{key} instead")
        valid = sorted(set(default_hparams(self.algorithm)) - set(OPTIMISER_KEYS))
        unknown = sorted(set(self.hparams) - set(valid))
        if unknown:
            raise ConfigError(
                f"pretrain.hparams: unknown hyper-parameter {unknown[0]!r} for algorithm {self.algorithm!r}; "
                f"valid: {', '.join(valid)}"
            )
        _check_hparams_seed(self.hparams, "pretrain.hparams")
        return self

    def with_defaults_for(self, data_kind: DataKind) -> PretrainSettings:
        """These settings with the optimiser settings (lr, weight_decay, batch_size) that were not given
        taken from the algorithm registry's defaults for ``data_kind``; given ones win."""
        defaults = optimiser_defaults(self.algorithm, data_kind)
        missing = {key: value for key, value in defaults.items() if key not in self.model_fields_set}
        return self.model_copy(update=missing) if missing else self


class PruneSettings(_Strict):
    """Iterative pruning with fine-tuning (paper A.3: SGD lr 1e-3, momentum 0.9, batch 64)."""

    criterion: str = Field("ior", description=f"one of {', '.join(CRITERIA)}")
    finetune_algorithm: str = Field(
        "erm", description="objective while pruning + fine-tuning (paper: erm); IoR's risks stay plain CE"
    )
    finetune_hparams: dict[str, float | int | None] = Field(
        default_factory=dict, description="hyper-parameters of the fine-tuning objective"
    )
    criterion_params: dict[str, Any] = Field(
        default_factory=dict,
        description="the criterion's own parameters, e.g. ior: {alpha: 1, alpha_mode: fixed, share: 1} "
        "(see docs/criteria.md); defaults filled in",
    )
    bn_mode: BnMode = Field(
        "per_domain",
        description="train-mode BatchNorm while pruning: per_domain normalises each source alone, "
        "mixed normalises over all sources (as pretraining; N extra gate backward passes)",
    )
    keep_ratio: float = Field(0.5, gt=0, le=1, description="share of prunable filters that remain")
    target_access: TargetAccess = Field(
        "none",
        description="none: the plain DG protocol, nothing of the target; unlabeled: the target's images "
        "(never its labels) are given to the criteria that need them (dss, target_entropy)",
    )
    scope: Literal["all", "internal"] = Field("all", description="all: also residual-coupled channels")
    interval: int = Field(30, ge=1, le=MAX_COUNT, description="mini-batches between pruning steps")
    max_per_step: int = Field(100, ge=1, le=MAX_COUNT, description="most filters removed per pruning step")
    round_to: int = Field(
        1,
        ge=1,
        le=MAX_COUNT,
        description="make each layer's final width a multiple of this (8: faster convolutions); "
        "filters kept may then differ slightly from keep_ratio",
    )
    round_mode: RoundMode = Field(
        "budget",
        description="how round_to picks the widths: budget (the total nearest the target, blocks of "
        "round_to channels chosen by score mass across layers) or per_layer (each layer rounded alone)",
    )
    max_layer_prune: float | None = Field(
        None,
        gt=0,
        le=1,
        description="most share of any one layer's channels that may be pruned, e.g. 0.9 (null or 1: no "
        "limit, as the paper's global ranking); keeps the ranking from emptying the widest layers",
    )
    budget: BudgetSettings | None = Field(
        None,
        description="what the pruned model may cost, in the user's units: {metric: params | macs | "
        "latency, ratio: 0.3} (or 'latency=0.3'), for latency also runtime (torch | onnxruntime), threads, "
        "batch_size; null: filters at keep_ratio (filters=R is keep_ratio R). With a budget keep_ratio "
        "stays at its default (docs/method.md, Budgets)",
    )
    ema: float = Field(0.9, ge=0, lt=1, description="momentum of the score moving average across intervals")
    steps: int = Field(
        3000,
        ge=1,
        le=MAX_COUNT,
        description="fine-tuning steps in all (extended if pruning needs more to reach the target)",
    )
    batch_size: int = Field(64, ge=1, le=MAX_COUNT, description="mini-batch size per source domain")
    lr: float = Field(1e-3, gt=0, le=MAX_RATE, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, le=MAX_RATE)
    eval_every: int = Field(
        100, ge=1, le=MAX_COUNT, description="steps between validations once at the target"
    )

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, value: str) -> str:
        found = canonical_name(value, REGISTRY)  # the registry now, with criteria registered at run time
        if found is None:
            raise ValueError(f"must be one of {', '.join(REGISTRY)}, got {value!r}")
        return found

    @field_validator("finetune_algorithm")
    @classmethod
    def _check_finetune_algorithm(cls, value: str) -> str:
        return _known_algorithm(value)

    @model_validator(mode="before")
    @classmethod
    def _place_criterion_params(cls, data: Any) -> Any:
        """Old configs (and every file `dgprune config` wrote) set ``alpha`` at the top: it moves into
        ``criterion_params``. A parameter at its default that the chosen criterion does not take (what
        a dumped IoR config holds after ``--criterion taylor``) is dropped; any other is an error."""
        if not isinstance(data, dict):
            return data
        criterion = data.get("criterion", cls.model_fields["criterion"].default)
        if isinstance(criterion, str):
            criterion = canonical_name(criterion, REGISTRY) or criterion
        if criterion not in REGISTRY:
            data = dict(data)
            data.pop("alpha", None)
            return data  # the criterion's own validator reports it
        params = data.get("criterion_params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"prune.criterion_params must be a mapping of name: value, got {params!r}")
        params = dict(params)
        if "alpha" in data:
            alpha = data["alpha"]
            if "alpha" in params and params["alpha"] != alpha:
                raise ConfigError(
                    f"prune.alpha ({alpha}) and prune.criterion_params.alpha ({params['alpha']}) disagree; "
                    "give alpha in prune.criterion_params only"
                )
            params["alpha"] = alpha
        taken = criterion_param_names(criterion)
        if "alpha" in data and "alpha" not in taken and not _is_some_default("alpha", data["alpha"]):
            takers = [name for name in CRITERIA if "alpha" in criterion_param_names(name)]
            raise ConfigError(
                f"prune.alpha ({data['alpha']}) is a parameter of {', '.join(takers)}, "
                f"not of criterion {criterion!r}; remove it"
            )
        for key in [k for k in params if k not in taken]:
            if _is_some_default(key, params[key]):
                del params[key]
        data = {k: v for k, v in data.items() if k != "alpha"}
        data["criterion_params"] = params
        return data

    @model_validator(mode="after")
    def _check_target_access(self) -> PruneSettings:
        """A criterion that reads the target's images is refused under the plain protocol, before any
        training (the mode is opt-in: it changes what the run may see)."""
        spec = REGISTRY[self.criterion]
        if spec.needs_target_images and self.target_access == "none":
            raise ConfigError(
                f"prune.criterion {self.criterion} reads the target domain's images (unlabeled), which "
                "prune.target_access none forbids; set prune.target_access unlabeled "
                "(--target-access unlabeled)"
            )
        return self

    @model_validator(mode="after")
    def _check_budget(self) -> PruneSettings:
        """``filters=R`` is ``keep_ratio: R`` (the same run, the same id); another budget replaces
        keep_ratio, which must then stay at its default: two sizes of the pruned model are one error."""
        if self.budget is None:
            return self
        if self.budget.metric == "filters":
            given = "keep_ratio" in self.model_fields_set and self.keep_ratio != self.budget.ratio
            if given and self.keep_ratio != DEFAULT_KEEP_RATIO:
                raise ConfigError(
                    f"prune.keep_ratio {self.keep_ratio:g} and prune.budget {self.budget.label()} disagree; "
                    "give one of them"
                )
            self.keep_ratio, self.budget = self.budget.ratio, None
        elif self.keep_ratio != DEFAULT_KEEP_RATIO:
            raise ConfigError(
                f"prune.keep_ratio {self.keep_ratio:g} and prune.budget {self.budget.label()} both set the "
                f"pruned model's size; give one (a budget of filters is --budget filters={self.keep_ratio:g})"
            )
        return self

    @model_validator(mode="after")
    def _check_finetune_seed(self) -> PruneSettings:
        _check_hparams_seed(self.finetune_hparams, "prune.finetune_hparams")
        return self

    @model_validator(mode="after")
    def _check_criterion_params(self) -> PruneSettings:
        try:
            self.criterion_params = validate_criterion_params(self.criterion, self.criterion_params)
        except ConfigError as err:
            raise ConfigError(f"prune.criterion_params: {err}") from None
        return self


DEFAULT_KEEP_RATIO: float = PruneSettings.model_fields["keep_ratio"].default


def _is_some_default(key: str, value: Any) -> bool:
    """Whether ``value`` is the default of parameter ``key`` of some criterion that takes it."""
    for name in CRITERIA:
        defaults = criterion_param_defaults(name)
        if key in defaults and type(value) is not bool and value == defaults[key]:
            return True
    return False
