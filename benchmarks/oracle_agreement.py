"""How well do Taylor-FO and IoR rank channels like the oracle (paper Eq. 1) does?

For each target domain × seed: pretrain MNIST_CNN on the source domains of the embedded rotated
digits with the demo's budget, then, at those fixed weights, score every channel on ``--batches``
training mini-batches (one per source domain each) with Taylor-FO, IoR (α = 1) and the oracle
(the measured change of the mean source risk when the channel is removed), averaging each score
over the batches as the pruning schedule's interval mean does. Reported per run and averaged:

- Spearman rank correlation of Taylor-FO and of IoR with the oracle;
- overlap of the channels each would prune first (lowest half) with the oracle's lowest half;
- Pearson correlation of the first-order prediction of the signed change ``R̄(g) - R̄(g - e_m)``,
  which is ``mean_i dR_i/dg_m``, with the measured change (how good the expansion itself is);
- the share of channels whose removal *raises* the mean source risk (measured change < 0).

    python benchmarks/oracle_agreement.py --json benchmarks/results/oracle_agreement.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from dgprune.data import DomainBatches, load_dataset, make_lodo_split
from dgprune.experiments.demo import DEMO_SETTINGS
from dgprune.models import build_model
from dgprune.pruning import GateSet, ScoreInputs, find_channel_groups
from dgprune.pruning.criteria import ior_scores, taylor_scores
from dgprune.pruning.oracle import loss_changes
from dgprune.pruning.scoring import per_domain_forward_backward
from dgprune.training import PretrainSettings, pretrain

CPU = torch.device("cpu")


def ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def lowest_half_overlap(score: torch.Tensor, reference: torch.Tensor) -> float:
    k = len(score) // 2
    ours, theirs = set(score.argsort()[:k].tolist()), set(reference.argsort()[:k].tolist())
    return len(ours & theirs) / k


def scores_at_fixed_weights(target: str, seed: int, num_batches: int) -> dict[str, float]:
    split = make_lodo_split(load_dataset("rotated_digits"), target=target, seed=seed)
    torch.manual_seed(seed)
    model = build_model("mnist_cnn", 10, 1)
    pretrain(model, split, PretrainSettings(**DEMO_SETTINGS["pretrain"]), seed=seed, device=CPU)
    model.train()
    gates = GateSet(model, find_channel_groups(model, torch.zeros(1, 1, 8, 8))).attach()
    batches = DomainBatches(split.train, DEMO_SETTINGS["prune"]["batch_size"], seed=seed)
    taylor, ior, first_order, measured = [], [], [], []
    for _ in range(num_batches):
        minibatches = batches.next()
        model.zero_grad(set_to_none=True)
        step = per_domain_forward_backward(model, gates, minibatches)
        inputs = ScoreInputs(gates=gates.flat_gates(), domain_grads=step.domain_grads, risks=step.risks)
        taylor.append(taylor_scores(inputs))
        ior.append(ior_scores(inputs, 1.0))
        first_order.append(step.domain_grads.mean(dim=0))  # R̄(g) - R̄(g - e_m) ≈ dR̄/dg_m (g_m = 1)
        measured.append(loss_changes(model, gates, minibatches))
    taylor_m, ior_m = torch.stack(taylor).mean(0), torch.stack(ior).mean(0)
    first_m, measured_m = torch.stack(first_order).mean(0), torch.stack(measured).mean(0)
    oracle = measured_m**2
    return {
        "spearman_taylor_oracle": pearson(ranks(taylor_m), ranks(oracle)),
        "spearman_ior_oracle": pearson(ranks(ior_m), ranks(oracle)),
        "spearman_taylor_ior": pearson(ranks(taylor_m), ranks(ior_m)),
        "lowest_half_overlap_taylor": lowest_half_overlap(taylor_m, oracle),
        "lowest_half_overlap_ior": lowest_half_overlap(ior_m, oracle),
        "pearson_first_order_vs_measured_change": pearson(first_m, measured_m),
        "share_removal_raises_risk": float((measured_m < 0).double().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=["0", "30", "75"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=10, help="scoring mini-batches per run")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for target in args.targets:
        for seed in args.seeds:
            figures = scores_at_fixed_weights(target, seed, args.batches)
            runs.append({"target": target, "seed": seed, **figures})
            print(json.dumps(runs[-1]), flush=True)
    keys = [k for k in runs[0] if k not in ("target", "seed")]
    summary = {
        k: {
            "mean": statistics.mean(r[k] for r in runs),
            "min": min(r[k] for r in runs),
            "max": max(r[k] for r in runs),
        }
        for k in keys
    }
    for key, row in summary.items():
        print(f"{key:42s} mean {row['mean']:.3f}  range {row['min']:.3f}..{row['max']:.3f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "runs": runs},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
