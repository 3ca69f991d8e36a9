"""Cost of the criteria scored once per pruning event (dss, dss_sources, target_entropy) against one
training step of pruning (per-domain forward/backward of one mini-batch per source), in seconds.

    python benchmarks/bench_event_criteria.py [--model mnist_cnn|resnet18] [--pixels P] [--images N]
        [--batch-size B] [--sources S] [--repeats R] [--json FILE]

Random images (the cost does not depend on their content); the model in its pruning state (train mode,
gates attached). Prints the median over ``repeats`` of each timing and its ratio to a training step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from dgprune.models import build_model
from dgprune.pruning import GateSet, find_channel_groups
from dgprune.pruning.criteria import make_criterion
from dgprune.pruning.event_inputs import event_score_inputs
from dgprune.pruning.scoring import per_domain_forward_backward


def _median_s(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist_cnn")
    parser.add_argument("--pixels", type=int, default=28)
    parser.add_argument("--images", type=int, default=256, help="the criteria's `images` per domain")
    parser.add_argument("--batch-size", type=int, default=64, help="training mini-batch per source")
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    channels = 1 if args.model == "mnist_cnn" else 3
    model = build_model(args.model, num_classes=10, in_channels=channels, small_input=True)
    shape = (channels, args.pixels, args.pixels)
    gates = GateSet(model, find_channel_groups(model, torch.zeros(1, *shape))).attach()
    model.train()
    batches = [
        (torch.rand(args.batch_size, *shape), torch.randint(0, 10, (args.batch_size,)))
        for _ in range(args.sources)
    ]
    sources = [torch.rand(args.images, *shape) for _ in range(args.sources)]
    target = torch.rand(args.images, *shape)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        per_domain_forward_backward(model, gates, batches)

    results = {"step_s": _median_s(train_step, args.repeats)}
    for name, params in (("dss", {}), ("dss_sources", {}), ("target_entropy", {"sign": 1})):
        criterion = make_criterion(name, {"images": args.images, **params})
        results[f"{name}_event_s"] = _median_s(
            lambda c=criterion: c.score(event_score_inputs(c, model, gates, sources, target)), args.repeats
        )
    load = os.getloadavg()[0]
    print(f"{args.model} {args.pixels}px, {args.sources} sources, images {args.images}, load {load:.1f}")
    for key, value in results.items():
        print(f"  {key:22s} {value:8.3f} s  ({value / results['step_s']:.1f} training steps)")
    if args.json:
        payload = {"args": vars(args), "load_average": load, "threads": torch.get_num_threads(), **results}
        with open(args.json, "w") as out:
            json.dump(payload, out, indent=1)


if __name__ == "__main__":
    main()
