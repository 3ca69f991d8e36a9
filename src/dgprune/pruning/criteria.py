"""Filter-importance criteria: pure functions of per-domain gate gradients, risks and weights.

All tensors are *flat* over every prunable channel of the model (``M`` positions, see GateSet).
Higher score = more important = pruned later. Notation, for N source domains and channel m:
``g_m`` the gate (1 alive, 0 pruned), ``R_i`` domain i's mean cross-entropy on its mini-batch,
``G_{i,m} = dR_i/dg_m``, ``c_{i,m} = G_{i,m} g_m`` (domain i's first-order Taylor contribution: the
predicted *fall* of R_i when g_m goes 1 -> 0 is ``c_{i,m}``) and ``s_{i,m} = c_{i,m}^2``.
``Var`` is the population variance over domains, ``dVar/dg = (2/N) sum_i (R_i - mean R) G_i``.

- ``taylor`` (Molchanov et al. 2019; paper Eq. 2): ``(mean_i c_{i,m})^2``
- ``ior`` (paper Eq. 4): ``taylor + alpha (dVar/dg_m g_m)^2``. Parameters ``alpha`` (>= 0, default 1),
  ``alpha_mode`` (``fixed``: alpha as given; ``share``: alpha is recomputed every step as
  ``share * sum_m taylor_m / sum_m (dVar/dg_m g_m)^2``, so the variance term's total is ``share``
  times the Taylor total; 0 when the variance term is 0 everywhere) and ``share`` (> 0, default 1).
- ``ior_val``: ``ior`` with the variance term of a held-out source-validation mini-batch per domain
  (``val_risks``, ``val_domain_grads``), the Taylor term of the training batch; same parameters.
- ``disagreement``: ``Var_i(c_{i,m})`` (Fishr / AND-mask spirit: how much the domains disagree on
  the channel). ``taylor_disagreement``: ``taylor + beta Var_i(c_{i,m})`` (``beta`` >= 0, default 1;
  beta = 1 gives ``mean_i c_{i,m}^2``).
- ``worst_domain``: ``max_i s_{i,m}`` (GroupDRO's view: keep what the domain that needs it most
  needs). ``min_domain``: ``min_i s_{i,m}`` (kept only if every source needs it: domain-invariant).
- ``consistency``: ``mean_i s_{i,m} / (mean_i s_{i,m} + std_i s_{i,m})``, 0 where every ``s`` is 0.
  A monotone map of the signal-to-noise ratio mean/std into (0, 1]: scale-free (multiplying every
  gradient by a constant leaves it unchanged), 1 when all domains agree, finite when std = 0, and
  with no epsilon to tune. It measures agreement only, not magnitude.
- signed variants (the predicted *rise* of the risk when the channel is removed, not its square: a
  channel whose removal lowers the risk scores below zero and goes first):
  ``signed_taylor = -(mean_i G_{i,m}) g_m``; ``signed_worst_domain = max_i(-c_{i,m})``;
  ``signed_ior = -(mean_i G_{i,m}) g_m - alpha (dVar/dg_m) g_m`` (the rise of the mean risk plus
  alpha times the rise of the risks' variance; ``alpha`` >= 0, default 1).
- ``random``, ``l1`` (filter weight L1 norm), ``bn_scale`` (|gamma| of the normalisation): baselines.
- ``oracle`` (paper Eq. 1): the squared real change of the mean source risk when the channel is
  removed (measured by ``pruning.oracle.loss_changes``; one forward per channel: small models only).
- ``learned_masks`` (``learned_masks.py``): a mask logit per channel trained on the sources (hard-concrete
  relaxation, weights frozen) before pruning; the top logits are kept, in one pruning step.
- ``dss``, ``dss_sources`` (``dss.py``): cosine similarity of each channel's mean feature map over the
  sources and over the target's images (``dss``, needs ``prune.target_access: unlabeled``) or of each
  source against the other sources (``dss_sources``); scored once per pruning event, in eval mode.
- ``target_entropy`` (``target_entropy.py``): ``sign * (-g_m dH/dg_m)``, the first-order change of the
  target images' mean prediction entropy when the channel goes; ``sign`` required; per pruning event.

Each criterion is declared once, by its ``CriterionSpec`` (``criterion_spec.py``) in ``_SPECS``, from
which the ``REGISTRY`` is built: its score function, its parameters (a pydantic model: names, defaults,
ranges) and what the training loop must compute for it. ``make_criterion(name, params)`` validates the
parameters and binds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import torch
from pydantic import Field, ValidationError, model_validator

from dgprune.errors import ConfigError
from dgprune.pruning import dss, learned_masks, target_entropy
from dgprune.pruning.criterion_spec import (
    CriterionParams,
    CriterionSpec,
    LearnerContext,
    NoParams,
    ParameterLearner,
    ScoreInputs,
    contributions,
    plain,
    require,
)
from dgprune.registry import Registry

__all__ = [  # the criterion API of criterion_spec.py is re-exported: import it from either module
    "CRITERIA",
    "REGISTRY",
    "Criterion",
    "CriterionParams",
    "CriterionSpec",
    "LearnerContext",
    "NoParams",
    "ParameterLearner",
    "ScoreInputs",
    "contributions",
    "criterion_label",
    "criterion_param_defaults",
    "criterion_param_names",
    "describe_params",
    "make_criterion",
    "plain",
    "require",
    "validate_criterion_params",
    "variance_term_share",
]


# ---- score functions ---------------------------------------------------------------------------


def taylor_scores(inputs: ScoreInputs) -> torch.Tensor:
    grads = require(inputs.domain_grads, "domain_grads")
    return (grads.mean(dim=0) * inputs.gates) ** 2


def variance_gradient(domain_grads: torch.Tensor, risks: torch.Tensor) -> torch.Tensor:
    """d Var{R_1..R_N} / d g for the population variance (as V-REx): (2/N) sum_i (R_i - mean R) G_i."""
    centred = risks - risks.mean()
    return 2.0 / risks.numel() * (centred.unsqueeze(1) * domain_grads).sum(dim=0)


def ior_scores(inputs: ScoreInputs, alpha: float = 1.0) -> torch.Tensor:
    """Paper Eq. 4 with a fixed alpha (the ``ior`` criterion in ``fixed`` mode)."""
    grads = require(inputs.domain_grads, "domain_grads")
    risks = require(inputs.risks, "risks")
    ood = (variance_gradient(grads, risks) * inputs.gates) ** 2
    return taylor_scores(inputs) + alpha * ood


def disagreement_scores(inputs: ScoreInputs) -> torch.Tensor:
    c = contributions(inputs)
    return ((c - c.mean(dim=0)) ** 2).mean(dim=0)


def worst_domain_scores(inputs: ScoreInputs) -> torch.Tensor:
    return (contributions(inputs) ** 2).max(dim=0).values


def min_domain_scores(inputs: ScoreInputs) -> torch.Tensor:
    return (contributions(inputs) ** 2).min(dim=0).values


def consistency_scores(inputs: ScoreInputs) -> torch.Tensor:
    s = contributions(inputs) ** 2
    mean = s.mean(dim=0)
    std = ((s - mean) ** 2).mean(dim=0).sqrt()
    positive = mean > 0
    return torch.where(positive, mean / torch.where(positive, mean + std, 1.0), 0.0)


def signed_taylor_scores(inputs: ScoreInputs) -> torch.Tensor:
    return -(require(inputs.domain_grads, "domain_grads").mean(dim=0) * inputs.gates)


def signed_worst_domain_scores(inputs: ScoreInputs) -> torch.Tensor:
    return (-contributions(inputs)).max(dim=0).values


def l1_scores(inputs: ScoreInputs) -> torch.Tensor:
    return require(inputs.filter_l1, "filter_l1") * inputs.gates


def bn_scale_scores(inputs: ScoreInputs) -> torch.Tensor:
    return require(inputs.norm_scale, "norm_scale") * inputs.gates


def oracle_scores(inputs: ScoreInputs) -> torch.Tensor:
    return require(inputs.loss_change, "loss_change").to(inputs.gates.dtype) ** 2 * inputs.gates


# ---- parameters ----------------------------------------------------------------------------------


class AlphaParams(CriterionParams):
    alpha: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of the variance term")


class BetaParams(CriterionParams):
    beta: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of the disagreement term")


class IoRParams(CriterionParams):
    alpha: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="weight of the variance term (alpha_mode fixed)"
    )
    alpha_mode: Literal["fixed", "share"] = Field(
        "fixed", description="fixed: alpha as given; share: alpha recomputed every step from share"
    )
    share: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="alpha_mode share: variance total / Taylor total"
    )

    @model_validator(mode="after")
    def _no_unused_setting(self) -> IoRParams:
        # An unused value that differs from its default is a mistake, and would split run ids.
        if self.alpha_mode == "share" and self.alpha != 1.0:
            raise ValueError(
                f"alpha ({self.alpha:g}) is not used with alpha_mode 'share' (it is recomputed every step); "
                "drop alpha or use alpha_mode 'fixed'"
            )
        if self.alpha_mode == "fixed" and self.share != 1.0:
            raise ValueError(
                f"share ({self.share:g}) is used only with alpha_mode 'share'; "
                "set alpha_mode 'share' or drop share"
            )
        return self


def _ior_alpha(params: IoRParams, taylor: torch.Tensor, variance: torch.Tensor) -> float:
    """The variance term's weight this step: fixed, or the one that makes its total ``share`` x Taylor's."""
    if params.alpha_mode == "fixed":
        return params.alpha
    total = float(variance.sum())
    return params.share * float(taylor.sum()) / total if total > 0 else 0.0


def _ior_parts(inputs: ScoreInputs, params: IoRParams, val: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Taylor term, alpha x variance term) of ior / ior_val."""
    taylor = taylor_scores(inputs)
    if val:
        grads = require(inputs.val_domain_grads, "val_domain_grads")
        risks = require(inputs.val_risks, "val_risks")
    else:
        grads = require(inputs.domain_grads, "domain_grads")
        risks = require(inputs.risks, "risks")
    variance = (variance_gradient(grads, risks) * inputs.gates) ** 2
    return taylor, _ior_alpha(params, taylor, variance) * variance


