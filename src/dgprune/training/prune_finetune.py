"""Iterative pruning with fine-tuning (paper §3 and A.3), then selection of the best checkpoint at target.

Every step forwards one mini-batch per source domain (each on its own, or as one mixed batch:
``bn_mode``, see pruning.scoring), backpropagates ``mean_i R_i`` (the ERM fine-tuning loss of the
paper), scores all alive channels with the criterion, and steps SGD. A criterion that needs them
(``ior_val``) also gets per-domain gate gradients of one source-validation mini-batch per domain,
which never reach the parameters' gradients. A criterion scored per pruning event (``dss``,
``dss_sources``, ``target_entropy``: ``CriterionSpec.scored``) is scored only at the steps that prune,
from fixed images (``EventImages``; the target's only under ``prune.target_access: unlabeled``).
The schedule removes channels every ``interval`` steps until ``keep_ratio`` of them remain;
fine-tuning goes on afterwards. The reported model is the checkpoint with the best intra-domain
validation accuracy among those that already have the target number of filters.
A criterion with trainable parameters of its own (``learned_masks``) instead trains them for its K
steps first (training.criterion_learning), prunes once to the target by their scores, and
fine-tunes for ``steps`` more (steps K + 1 ... K + steps).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from dgprune.algorithms import Algorithm, default_hparams, make_algorithm
from dgprune.data import Domain, DomainBatches, LodoSplit, image_sample
from dgprune.errors import ConfigError
from dgprune.pruning.budget import budget_cost
from dgprune.pruning.criteria import (
    Criterion,
    LearnerContext,
    ParameterLearner,
    ScoreInputs,
    make_criterion,
    variance_term_share,
)
from dgprune.pruning.event_inputs import event_score_inputs
from dgprune.pruning.gates import GateSet
from dgprune.pruning.groups import find_channel_groups
from dgprune.pruning.oracle import loss_changes
from dgprune.pruning.schedule import PruningSchedule, group_floors
from dgprune.pruning.scoring import gate_gradients, per_domain_forward_backward
from dgprune.pruning.weight_stats import weight_statistics
from dgprune.training.checkpoint import Checkpointer, rng_state, set_rng_state
from dgprune.training.criterion_learning import is_learning_checkpoint, learn_criterion
from dgprune.training.divergence import DivergenceGuard
from dgprune.training.evaluation import Evaluator
from dgprune.training.identity import Identity
from dgprune.training.oracle_selection import target_halves
from dgprune.training.progress import ProgressCallback, ProgressEvent
from dgprune.training.settings import PruneSettings


@dataclass
class PruneOutcome:
    gates: GateSet  # attached to the model, masks at the target
    best_state: dict[str, torch.Tensor]  # masked model's weights at the selected checkpoint
    best_val: float
    best_step: int
    steps_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    # Mean over pruning steps of the variance term's share of the score (see criteria.variance_term_share;
    # for criteria without one, alpha*sum((dVar/dg)^2) / sum(IoR score) at alpha 1): how much IoR's variance
    # term weighs against the Taylor term (0 means IoR would rank exactly as Taylor does).
    variance_term_share: float = 0.0
    # prune.budget (params, macs, latency): the cost of the final widths over the dense cost, as the
    # schedule predicted it (PruningSchedule.predicted_ratio); None for the filters budget.
    budget_predicted: float | None = None

    @property
    def filters_total(self) -> int:
        return self.gates.total

    @property
    def filters_kept(self) -> int:
        return self.gates.num_alive()


def prune_and_finetune(
    model: nn.Module,
    split: LodoSplit,
    settings: PruneSettings,
    seed: int,
    device: torch.device,
    example_input: torch.Tensor,
    progress: ProgressCallback | None = None,
    log_every: int = 1,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 50,
    checkpoint_identity: Identity | None = None,
) -> PruneOutcome:
    """Prune ``model`` (masks, in place) to ``settings.keep_ratio`` of its filters while fine-tuning.

    With ``checkpoint_dir``, the whole state (weights, masks, schedule, optimiser, batch streams,
    RNGs, best checkpoint so far) is saved every ``checkpoint_every`` steps and a later call with
    the same arguments resumes from it, giving the same result as an uninterrupted run.
    With ``checkpoint_identity``, only a checkpoint of that run is resumed (see Checkpointer).
    A non-finite loss, risk, score or weight raises DivergenceError; nothing is saved after it.
    ``progress`` gets an event every ``log_every`` steps, at every evaluation and at the last step.
    """
    torch.manual_seed(seed)
    groups = find_channel_groups(model, example_input.to(device), scope=settings.scope)
    floors = group_floors([g.size for g in groups], settings.round_to, settings.max_layer_prune)
    # before the gates: a latency table measures the bare dense model (or reads its cache)
    cost = budget_cost(settings.budget, model, groups, example_input.to(device), settings.round_to, floors)
    gates = GateSet(model, groups).attach()
    criterion = make_criterion(settings.criterion, settings.criterion_params, seed=seed)
    schedule = PruningSchedule(
        gates.sizes,
        settings.keep_ratio,
        settings.interval,
        settings.max_per_step,
        settings.ema,
        settings.round_to,
        settings.round_mode,
        settings.max_layer_prune,
        cost=cost,
        budget_ratio=settings.budget.ratio if cost is not None else 1.0,  # type: ignore[union-attr]
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    batches = DomainBatches(split.train, settings.batch_size, seed=seed)
    val_batches = None
    if criterion.needs_val_gradients:
        val_batches = _validation_batches(split, settings.batch_size, seed)
    algorithm = finetune_algorithm(model, len(split.train), settings, seed)
    objective = algorithm.objective if algorithm is not None else None
    event_images = EventImages.for_criterion(criterion, split, settings, seed, device)
    check_reachable(schedule, settings)
    learner = _learner(criterion, model, gates, settings, seed)  # None but for learned_masks
    total_steps = planned_steps(schedule, settings) if learner is None else learner.steps + settings.steps
    best_val, best_step, best_state = -1.0, 0, None
    history: list[dict[str, float]] = []
    shares: list[float] = []
    checkpointer = Checkpointer(checkpoint_dir, checkpoint_every, checkpoint_identity)
    guard = DivergenceGuard("prune", settings.lr, checkpointer)
    evaluator = Evaluator(split, device)
    saved, stage_started = checkpointer.load(), time.monotonic()
    if learner is not None and (saved is None or is_learning_checkpoint(saved)):
        # Steps 1..K train the criterion's own parameters, then one pruning step to the target.
        scores = learn_criterion(
            learner, batches, gates, device, checkpointer, total_steps, saved, progress, log_every
        )
        gates.prune(schedule.prune_at_once(scores))
        saved = None
    start = 1 if learner is None else learner.steps + 1
    if saved is not None:
        gates.set_alive(saved["alive"].to(gates.alive[0].device))
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        batches.load_state_dict(saved["batches"])
        if val_batches is not None:
            val_batches.load_state_dict(saved["val_batches"])
        set_rng_state(saved["rng"])
        if algorithm is not None:
            algorithm.load_state_dict(saved["algorithm"])
        if criterion.generator is not None:
            criterion.generator.set_state(saved["criterion_rng"])
        best_val, best_step, best_state = saved["best_val"], saved["best_step"], saved["best_state"]
        history, shares, start = saved["history"], saved["shares"], saved["step"] + 1
        total_steps = saved["total_steps"]
    model.train()
    domain_names = [d.name for d in split.train]
    alive = gates.num_alive()  # changes only when channels are removed: counted then, not every step
    started = stage_started  # the stage's clock runs on from the criterion's training, if any
    for step in range(start, total_steps + 1):
        minibatches = [(x.to(device), y.to(device)) for x, y in batches.next()]
        optimizer.zero_grad(set_to_none=True)
        out = per_domain_forward_backward(model, gates, minibatches, objective, settings.bn_mode)
        guard.check_value(step, "loss", out.loss)
        guard.check_tensor(step, "per-domain risks", out.risks)
        share = None
        if not schedule.done:
            inputs = _score_inputs(model, gates, out, criterion.needs_weights)
            if criterion.needs_loss_changes:  # before the update: the loss at these weights
                inputs = replace(inputs, loss_change=loss_changes(model, gates, minibatches))
            if val_batches is not None:  # also before the update; trains nothing (see gate_gradients)
                held_out = [(x.to(device), y.to(device)) for x, y in val_batches.next()]
                val_risks, val_grads = gate_gradients(model, gates, held_out, settings.bn_mode)
                inputs = replace(inputs, val_domain_grads=val_grads, val_risks=val_risks)
            if event_images is None:
                scores = criterion.score(inputs)
                guard.check_tensor(step, "pruning scores", scores)  # NaN would rank channels by position
                schedule.observe(scores)
            else:  # scored once per pruning event, at the weights before this step's update
                scores = None
                if schedule.event_due:
                    scores = criterion.score(event_images.inputs(criterion, model, gates, inputs))
                    guard.check_tensor(step, "pruning scores", scores)
                schedule.observe_event(scores)
            share = variance_term_share(criterion, inputs)
            shares.append(share)
        optimizer.step()
        reached_now = False
        chosen = schedule.step()
        if chosen is not None:
            gates.prune(chosen)
            alive = gates.num_alive()
            reached_now = schedule.done
        at_target = schedule.done
        evaluate_now = at_target and (reached_now or step % settings.eval_every == 0 or step == total_steps)
        val = acc = None
        if evaluate_now:
            guard.check_weights(step, model)  # never select a diverged model
            acc = evaluator(model)
            val = acc.intra  # selection: source val only; the other splits are only logged
            entry = {"step": step, "loss": out.loss, "val_acc": val, "alive": alive, **target_halves(acc)}
            history.append(entry)
            if val > best_val:
                best_val, best_step = val, step
                best_state = copy.deepcopy(model.state_dict())
        if progress and (step % log_every == 0 or step == total_steps or val is not None):
            progress(
                ProgressEvent(
                    "prune",
                    step,
                    total_steps,
                    out.loss,
                    alive,
                    gates.total,
                    val,
                    time.monotonic() - started,
                    risks=dict(zip(domain_names, out.risks.tolist(), strict=True)),
                    variance_share=share,
                    domain_acc=acc.splits if acc is not None else None,
                )
            )
        if checkpointer.due(step):
            guard.check_weights(step, model)  # the checkpoint on disk stays the last good one
            checkpointer.save(
                {
                    "step": step,
                    "total_steps": total_steps,
                    "alive": gates.flat_alive().cpu(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "batches": batches.state_dict(),
                    "val_batches": val_batches.state_dict() if val_batches is not None else None,
                    "rng": rng_state(),
                    "algorithm": algorithm.state_dict() if algorithm is not None else None,
                    "criterion_rng": criterion.generator.get_state()
                    if criterion.generator is not None
                    else None,
                    "best_val": best_val,
                    "best_step": best_step,
                    "best_state": best_state,
                    "history": history,
                    "shares": shares,
                }
            )
    assert best_state is not None  # total_steps guarantees at least one evaluation at the target
    model.load_state_dict(best_state)
    share = sum(shares) / len(shares) if shares else 0.0
    return PruneOutcome(
        gates, best_state, best_val, best_step, total_steps, history, share,
        budget_predicted=schedule.predicted_ratio,
    )  # fmt: skip


def check_reachable(schedule: PruningSchedule, settings: PruneSettings) -> None:
    """ConfigError before any training when the floors of ``round_to`` (no group below it, a group
    narrower than it never pruned) keep more channels than the target: the run would silently keep
    more filters than ``keep_ratio`` says."""
    if schedule.fewest_reachable <= schedule.target:
        return
    sizes = schedule.group_sizes
    usable = [q for q in range(1, settings.round_to) if sum(min(q, n) for n in sizes) <= schedule.target]
    hint = f"use prune.round_to {max(usable)} or less" if usable else "use a larger keep_ratio"
    raise ConfigError(
        f"prune.round_to {settings.round_to}: no layer goes below {settings.round_to} channels (a narrower "
        f"one is kept whole), so at least {schedule.fewest_reachable} of {schedule.total} filters remain, "
        f"more than the {schedule.target} that keep_ratio {settings.keep_ratio:g} asks for; {hint}"
    )


def planned_steps(schedule: PruningSchedule, settings: PruneSettings) -> int:
    """``settings.steps``, or more when the schedule needs more to reach the target (``interval``
    steps per pruning step of at most ``max_per_step`` filters, then one step at the target);
    an extension is announced (a warning: one line on the command line)."""
    needed = schedule.steps_to_target() + 1
    if settings.steps >= needed:
        return settings.steps
    budget = settings.budget
    goal = (
        f"{schedule.target} of {schedule.total} filters (keep_ratio {settings.keep_ratio:g}"
        if budget is None or budget.metric == "filters"
        # a cost budget's step count is planned for the worst case: every group down to its floor
        else f"the {budget.metric} budget {budget.ratio:g} (planned as if every layer went to its floor"
    )
    warnings.warn(
        f"prune.steps {settings.steps} cannot reach {goal}, a pruning step every {settings.interval} "
        f"steps removing at most {settings.max_per_step}): running {needed} steps (recorded as steps_run)",
        StepsExtendedWarning,
        stacklevel=2,
    )
    return needed


class StepsExtendedWarning(UserWarning):
    """prune.steps was too few to reach the target and the run was extended."""


def _learner(
    criterion: Criterion, model: nn.Module, gates: GateSet, settings: PruneSettings, seed: int
) -> ParameterLearner | None:
    """The criterion's own trainable parameters (CriterionSpec.learner), or None."""
    if criterion.learner is None:
        return None
    return criterion.learner(LearnerContext(model, gates, settings.keep_ratio, settings.bn_mode, seed))


