"""Cost of a pruning training step: IoR scoring vs Taylor scoring vs a naive IoR vs a plain step.

Every variant does a training step on the same model and data: one mini-batch per source domain,
forward, backward, SGD step (lr 1e-3, momentum 0.9).

- ``plain``:  no gates attached; the domains forwarded as the library forwards them (each on its own
  when the model has train-mode BatchNorm, else all in one batch), one backward of the mean risk:
  the gate-overhead reference.
- ``taylor``: ``per_domain_forward_backward`` (per-domain gate copies, one backward) + Taylor-FO scores.
- ``ior``:    the same + IoR scores (paper Eq. 4; docs/method.md).
- ``naive``:  IoR computed the obvious way: one shared gate vector per group, ``N`` separate
  ``torch.autograd.grad(R_i, gates, retain_graph=True)`` calls (one backward per domain, each domain
  forwarded on its own), then the parameter backward of the mean risk, then the IoR formula. Its
  scores are checked against the library's IoR scores before timing.

``--bn-mode mixed`` measures the library's ``bn_mode: mixed`` instead: ``plain`` and ``naive`` forward
the domains as one batch (BatchNorm over all sources) and ``taylor``/``ior`` take each domain's gate
gradient of that forward with its own ``autograd.grad`` (N extra gate-only backward passes), so
``taylor/plain`` is then the cost of exact per-domain gradients under mixed BatchNorm. That mode adds
the variant ``batched``: the same Taylor step with ``mixed_grads="batched"`` (the N gradients from one
backward under ``torch.func.vmap``; its gradients are checked against the loop's before timing), so
one run gives before (``taylor/plain``), after (``batched/plain``) and ``batched/taylor``. For a model
without train-mode BatchNorm (MNIST_CNN) both modes are the same computation.

Absolute times on a shared machine are noisy, so the figures that matter are *ratios* measured in
one run: the variants are interleaved (the order rotates every round), each round times a block of
steps per variant, and the reported figures are medians over rounds (ratios: median of the per-round
ratios, with their inter-quartile range).

    python benchmarks/bench_scoring.py --json benchmarks/results/scoring.json
    python benchmarks/bench_scoring.py --quick
    python benchmarks/bench_scoring.py --models resnet18 --bn-mode mixed --json scoring_mixed.json
    python benchmarks/bench_scoring.py --models resnet18 --bn-mode mixed --variants batched --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from machine import available_cores, load_average, machine_info  # benchmarks/machine.py
from torch import nn
from torch.utils import benchmark

from dgprune.models.factory import build_model
from dgprune.pruning import (
    GateSet,
    ScoreInputs,
    find_channel_groups,
    make_criterion,
    per_domain_forward_backward,
)
from dgprune.pruning.criteria import Criterion
from dgprune.pruning.groups import ChannelGroup
from dgprune.pruning.scoring import MixedGrads, gate_gradients, mixes_samples

# name -> (build_model kwargs, image side)
MODELS: dict[str, tuple[dict[str, Any], int]] = {
    "mnist_cnn": ({"name": "mnist_cnn", "num_classes": 10, "in_channels": 1}, 8),
    "resnet18": ({"name": "resnet18", "num_classes": 7, "in_channels": 3, "small_input": True}, 32),
}
VARIANTS = ("plain", "taylor", "ior", "naive")
MIXED_VARIANTS = (*VARIANTS, "batched")  # --bn-mode mixed: the loop (taylor) vs one batched backward
RATIOS = {
    "ior/taylor": ("ior", "taylor"),
    "naive/taylor": ("naive", "taylor"),
    "taylor/plain": ("taylor", "plain"),
    "batched/plain": ("batched", "plain"),
    "batched/taylor": ("batched", "taylor"),
}
IOR_TARGET = 1.05
MIXED_TARGET = 1.5  # issue 18.5: a batched mixed-BN scoring step vs a plain mixed step

Batches = list[tuple[torch.Tensor, torch.Tensor]]


# ---- the naive IoR: shared gates, one backward per domain ------------------------------------------
class SharedGates:
    """One gate leaf per channel group shared by all domains, applied where GateSet applies its gates."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self.model = model
        self.groups = groups
        self.leaves: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> None:
        modules = dict(self.model.named_modules())
        for group_idx, group in enumerate(self.groups):
            for site in group.gate_sites:
                # module channel c is gated by group position p where site.channel_index[p] == c
                order = torch.argsort(torch.tensor(site.channel_index, dtype=torch.long))
                hook = partial(self._apply, group_idx, order)
                self._handles.append(modules[site.module_name].register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def fresh(self) -> None:
        """New all-ones gate leaves for one step (no channel is pruned in this benchmark)."""
        like = next(self.model.parameters())
        self.leaves = [
            torch.ones(g.size, dtype=like.dtype, device=like.device, requires_grad=True) for g in self.groups
        ]

    def _apply(
        self, group_idx: int, order: torch.Tensor, module, inputs, output: torch.Tensor
    ) -> torch.Tensor:
        gate = self.leaves[group_idx][order]
        return output * gate.view(1, -1, *([1] * (output.dim() - 2)))


def naive_ior_scores(
    domain_grads: torch.Tensor, risks: torch.Tensor, gates: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """Eq. 4 written out: ((1/N) sum_i G_i g)^2 + alpha ((2/N) sum_i (R_i - mean R) G_i g)^2."""
    n = risks.numel()
    taylor = (domain_grads.mean(dim=0) * gates) ** 2
    var_grad = 2.0 / n * ((risks - risks.mean()).unsqueeze(1) * domain_grads).sum(dim=0)
    return taylor + alpha * (var_grad * gates) ** 2


# ---- one training step per variant -----------------------------------------------------------------
@dataclass
class Bench:
    model: nn.Module
    batches: Batches
    gates: GateSet
    shared: SharedGates
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter] = field(default_factory=list)
    bn_mode: str = "per_domain"  # the library's prune.bn_mode; plain and naive forward the same way
    criteria: dict[str, Criterion] = field(
        default_factory=lambda: {name: make_criterion(name) for name in ("taylor", "ior")}
    )

    def step_plain(self, update: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if mixes_samples(self.model) and self.bn_mode == "per_domain":  # as the library: per domain...
            risks = [F.cross_entropy(self.model(x), y) for x, y in self.batches]
        else:  # ...else all domains in one batch
            risks = self._one_batch_risks()
        torch.stack(risks).mean().backward()
        if update:
            self.optimizer.step()

    def step_library(
        self, criterion_name: str, update: bool = True, mixed_grads: MixedGrads = "loop"
    ) -> torch.Tensor:
        criterion = self.criteria[criterion_name]
        self.optimizer.zero_grad(set_to_none=True)
        out = per_domain_forward_backward(
            self.model, self.gates, self.batches, bn_mode=self.bn_mode, mixed_grads=mixed_grads
        )
        scores = criterion.score(
            ScoreInputs(gates=self.gates.flat_gates(), domain_grads=out.domain_grads, risks=out.risks)
        )
        if update:
            self.optimizer.step()
        return scores

    def step_naive(self, update: bool = True) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        self.shared.fresh()
        if self.bn_mode == "mixed":
            risks = self._one_batch_risks()
        else:
            risks = [F.cross_entropy(self.model(x), y) for x, y in self.batches]
        per_domain = []
        for risk in risks:  # one backward per domain, through that domain's graph only
            grads = torch.autograd.grad(risk, self.shared.leaves, retain_graph=True)
            per_domain.append(torch.cat(grads))
        risk_vector = torch.stack(risks)
        risk_vector.mean().backward(inputs=self.params)  # the parameter gradients of the training loss
        gate_values = torch.cat([leaf.detach() for leaf in self.shared.leaves])
        scores = naive_ior_scores(torch.stack(per_domain), risk_vector.detach(), gate_values)
        if update:
            self.optimizer.step()
        return scores

    def _one_batch_risks(self) -> list[torch.Tensor]:
        logits = self.model(torch.cat([x for x, _ in self.batches]))
        sizes = [len(y) for _, y in self.batches]
        return [F.cross_entropy(lg, y) for lg, (_, y) in zip(logits.split(sizes), self.batches, strict=True)]

    # which hooks each variant needs; switching happens outside the timed blocks
    def enter(self, variant: str) -> None:
        self.gates.detach()
        self.shared.detach()
        if variant in ("taylor", "ior", "batched"):
            self.gates.attach()
        elif variant == "naive":
            self.shared.attach()

    def step_fn(self, variant: str) -> Callable[[], object]:
        return {
            "plain": self.step_plain,
            "taylor": partial(self.step_library, "taylor"),
            "ior": partial(self.step_library, "ior"),
            "naive": self.step_naive,
            "batched": partial(self.step_library, "taylor", mixed_grads="batched"),
        }[variant]


def make_bench(
    model_key: str, domains: int, batch: int, seed: int, bn_mode: str = "per_domain", device: str = "cpu"
) -> Bench:
    kwargs, side = MODELS[model_key]
    torch.manual_seed(seed)
    model = build_model(**kwargs).to(device)
    channels, classes = kwargs["in_channels"], kwargs["num_classes"]
    generator = torch.Generator().manual_seed(seed)
    batches = [
        (
            torch.randn(batch, channels, side, side, generator=generator).to(device),
            torch.randint(0, classes, (batch,), generator=generator).to(device),
        )
        for _ in range(domains)
    ]
    groups = find_channel_groups(model, batches[0][0][:2], scope="all")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return Bench(
        model,
        batches,
        GateSet(model, groups),
        SharedGates(model, groups),
        optimizer,
        list(model.parameters()),
        bn_mode=bn_mode,
    )


def time_scores(bench: Bench, min_run_s: float) -> dict[str, float]:
    """ms of the criterion alone (``criterion.score``) on one step's real gate gradients and risks.

    The only difference between the ``ior`` and ``taylor`` steps is this call, so its cost measured
    on its own (many repetitions, unaffected by the step's noise) bounds IoR's overhead.
    """
    bench.enter("ior")
    bench.optimizer.zero_grad(set_to_none=True)
    out = per_domain_forward_backward(bench.model, bench.gates, bench.batches, bn_mode=bench.bn_mode)
    bench.optimizer.zero_grad(set_to_none=True)
    bench.enter("none")
    inputs = ScoreInputs(gates=bench.gates.flat_gates(), domain_grads=out.domain_grads, risks=out.risks)
    result = {}
    for name, criterion in bench.criteria.items():
        timer = benchmark.Timer(stmt="score(inputs)", globals={"score": criterion.score, "inputs": inputs})
        result[name] = timer.blocked_autorange(min_run_time=min_run_s).median * 1e3
    return result


def check_naive_matches_library(bench: Bench) -> float:
    """Max relative difference between the library's IoR scores and the naive ones (same weights)."""
    bench.enter("ior")
    library = bench.step_library("ior", update=False)
    bench.enter("naive")
    naive = bench.step_naive(update=False)
    bench.enter("none")
    bench.optimizer.zero_grad(set_to_none=True)
    return float((library - naive).abs().max() / library.abs().max().clamp_min(1e-30))


def library_forward(model: nn.Module, bn_mode: str) -> str:
    """How the library forwards the domains: per domain, one batch whose BatchNorm couples them
    (mixed mode: the per-domain gradients need N backward passes), or one uncoupled batch."""
    if not mixes_samples(model):
        return "one batch"
    return "per domain" if bn_mode == "per_domain" else "one batch, coupled"


def check_batched_matches_loop(bench: Bench) -> float:
    """Max difference, relative to the largest gradient, between the per-domain gate gradients of
    ``mixed_grads="batched"`` and of the loop on the same forward (BatchNorm statistics restored)."""
    bench.enter("taylor")
    _, loop = gate_gradients(bench.model, bench.gates, bench.batches, bench.bn_mode, "loop")
    _, batched = gate_gradients(bench.model, bench.gates, bench.batches, bench.bn_mode, "batched")
    bench.enter("none")
    return float((batched - loop).abs().max() / loop.abs().max().clamp_min(1e-30))


# ---- timing ----------------------------------------------------------------------------------------
def clock() -> float:
    """perf_counter once the GPU (if any) has finished the work queued so far."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def time_model(
    bench: Bench,
    max_rounds: int,
    warmup: int,
    min_block_s: float,
    budget_s: float,
    variants: tuple[str, ...] = VARIANTS,
) -> dict[str, Any]:
    """Interleaved timing; as many rounds as fit in ``budget_s`` (at least 3, at most ``max_rounds``)."""
    fns = {v: bench.step_fn(v) for v in variants}
    # warm-up, and a first estimate of each variant's step time to size the timed blocks
    estimate = {}
    for variant in variants:
        bench.enter(variant)
        for _ in range(warmup):
            fns[variant]()
        t0 = clock()
        fns[variant]()
        estimate[variant] = clock() - t0
    steps = {v: max(1, math.ceil(min_block_s / max(estimate[v], 1e-6))) for v in variants}
    round_s = sum(steps[v] * estimate[v] for v in variants)
    rounds = max(3, min(max_rounds, int(budget_s / max(round_s, 1e-6))))
    block_ms: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for variant in order:
            bench.enter(variant)
            fn, n = fns[variant], steps[variant]
            t0 = clock()
            for _ in range(n):
                fn()
            block_ms[variant].append((clock() - t0) / n * 1e3)
    bench.enter("none")
    ms = {v: statistics.median(block_ms[v]) for v in variants}
    min_ms = {v: min(block_ms[v]) for v in variants}  # least disturbed block, for reference
    ratios = {}
    for name, (a, b) in RATIOS.items():
        if a not in variants or b not in variants:
            continue
        per_round = [x / y for x, y in zip(block_ms[a], block_ms[b], strict=True)]
        q1, q2, q3 = quartiles(per_round)
        ratios[name] = {"median": q2, "q25": q1, "q75": q3, "per_round": per_round}
    return {
        "variants": list(variants),
        "rounds": rounds,
        "steps_per_block": steps,
        "ms_per_step": ms,
        "min_ms_per_step": min_ms,
        "block_ms": block_ms,
        "ratios": ratios,
    }


# ---- report ----------------------------------------------------------------------------------------


def fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} [{r['q25']:.3f}-{r['q75']:.3f}]"


def markdown_table(results: list[dict[str, Any]]) -> str:
    variants, ratio_names = results[0]["variants"], list(results[0]["ratios"])  # one run: the same for all
    columns = [f"{v} ms" for v in variants] + ratio_names
    head = (
        "| model | input | domains x batch | library forward | gated channels | "
        + " | ".join(columns)
        + " |\n"
        + "|---" * (5 + len(columns))
        + "|\n"
    )
    rows = []
    for res in results:
        ms, ratios = res["ms_per_step"], res["ratios"]
        rows.append(
            f"| {res['model']} | {res['input']} | {res['domains']} x {res['batch']} "
            f"| {res['library_forward']} | {res['gated_channels']} "
            + " ".join(f"| {ms[v]:.1f}" for v in variants)
            + " "
            + " ".join(f"| {fmt_ratio(ratios[k])}" for k in ratio_names)
            + " |"
        )
    return head + "\n".join(rows) + "\n"


def markdown_score_table(results: list[dict[str, Any]]) -> str:
    head = (
        "| model | taylor score ms | ior score ms | ior extra / taylor step | ior/taylor implied |\n"
        "|---|---|---|---|---|\n"
    )
    rows = []
    for res in results:
        sc = res["score_only_ms"]
        implied = res["ior_over_taylor_from_score_cost"]
        rows.append(
            f"| {res['model']} | {sc['taylor']:.4f} | {sc['ior']:.4f} "
            f"| {(implied - 1) * 100:.4f} % | {implied:.5f} |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--domains", type=int, default=5, help="source domains (one mini-batch each)")
    parser.add_argument("--batch", type=int, default=32, help="images per domain per step")
    parser.add_argument(
        "--rounds", type=int, default=None, help="max interleaved rounds per model (default 15; quick 3)"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="timed seconds per model, caps the rounds (default 150)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per variant before sizing the blocks (default 1)",
    )
    parser.add_argument("--min-block", type=float, default=None, help="seconds per timed block (default 0.5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda); default cpu")
    parser.add_argument(
        "--bn-mode",
        choices=["per_domain", "mixed"],
        default="per_domain",
        help="prune.bn_mode of the library variants (plain and naive forward the same way)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=MIXED_VARIANTS[2:],
        default=None,
        help="variants timed besides plain and taylor, the references (default all; batched: mixed only)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short smoke run: 3 rounds, batch 8, 0.1 s blocks"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = parser.parse_args(argv)
    all_variants = MIXED_VARIANTS if args.bn_mode == "mixed" else VARIANTS
    chosen = set(all_variants if args.variants is None else ("plain", "taylor", *args.variants))
    variants = tuple(v for v in all_variants if v in chosen)
    if not chosen <= set(all_variants):
        parser.error("the variant batched is a --bn-mode mixed variant")
    if args.quick:
        args.batch = min(args.batch, 8)
    rounds = args.rounds or (3 if args.quick else 15)
    budget = args.budget if args.budget is not None else (20.0 if args.quick else 150.0)
    warmup = args.warmup if args.warmup is not None else 1
    min_block = args.min_block if args.min_block is not None else (0.1 if args.quick else 0.5)
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    meta = machine_info(torch.get_num_threads())
    meta["device"] = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(
        f"torch {meta['torch']}, {meta['cores_available']} cores available, "
        f"torch.set_num_threads({threads}) -> {torch.get_num_threads()} threads; {meta['cpu']}"
    )
    print(
        f"max rounds={rounds} budget={budget:.0f}s/model warmup={warmup} min_block={min_block}s "
        f"domains={args.domains} batch={args.batch}"
    )

    results = []
    for key in args.models:
        t0 = time.perf_counter()
        bench = make_bench(key, args.domains, args.batch, args.seed, args.bn_mode, args.device)
        rel = check_naive_matches_library(bench) if "naive" in variants else None
        batched_rel = check_batched_matches_loop(bench) if "batched" in variants else None
        timing = time_model(bench, rounds, warmup, min_block, budget, variants)
        score_ms = time_scores(bench, 0.2 if args.quick else 1.0)
        extra = (score_ms["ior"] - score_ms["taylor"]) / timing["ms_per_step"]["taylor"]
        side = MODELS[key][1]
        channels = MODELS[key][0]["in_channels"]
        res = {
            "model": key,
            "input": f"{channels}x{side}x{side}",
            "domains": args.domains,
            "batch": args.batch,
            "gated_channels": bench.gates.total,
            "bn_mode": args.bn_mode,
            "library_forward": library_forward(bench.model, args.bn_mode),
            "groups": len(bench.gates.groups),
            "naive_vs_library_ior_max_rel_diff": rel,
            "batched_vs_loop_grads_max_rel_diff": batched_rel,
            "score_only_ms": score_ms,
            "ior_over_taylor_from_score_cost": 1.0 + extra,
            **timing,
            "wall_s": time.perf_counter() - t0,
        }
        results.append(res)
        checks = "" if rel is None else f"naive IoR == library IoR to {rel:.1e} (max rel diff); "
        if batched_rel is not None:
            checks += f"batched grads == loop grads to {batched_rel:.1e}; "
        print(
            f"{key}: {checks}"
            f"{timing['rounds']} rounds, steps/block {timing['steps_per_block']}; {res['wall_s']:.0f} s"
        )

    print()
    print(markdown_table(results))
    print("ms: median ms per step over rounds; ratios: median of per-round ratios [inter-quartile range].")
    print()
    print(markdown_score_table(results))
    print("score ms: criterion.score alone on one step's gate gradients (torch.utils.benchmark, median);")
    print("implied: 1 + (ior score - taylor score) / taylor step, the step cost IoR adds over Taylor.")
    for res in results:
        if "batched/plain" in res["ratios"] and res["library_forward"] == "one batch, coupled":
            before, after = res["ratios"]["taylor/plain"], res["ratios"]["batched/plain"]
            print(
                f"{res['model']}: mixed-BN scoring step / plain mixed step: loop {fmt_ratio(before)}, "
                f"batched {fmt_ratio(after)} -> target <= {MIXED_TARGET} "
                f"{'met' if after['median'] <= MIXED_TARGET else 'NOT met'}"
            )
        if "ior/taylor" not in res["ratios"]:
            continue
        r = res["ratios"]["ior/taylor"]
        verdict = "met" if r["median"] <= IOR_TARGET else "NOT met"
        print(
            f"{res['model']}: ior/taylor measured {r['median']:.3f} [IQR {r['q25']:.3f}-{r['q75']:.3f}] "
            f"-> target <= {IOR_TARGET} {verdict}; implied by the score cost "
            f"{res['ior_over_taylor_from_score_cost']:.5f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta["load_average_1_5_15_min_at_end"] = load_average()
        settings = {
            "max_rounds": rounds,
            "budget_s_per_model": budget,
            "warmup": warmup,
            "min_block_s": min_block,
            "quick": args.quick,
            "seed": args.seed,
            "bn_mode": args.bn_mode,
            "device": args.device,
            "optimizer": "SGD lr 1e-3 momentum 0.9",
            "ior_target": IOR_TARGET,
            "variants": list(variants),
        }
        payload = {"benchmark": "scoring", "machine": meta, "settings": settings, "results": results}
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