def _ior(inputs: ScoreInputs, params: IoRParams) -> torch.Tensor:
    if params.alpha_mode == "fixed":
        return ior_scores(inputs, params.alpha)  # the paper's formula, exactly as published runs used it
    taylor, weighted = _ior_parts(inputs, params, val=False)
    return taylor + weighted


def _ior_val(inputs: ScoreInputs, params: IoRParams) -> torch.Tensor:
    taylor, weighted = _ior_parts(inputs, params, val=True)
    return taylor + weighted


def _ior_share(val: bool) -> Callable[[ScoreInputs, IoRParams], float]:
    def share(inputs: ScoreInputs, params: IoRParams) -> float:
        taylor, weighted = _ior_parts(inputs, params, val)
        total = float((taylor + weighted).sum())
        return float(weighted.sum()) / total if total > 0 else 0.0

    return share


def _signed_ior(inputs: ScoreInputs, params: AlphaParams) -> torch.Tensor:
    grads = require(inputs.domain_grads, "domain_grads")
    var_grad = variance_gradient(grads, require(inputs.risks, "risks"))
    return -(grads.mean(dim=0) * inputs.gates) - params.alpha * var_grad * inputs.gates


def _taylor_disagreement(inputs: ScoreInputs, params: BetaParams) -> torch.Tensor:
    return taylor_scores(inputs) + params.beta * disagreement_scores(inputs)


