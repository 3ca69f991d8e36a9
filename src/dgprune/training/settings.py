"""Validated settings of the training stages (pretraining, pruning + fine-tuning)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dgprune.algorithms import ALGORITHMS
from dgprune.pruning.criteria import CRITERIA


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not silently ignored


def _known_algorithm(value: str) -> str:
    if value not in ALGORITHMS:
        raise ValueError(f"must be one of {', '.join(ALGORITHMS)}, got {value!r}")
    return value


class PretrainSettings(_Strict):
    """Pretraining with a DG algorithm; DomainBed's MNIST-type defaults (Adam, lr 1e-3, 64 per domain)."""

    algorithm: str = Field("erm", description=f"one of {', '.join(ALGORITHMS)}")
    hparams: dict[str, float | int | None] = Field(
        default_factory=dict, description="the algorithm's own hyper-parameters (see docs/algorithms.md)"
    )
    steps: int = Field(5000, ge=1, description="training steps (one mini-batch per source domain each)")
    batch_size: int = Field(64, ge=1, description="mini-batch size per source domain")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(100, ge=1, description="steps between intra-domain validations (checkpoints)")

    @field_validator("algorithm")
    @classmethod
    def _check_algorithm(cls, value: str) -> str:
        return _known_algorithm(value)


class PruneSettings(_Strict):
    """Iterative pruning with fine-tuning (paper A.3: SGD lr 1e-3, momentum 0.9, batch 64)."""

    criterion: str = Field("ior", description=f"one of {', '.join(CRITERIA)}")
    finetune_algorithm: str = Field(
        "erm", description="objective while pruning + fine-tuning (paper: erm); IoR's risks stay plain CE"
    )
    finetune_hparams: dict[str, float | int | None] = Field(
        default_factory=dict, description="hyper-parameters of the fine-tuning objective"
    )
    alpha: float = Field(1.0, ge=0, description="weight of IoR's variance term (paper: 1)")
    keep_ratio: float = Field(0.5, gt=0, le=1, description="share of prunable filters that remain")
    scope: Literal["all", "internal"] = Field("all", description="all: also residual-coupled channels")
    interval: int = Field(30, ge=1, description="mini-batches between pruning steps")
    max_per_step: int = Field(100, ge=1, description="most filters removed per pruning step")
    round_to: int = Field(
        1,
        ge=1,
        description="round each layer's final width to a multiple of this (8: faster convolutions); "
        "filters kept may then differ slightly from keep_ratio",
    )
    ema: float = Field(0.9, ge=0, lt=1, description="momentum of the score moving average across intervals")
    steps: int = Field(
        3000,
        ge=1,
        description="fine-tuning steps in all (extended if pruning needs more to reach the target)",
    )
    batch_size: int = Field(64, ge=1, description="mini-batch size per source domain")
    lr: float = Field(1e-3, gt=0, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(100, ge=1, description="steps between validations once at the target")

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, value: str) -> str:
        if value not in CRITERIA:
            raise ValueError(f"must be one of {', '.join(CRITERIA)}, got {value!r}")
        return value

    @field_validator("finetune_algorithm")
    @classmethod
    def _check_finetune_algorithm(cls, value: str) -> str:
        return _known_algorithm(value)
