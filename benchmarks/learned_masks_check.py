"""learned_masks (docs/criteria.md): what mask training costs, and how good its ranking is on its own.

On a pretrained model directory (e.g. a sweep's ``pretrained/<id>``):

- **cost**: a mask-training step (``MaskLearner.step``: hard-concrete masks, forward of one mini-batch
  per source, backward to the logits only) against a Taylor-FO pruning step (``per_domain_forward_
  backward``, Taylor scores, SGD step), interleaved in rounds on the same batches; the median of the
  per-round ratios with its inter-quartile range.
- **ranking**: the hard mask of the top logits after ``mask_steps`` steps (one pruning step to the
  schedule's target), *without fine-tuning*: its source-validation (intra) and target (cross)
  accuracy, for each ``--penalties`` value, beside Taylor-FO's scores averaged over as many batches
  at the same weights (no update) and pruned in the same one step. The target is read for this
  report only.

    python benchmarks/learned_masks_check.py --model DIR --json benchmarks/results/learned_masks.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from machine import machine_info

from dgprune.data import DomainBatches
from dgprune.experiments.pipeline import make_context, model_dir_config
from dgprune.pruning import GateSet, find_channel_groups
from dgprune.pruning.criteria import LearnerContext, make_criterion, taylor_scores
from dgprune.pruning.criterion_spec import ScoreInputs
from dgprune.pruning.schedule import PruningSchedule
from dgprune.pruning.scoring import per_domain_forward_backward
from dgprune.training.evaluation import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a pretrained model directory")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--penalties", type=float, nargs="+", default=[10.0, 100.0])
    parser.add_argument("--batch-size", type=int, default=32, help="per source domain (the demo's)")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds")
    parser.add_argument("--block", type=int, default=10, help="steps per variant and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = model_dir_config(args.model, None, {"device": "cpu"})
    ctx = make_context(config)
    result: dict[str, Any] = {
        "command": "python benchmarks/learned_masks_check.py " + " ".join(_argv(args)),
        "machine": machine_info(args.threads),
        "model": str(args.model),
        "target": config.target,
        "cost": _cost(ctx, args),
        "ranking": _ranking(ctx, args),
    }
    result["machine"]["load_average_1_5_15_min_at_end"] = _load()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def _argv(args: argparse.Namespace) -> list[str]:
    out = [
        "--model",
        str(args.model),
        "--keep",
        *map(str, args.keep),
        "--penalties",
        *map(str, args.penalties),
    ]
    return [*out, "--batch-size", str(args.batch_size), "--threads", str(args.threads)]


def _load() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def _fresh(ctx, path: Path) -> tuple[torch.nn.Module, GateSet]:
    model = ctx.load_model_dir(path)
    return model, GateSet(model, find_channel_groups(model, ctx.example_input)).attach()


def _cost(ctx, args) -> dict[str, Any]:
    model, gates = _fresh(ctx, args.model)
    learner = make_criterion("learned_masks").learner(LearnerContext(model, gates, 0.5, "per_domain", 0))
    pruned_model, pruned_gates = _fresh(ctx, args.model)
    optimizer = torch.optim.SGD(pruned_model.parameters(), lr=1e-3, momentum=0.9)
    stream = DomainBatches(ctx.split.train, args.batch_size, seed=0)
    batches = [stream.next() for _ in range(args.block)]

    def mask_block() -> None:
        for batch in batches:
            learner.step(batch)

    def taylor_block() -> None:
        pruned_model.train()
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            out = per_domain_forward_backward(pruned_model, pruned_gates, batch)
            taylor_scores(ScoreInputs(pruned_gates.flat_gates(), out.domain_grads, out.risks))
            optimizer.step()

    times: dict[str, list[float]] = {"mask": [], "taylor": []}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        order = [("mask", mask_block), ("taylor", taylor_block)]
        for name, block in order if round_index % 2 else order[::-1]:
            started = time.perf_counter()
            block()
            if round_index:
                times[name].append((time.perf_counter() - started) / args.block)
    ratios = sorted(m / t for m, t in zip(times["mask"], times["taylor"], strict=True))
    q = statistics.quantiles(ratios, n=4)
    return {
        "mask_step_s_median": statistics.median(times["mask"]),
        "taylor_step_s_median": statistics.median(times["taylor"]),
        "mask_over_taylor_median": statistics.median(ratios),
        "mask_over_taylor_iqr": [q[0], q[2]],
        "rounds": args.rounds,
        "steps_per_round": args.block,
    }


def _ranking(ctx, args) -> list[dict[str, Any]]:
    rows = []
    device = torch.device("cpu")
    for keep in args.keep:
        model, gates = _fresh(ctx, args.model)
        steps = (
            make_criterion("learned_masks").learner(LearnerContext(model, gates, keep, "per_domain", 0)).steps
        )
        stream = DomainBatches(ctx.split.train, args.batch_size, seed=0)
        total = torch.zeros(gates.total)
        model.train()  # as pruning scores; the weights are reloaded below (BatchNorm statistics)
        for _ in range(steps):  # Taylor-FO averaged over as many batches, at the pretrained weights
            model.zero_grad(set_to_none=True)
            out = per_domain_forward_backward(model, gates, stream.next())
            total += taylor_scores(ScoreInputs(gates.flat_gates(), out.domain_grads, out.risks))
        model.load_state_dict(copy.deepcopy(ctx.load_model_dir(args.model).state_dict()))
        rows.append(
            {
                "keep": keep,
                "scores": "taylor (no update)",
                **_one_shot(model, gates, total, keep, ctx, device),
            }
        )
        for penalty in args.penalties:
            model, gates = _fresh(ctx, args.model)
            learner = make_criterion("learned_masks", {"penalty": penalty}).learner(
                LearnerContext(model, gates, keep, "per_domain", 0)
            )
            stream = DomainBatches(ctx.split.train, args.batch_size, seed=0)
            for _ in range(learner.steps):
                stats = learner.step(stream.next())
            row = _one_shot(model, gates, learner.scores(), keep, ctx, device)
            rows.append({"keep": keep, "scores": f"learned_masks (penalty={penalty:g})", **row, **stats})
            print(rows[-1], flush=True)
    return rows


def _one_shot(model, gates, scores, keep, ctx, device) -> dict[str, Any]:
    schedule = PruningSchedule(gates.sizes, keep)
    gates.prune(schedule.prune_at_once(scores))
    acc = evaluate(model, ctx.split, device)
    return {
        "filters_kept": gates.num_alive(),
        "intra_acc_no_finetune": acc.intra,
        "cross_acc_no_finetune": acc.cross,
    }


if __name__ == "__main__":
    main()