# ---- the registry --------------------------------------------------------------------------------


_SPECS = (
    CriterionSpec("taylor", plain(taylor_scores), needs_gradients=True),
    CriterionSpec(
        "ior", _ior, IoRParams, needs_gradients=True, min_domains=2, variance_share=_ior_share(val=False)
    ),
    # random's score needs a seeded generator: make_criterion binds it
    CriterionSpec("random", plain(lambda inputs: inputs.gates), random=True),
    CriterionSpec("l1", plain(l1_scores), needs_weights=True),
    CriterionSpec("bn_scale", plain(bn_scale_scores), needs_weights=True),
    CriterionSpec("oracle", plain(oracle_scores), needs_gradients=True, needs_loss_changes=True),
    CriterionSpec(
        "ior_val",
        _ior_val,
        IoRParams,
        needs_gradients=True,
        needs_val_gradients=True,
        min_domains=2,
        variance_share=_ior_share(val=True),
    ),
    CriterionSpec("disagreement", plain(disagreement_scores), needs_gradients=True, min_domains=2),
    CriterionSpec(
        "taylor_disagreement", _taylor_disagreement, BetaParams, needs_gradients=True, min_domains=2
    ),
    CriterionSpec("worst_domain", plain(worst_domain_scores), needs_gradients=True, min_domains=2),
    CriterionSpec("min_domain", plain(min_domain_scores), needs_gradients=True, min_domains=2),
    CriterionSpec("consistency", plain(consistency_scores), needs_gradients=True, min_domains=2),
    CriterionSpec("signed_taylor", plain(signed_taylor_scores), needs_gradients=True),
    CriterionSpec(
        "signed_worst_domain", plain(signed_worst_domain_scores), needs_gradients=True, min_domains=2
    ),
    CriterionSpec("signed_ior", _signed_ior, AlphaParams, needs_gradients=True, min_domains=2),
    learned_masks.SPEC,
    dss.DSS,
    dss.DSS_SOURCES,
    target_entropy.SPEC,
)
# The criterion registry. A registered spec is accepted everywhere a criterion is named: prune.criterion
# in configs and sweeps, --criterion, the Torch-Pruning integration and `dgprune analyze`.
REGISTRY: Registry[CriterionSpec] = Registry("criterion")
for _criterion in _SPECS:
    REGISTRY.register(_criterion.name, _criterion)
