"""Learned channel masks: modular risk minimisation (Zhang et al., ICML 2021) at channel granularity.

A logit ``a_m`` per prunable channel (per flat gate position, i.e. per channel group channel, see
GateSet) is trained on the source domains with the model's weights frozen, then the channels with the
highest logits are kept and the usual fine-tuning, selection and compression follow.

Each step multiplies every channel's gate by a hard-concrete sample (Louizos et al., ICLR 2018):
``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + a_m) / beta)``, ``z_m = min(1, max(0, s (zeta -
gamma) + gamma))`` with ``gamma = -0.1``, ``zeta = 1.1`` and temperature ``beta``: a relaxed 0/1 mask
that is exactly 0 or 1 with non-zero probability and differentiable in ``a_m``. The objective is

    mean_i R_i(z)  +  penalty * (E - k)^2,
    E = (1/M) sum_m P(z_m != 0) = (1/M) sum_m sigmoid(a_m - beta log(-gamma / zeta))

(``R_i`` the source domains' cross-entropies, forwarded as ``prune.bn_mode`` says; ``k`` the share
of channels the schedule keeps, ``target_channels / M``): the expected share of kept channels is
driven to ``keep_ratio``. Only the logits are trained (Adam, ``mask_lr``), one noise draw per step
shared by all the step's images; BatchNorm runs in training mode as in pruning, and its running
statistics are restored after every step, so the model leaves mask training exactly as it came.
The kept channels are then the top logits: one pruning step of the schedule (``PruningSchedule.
prune_at_once``) to exactly its target, with its floors and ``round_to``.

Parameters: ``temperature`` (beta), ``penalty`` (its weight), ``mask_lr``, ``mask_steps``.
The logits start at ``INIT_LOGIT`` (every channel kept with probability 0.99): the mask starts as the
dense model. Cost: ``mask_steps`` forward/backward passes of one mini-batch per source domain (the
backward reaches the logits only, no weight gradients), before fine-tuning starts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from dgprune.pruning.criterion_spec import CriterionParams, CriterionSpec, LearnerContext, ScoreInputs
from dgprune.pruning.schedule import target_channels
from dgprune.pruning.scoring import mixes_samples

GAMMA, ZETA = -0.1, 1.1  # hard-concrete's stretch interval (Louizos et al. 2018)
INIT_LOGIT = 3.0  # P(z != 0) = 0.99 and z = 1 deterministically at beta = 2/3: starts as the dense model
_NOISE_SALT = 104_729  # seeds the noise apart from the run's other streams
_EPS = 1e-6  # keeps log(u) and log(1 - u) finite

Batch = tuple[torch.Tensor, torch.Tensor]


class LearnedMaskParams(CriterionParams):
    temperature: float = Field(
        2 / 3, gt=0, allow_inf_nan=False, description="hard-concrete temperature beta (Louizos et al.: 2/3)"
    )
    penalty: float = Field(
        100.0, ge=0, allow_inf_nan=False, description="weight of (expected kept share - keep_ratio)^2"
    )
    mask_lr: float = Field(0.05, gt=0, allow_inf_nan=False, description="Adam learning rate of the logits")
    mask_steps: int = Field(300, ge=1, description="mask-training steps before pruning (weights frozen)")


def hard_concrete(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """Relaxed 0/1 masks from logits and uniform noise ``u`` in (0, 1), same shape."""
    s = torch.sigmoid((torch.log(noise) - torch.log1p(-noise) + logits) / temperature)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def keep_probability(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``P(z != 0)`` of each hard-concrete mask (closed form)."""
    return torch.sigmoid(logits - temperature * math.log(-GAMMA / ZETA))


def source_risks(model: torch.nn.Module, batches: list[Batch], bn_mode: str) -> torch.Tensor:
    """[N] each source's mean cross-entropy, the domains forwarded as ``prune.bn_mode`` says: alone when
    train-mode BatchNorm couples the samples in ``per_domain`` mode, else as one batch."""
    if bn_mode == "per_domain" and mixes_samples(model):
        return torch.stack([F.cross_entropy(model(x), y) for x, y in batches])
    logits = model(torch.cat([x for x, _ in batches]))
    parts = logits.split([len(y) for _, y in batches])
    return torch.stack([F.cross_entropy(p, y) for p, (_, y) in zip(parts, batches, strict=True)])


class MaskLearner:
    """The mask logits of one model and their optimiser (a ``ParameterLearner``)."""

    def __init__(self, context: LearnerContext, params: LearnedMaskParams) -> None:
        self.model, self.gates, self.bn_mode = context.model, context.gates, context.bn_mode
        self.params = params
        self.steps, self.lr = params.mask_steps, params.mask_lr
        gates = context.gates
        # The share the schedule keeps (target_channels), so that mask training aims where pruning lands.
        self.keep_share = target_channels(gates.total, context.keep_ratio, len(gates.sizes)) / gates.total
        device = next(context.model.parameters()).device
        self.logits = torch.full((gates.total,), INIT_LOGIT, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=params.mask_lr)
        self.noise = torch.Generator().manual_seed(_NOISE_SALT + context.seed)

    def step(self, batches: list[Batch]) -> dict[str, float]:
        beta = self.params.temperature
        u = torch.rand(self.gates.total, generator=self.noise).clamp(_EPS, 1 - _EPS).to(self.logits.device)
        masks = hard_concrete(self.logits, u, beta)
        alive = self.gates.flat_alive().to(self.logits.dtype)
        expected = (keep_probability(self.logits, beta) * alive).sum() / alive.sum()
        penalty = self.params.penalty * (expected - self.keep_share) ** 2
        was_training = self.model.training
        saved = {name: b.clone() for name, b in self.model.named_buffers()}
        try:
            self.model.train()  # as pruning forwards the sources
            with self.gates.relaxed(list(masks.split(self.gates.sizes))):
                risks = source_risks(self.model, batches, self.bn_mode)
            loss = risks.mean() + penalty
            # Only the logits are differentiated: the weights get no gradient (frozen, as in MRM).
            (self.logits.grad,) = torch.autograd.grad(loss, [self.logits])
        finally:
            with torch.no_grad():  # weights frozen: BatchNorm statistics too (after the backward uses them)
                for name, buffer in self.model.named_buffers():
                    buffer.copy_(saved[name])
            self.model.train(was_training)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": float(loss.detach()),
            "risk": float(risks.mean().detach()),
            "expected_keep": float(expected.detach()),
            "mask_penalty": float(penalty.detach()),
        }

    def scores(self) -> torch.Tensor:
        return self.logits.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits.detach().cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
            "noise": self.noise.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"].to(self.logits.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise.set_state(state["noise"])


def _no_step_score(inputs: ScoreInputs, params: Any) -> torch.Tensor:
    raise ValueError(
        "learned_masks ranks channels by mask logits trained before pruning, not by a per-step score"
    )


SPEC = CriterionSpec("learned_masks", _no_step_score, LearnedMaskParams, learner=MaskLearner)