@dataclass(frozen=True)
class EventImages:
    """The fixed images a criterion scored per pruning event is measured on: ``images`` (its parameter)
    of each source's train split and, only when it needs them and ``prune.target_access`` is
    ``unlabeled``, of the target; drawn once (seeded), evaluation transform. The target's labels are
    never read (``data.image_sample``)."""

    sources: list[torch.Tensor]
    target: torch.Tensor | None

    @classmethod
    def for_criterion(
        cls, criterion: Criterion, split: LodoSplit, settings: PruneSettings, seed: int, device: torch.device
    ) -> EventImages | None:
        if criterion.scored != "per_pruning_event":
            return None
        count = int(criterion.params["images"])
        sources = [image_sample(domain, count, seed).to(device) for domain in split.train]
        target = None
        if criterion.needs_target_images:
            if settings.target_access != "unlabeled":  # settings validation refuses this first
                raise ConfigError(f"criterion {criterion.name} needs prune.target_access unlabeled")
            target = image_sample(split.target, count, seed).to(device)
        return cls(sources, target)

    def inputs(
        self, criterion: Criterion, model: nn.Module, gates: GateSet, base: ScoreInputs
    ) -> ScoreInputs:
        return event_score_inputs(criterion, model, gates, self.sources, self.target, base)