CRITERIA: tuple[str, ...] = REGISTRY.names()  # the built-in criteria, in the order above


@dataclass(frozen=True)
class Criterion:
    """A named scoring rule bound to its parameters, and what it needs computed each step."""

    name: str
    score: Callable[[ScoreInputs], torch.Tensor]
    needs_gradients: bool = False
    needs_weights: bool = False
    needs_loss_changes: bool = False  # the oracle: one extra forward per alive channel
    needs_val_gradients: bool = False  # a source-validation batch per domain, forward + gate gradients
    min_domains: int = 1  # CriterionSpec.min_domains: 2 when the score compares the source domains
    generator: torch.Generator | None = None  # random draws (checkpointed so that resume is exact)
    params: Mapping[str, Any] = field(default_factory=dict)  # validated, defaults filled in
    variance_share: Callable[[ScoreInputs], float] | None = None
    # Trainable parameters of its own (CriterionSpec.learner), bound to the parameters.
    learner: Callable[[LearnerContext], ParameterLearner] | None = None
    needs: frozenset[str] = frozenset()  # CriterionSpec.needs: feature_maps, target_images
    scored: str = "every_step"  # CriterionSpec.scored: every_step or per_pruning_event

    @property
    def needs_target_images(self) -> bool:
        return "target_images" in self.needs

    @property
    def label(self) -> str:
        return criterion_label(self.name, self.params)


def _spec(name: str) -> CriterionSpec:
    return REGISTRY.lookup(name)  # ConfigError listing the valid names


def make_criterion(name: str, params: Mapping[str, Any] | None = None, seed: int = 0) -> Criterion:
    """Build a criterion by name (one of REGISTRY, any spelling) with its parameters (validated; defaults
    filled in)."""
    name = REGISTRY.resolve(name)
    spec = REGISTRY[name]
    values = validate_criterion_params(name, params)
    bound = spec.params.model_validate(values)
    generator = None
    if spec.random:
        generator = torch.Generator().manual_seed(seed)
        score = _random_scores(generator)
    else:

        def score(inputs: ScoreInputs) -> torch.Tensor:
            return spec.score(inputs, bound)

    share = None
    if spec.variance_share is not None:
        share_of = spec.variance_share

        def share(inputs: ScoreInputs) -> float:
            return share_of(inputs, bound)

    learner = None
    if spec.learner is not None:
        build = spec.learner

        def learner(context: LearnerContext) -> ParameterLearner:
            return build(context, bound)

    return Criterion(
        name,
        score,
        needs_gradients=spec.needs_gradients,
        needs_weights=spec.needs_weights,
        needs_loss_changes=spec.needs_loss_changes,
        needs_val_gradients=spec.needs_val_gradients,
        min_domains=spec.min_domains,
        generator=generator,
        params=values,
        variance_share=share,
        learner=learner,
        needs=spec.needs,
        scored=spec.scored,
    )


def _random_scores(generator: torch.Generator) -> Callable[[ScoreInputs], torch.Tensor]:
    def score(inputs: ScoreInputs) -> torch.Tensor:
        return torch.rand(inputs.gates.shape, generator=generator).to(inputs.gates.device)

    return score


