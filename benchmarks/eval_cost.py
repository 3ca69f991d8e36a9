"""What logging every domain's accuracy at every evaluation costs (docs/experiments.md, "Every domain's
accuracy at every evaluation").

On rotated digits (MNIST_CNN, target 0, untrained weights: the cost does not depend on them), the
median time of one evaluation of the source val splits only (``intra_accuracy``, what selection
needs), of one evaluation of every domain and split (``Evaluator``: what every evaluation now logs),
and of one ERM training step (Adam, 32 images per source domain); then the share of a pretraining
stage spent evaluating at a given ``eval_every``.

    python benchmarks/eval_cost.py               # one thread, CPU
    python benchmarks/eval_cost.py --threads 0   # torch's default thread count
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from dgprune.algorithms import make_algorithm
from dgprune.data import DomainBatches, load_dataset, make_lodo_split
from dgprune.models import build_model
from dgprune.training.evaluation import Evaluator, intra_accuracy


def median_s(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    split = make_lodo_split(load_dataset("rotated_digits"), "0", 0.1, seed=0)
    model = build_model("mnist_cnn", 10, 1)
    evaluator = Evaluator(split, cpu)
    hparams = {"lr": 1e-3, "weight_decay": 0.0, "batch_size": 32, "seed": 0}
    algorithm = make_algorithm("erm", model, len(split.train), hparams)
    batches = DomainBatches(split.train, 32, seed=0)
    before = median_s(lambda: intra_accuracy(model, split, cpu), args.repeats)
    now = median_s(lambda: evaluator(model), args.repeats)
    step = median_s(lambda: algorithm.update(batches.next()), args.repeats)
    sizes = (sum(map(len, split.val)), sum(map(len, evaluator.train_samples)), len(split.target))
    print(f"images per evaluation: source val {sizes[0]}, train samples {sizes[1]}, target {sizes[2]}")
    print(f"one evaluation: source val only {1000 * before:.0f} ms, every split {1000 * now:.0f} ms")
    print(f"one ERM training step (32 images x {len(split.train)} domains): {1000 * step:.0f} ms")
    for every in (25, 100):
        share_before = before / (before + every * step)
        share_now = now / (now + every * step)
        print(f"eval_every {every}: evaluation {share_before:.1%} -> {share_now:.1%} of a pretraining stage")


if __name__ == "__main__":
    main()