def _validation_batches(split: LodoSplit, batch_size: int, seed: int) -> DomainBatches:
    """One held-out source-validation mini-batch per domain each step (criteria such as ior_val).

    Evaluation transform (no augmentation: the risk of held-out data as it is), and a stream seeded
    apart from the training batches'.
    """
    domains = [Domain(d.name, d.images, d.labels, None, d.eval_transform) for d in split.val]
    return DomainBatches(domains, batch_size, seed=_VAL_SEED_OFFSET + seed)


_VAL_SEED_OFFSET = 7919  # any constant: the validation stream must not replay the training stream's draws


def finetune_algorithm(
    model: nn.Module, num_domains: int, settings: PruneSettings, seed: int = 0
) -> Algorithm | None:
    """The DG algorithm whose objective drives fine-tuning, or None for ERM (the exact one-backward path).

    Penalty annealing (VREx, IRM) is switched off unless asked for: the model is already trained,
    so the penalty applies at full weight from the first fine-tuning step. ``seed`` (the run's) seeds
    the algorithm's own draws unless ``finetune_hparams`` sets one.
    """
    if settings.finetune_algorithm == "erm":
        return None
    defaults = default_hparams(settings.finetune_algorithm, "mnist")
    no_annealing = {key: 0 for key in defaults if key.endswith("anneal_iters")}
    return make_algorithm(
        settings.finetune_algorithm,
        model,
        num_domains,
        {**no_annealing, "seed": seed, **settings.finetune_hparams},
    )


def _score_inputs(model: nn.Module, gates: GateSet, out, needs_weights: bool) -> ScoreInputs:
    filter_l1 = norm_scale = None
    if needs_weights:
        filter_l1, norm_scale = weight_statistics(model, gates.groups)
    return ScoreInputs(
        gates=gates.flat_gates(),
        domain_grads=out.domain_grads,
        risks=out.risks,
        filter_l1=filter_l1,
        norm_scale=norm_scale,
    )