def variance_term_share(criterion: Criterion, inputs: ScoreInputs) -> float:
    """How much of the score is a risk-variance term: the criterion's own (ior, ior_val), else that of
    IoR at alpha = 1 on the same batch (what IoR would add to Taylor); 0 without gradients."""
    if criterion.variance_share is not None:
        return criterion.variance_share(inputs)
    if inputs.domain_grads is None or inputs.risks is None:
        return 0.0
    ior = ior_scores(inputs, 1.0).sum()
    return float((ior - taylor_scores(inputs).sum()) / ior) if ior > 0 else 0.0


# ---- parameter validation and labels ---------------------------------------------------------------


def criterion_param_defaults(name: str) -> dict[str, Any]:
    """The parameters that have a default (a required one, such as target_entropy's sign, has none)."""
    fields = _spec(name).params.model_fields
    return {key: info.default for key, info in fields.items() if not info.is_required()}


def criterion_param_names(name: str) -> tuple[str, ...]:
    return tuple(_spec(name).params.model_fields)


def describe_params(name: str) -> str:
    """One line: every parameter with its range and default, e.g. ``alpha >= 0 (default 1), ...``."""
    parts = []
    for key, info in _spec(name).params.model_fields.items():
        text = key
        for meta in info.metadata:
            if getattr(meta, "ge", None) is not None:
                text += f" >= {_show(meta.ge)}"
            if getattr(meta, "gt", None) is not None:
                text += f" > {_show(meta.gt)}"
        if get_origin(info.annotation) is Literal:
            text += " " + " | ".join(_show(v) for v in get_args(info.annotation))
        default = "required" if info.is_required() else f"default {_show(info.default)}"
        parts.append(f"{text} ({default})")
    return ", ".join(parts) if parts else "none"


def validate_criterion_params(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The criterion's parameters with defaults filled in; ConfigError naming the criterion, the
    parameter and the valid ones otherwise."""
    spec = _spec(name)
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ConfigError(
            f"criterion {name!r}: parameters must be a mapping of name: value, got {_show(params)}"
        )
    names = tuple(spec.params.model_fields)
    unknown = [key for key in params if key not in names]
    if unknown:
        given = ", ".join(repr(key) for key in unknown)
        if not names:
            raise ConfigError(f"criterion {name!r} takes no parameters, got {given}")
        raise ConfigError(
            f"criterion {name!r} has no parameter {given}; its parameters: {describe_params(name)}"
        )
    try:
        return spec.params.model_validate(dict(params)).model_dump()
    except ValidationError as err:
        problem = err.errors()[0]
        if not problem["loc"]:  # a check across parameters
            reason = str(problem.get("ctx", {}).get("error", problem["msg"]))
            raise ConfigError(f"{name}: {reason}") from None
        key = problem["loc"][0]
        got = "" if problem["type"] == "missing" else f", got {_show(problem['input'])}"
        raise ConfigError(
            f"{name}: {key} {_reason(problem)}{got} (parameters: {describe_params(name)})"
        ) from None


def _reason(problem: dict[str, Any]) -> str:
    ctx = problem.get("ctx", {})
    kind = problem["type"]
    if kind == "greater_than":
        return f"must be > {_show(ctx['gt'])}"
    if kind == "greater_than_equal":
        return f"must be >= {_show(ctx['ge'])}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "missing":
        return "must be given (it has no default)"
    if kind in ("float_parsing", "float_type"):
        return "must be a number"
    return str(problem["msg"]).lower()


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return str(value)


def criterion_label(
    name: str,
    params: Mapping[str, Any] | None = None,
    display: str | None = None,
    target_access: str = "none",
) -> str:
    """A criterion's name (or ``display``) plus its parameters that differ from their defaults:
    ``ior``, ``ior (alpha=2)``, ``ior (alpha_mode=share, share=0.5)``. Used wherever runs are named.
    A run that saw the target's images (``prune.target_access`` unlabeled) is marked ``[unlabeled
    target]``, so that no table, plot or comparison shows it as a source-only run."""
    shown = display or name
    mark = "" if target_access == "none" else f" [{target_access} target]"
    if not params:
        return shown + mark
    defaults = criterion_param_defaults(name) if name in REGISTRY else {}
    order = list(defaults) + sorted(key for key in params if key not in defaults)
    changed = [
        f"{key}={_plain_value(params[key])}"
        for key in order
        if key in params and (key not in defaults or params[key] != defaults[key])
    ]
    return (f"{shown} ({', '.join(changed)})" if changed else shown) + mark


def _plain_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
