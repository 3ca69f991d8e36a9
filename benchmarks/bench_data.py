"""Data pipeline throughput vs ResNet-18 training throughput, at 64 px and 224 px, in one run.

Builds a PACS-shaped folder of generated 227 x 227 JPEGs (PACS's own size) in a temporary directory,
then for each working resolution measures, in images per second:

- ``decode``: the one-off decode of every file into the in-memory tensor (cache miss, worker
  processes), and ``cache_load_s``: reopening it from the disk cache;
- ``pipeline``: `DomainBatches.next()` on the in-memory data — indexing plus DomainBed's training
  augmentation (per-sample RandomResizedCrop, flip, ColorJitter, grayscale, normalisation);
- ``streaming``: the same batches when the dataset is streamed (decoded from files by worker
  processes, prefetched), as for data larger than the memory budget;
- ``train``: one ERM step of ResNet-18 (forward, backward, Adam) on those batches (3 source domains x
  32 images, DomainBed's image batch size), with the ImageNet stem, and at 64 px also with the small-
  input stem.

``pipeline / train`` > 1 means the pipeline produces batches faster than the model consumes them.
`DomainBatches` runs in the training process, between steps, so ``data share`` = t_data / (t_data +
t_train) is the part of each step spent on data.

    python benchmarks/bench_data.py                  # full run, writes benchmarks/results/data_pipeline.json
    python benchmarks/bench_data.py --threads 1      # one core per process: ..._1thread.json
    python benchmarks/bench_data.py --quick          # a smoke run
    python benchmarks/bench_data.py --device cuda    # on a GPU machine: ..._cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dgprune.data import DomainBatches, load_dataset, make_lodo_split
from dgprune.models import build_model

DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
PER_DOMAIN_BATCH = 32  # DomainBed's batch size for image datasets


def make_folder(root: Path, per_class: int, side: int = 227) -> int:
    """PACS-shaped tree of smooth random JPEGs (quality 90); returns the number of images."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    n = 0
    for d in DOMAINS:
        for c in CLASSES:
            folder = root / d / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                k = rng.random((3, 4))
                img = np.stack(
                    [np.sin(6 * k[j, 0] * xx + 5 * k[j, 1] * yy + k[j, 2] * 6) * 0.5 + 0.5 for j in range(3)],
                    -1,
                )
                img += rng.normal(0, 0.05, img.shape)  # texture, so JPEG decoding does real work
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                    folder / f"{i}.jpg", quality=90
                )
                n += 1
    return n


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()  # GPU work is asynchronous: time it to completion
        times.append(time.perf_counter() - start)
    return times


def batches_rate(split, repeats: int) -> float:
    batches = DomainBatches(split.train, PER_DOMAIN_BATCH, seed=0)
    per_step = sum(min(PER_DOMAIN_BATCH, len(d)) for d in split.train)
    return per_step / statistics.median(timed(batches.next, repeats, warmup=2))


def train_rate(split, small_input: bool, repeats: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model("resnet18", 7, 3, small_input=small_input).to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-5)  # DomainBed's ERM on images
    batches = DomainBatches(split.train, PER_DOMAIN_BATCH, seed=0)
    fixed = batches.next()  # the same batch every step: only the model's time is measured
    x = torch.cat([b[0] for b in fixed]).to(device)
    y = torch.cat([b[1] for b in fixed]).to(device)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return len(x) / statistics.median(timed(step, repeats, warmup=1))


def measure(root: Path, cache: Path, size: int, quick: bool, device: torch.device) -> dict[str, Any]:
    # On a GPU the augmentation runs there too (transform_device), as a GPU run would configure it.
    common = {"image_size": size, "cache_dir": str(cache / str(size)), "transform_device": str(device)}
    start = time.perf_counter()
    ds = load_dataset(f"folder:{root}", stream=False, **common)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    again = load_dataset(f"folder:{root}", stream=False, **common)
    cache_s = time.perf_counter() - start
    assert set(again.info["cache"].values()) == {"hit"}
    n = sum(len(d) for d in ds.domains)
    split = make_lodo_split(ds, "sketch", seed=0)
    reps = 3 if quick else 10
    pipeline = batches_rate(split, reps)
    streamed = load_dataset(f"folder:{root}", stream=True, **common)
    stream_rate = batches_rate(make_lodo_split(streamed, "sketch", seed=0), reps)
    train_reps = 1 if quick else (3 if size > 100 else 5)
    stems = [("imagenet_stem", False)] + ([("small_input_stem", True)] if size <= 64 else [])
    rows = {}
    for label, small in stems:
        train = train_rate(split, small, train_reps, device)
        rows[label] = {
            "train_images_per_s": round(train, 1),
            "pipeline_over_train": round(pipeline / train, 2),
            "data_share_of_step": round((1 / pipeline) / (1 / pipeline + 1 / train), 3),
            "streaming_over_train": round(stream_rate / train, 2),
        }
    return {
        "image_size": size,
        "images": n,
        "decode_images_per_s": round(n / decode_s, 1),
        "cache_load_s": round(cache_s, 3),
        "pipeline_images_per_s": round(pipeline, 1),
        "streaming_images_per_s": round(stream_rate, 1),
        "models": rows,
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The figures as the Markdown table of docs/datasets.md."""
    lines = [
        "| px | ResNet-18 stem | train step img/s | pipeline img/s (in memory) | pipeline / train | "
        "data share of a step | streaming img/s | streaming / train | decode img/s (once) | cache load s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for stem, m in r["models"].items():
            cells = [
                r["image_size"],
                stem.replace("_", " "),
                m["train_images_per_s"],
                r["pipeline_images_per_s"],
                f"{m['pipeline_over_train']}x",
                f"{m['data_share_of_step']:.1%}",
                r["streaming_images_per_s"],
                f"{m['streaming_over_train']}x",
                r["decode_images_per_s"],
                r["cache_load_s"],
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few images and steps (a smoke run)")
    parser.add_argument("--sizes", default="64,224", help="working resolutions, comma-separated")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's); 1 is robust "
        "to other processes competing for the cores, which otherwise stall multi-threaded ops",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the model and transforms run")
    parser.add_argument("--json", type=Path, default=None, help="output (default benchmarks/results/...)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    per_class = 4 if args.quick else 24  # full: 4 x 7 x 24 = 672 images
    stem = (
        "data_pipeline"
        + ("" if args.device == "cpu" else f"_{args.device}")
        + (f"_{args.threads}thread" if args.threads else "")
        + ("_quick" if args.quick else "")
    )
    out = args.json or Path(__file__).parent / "results" / f"{stem}.json"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "PACS"
        n = make_folder(root, per_class)
        device = torch.device(args.device)
        results = [
            measure(root, Path(tmp) / "cache", int(s), args.quick, device) for s in args.sizes.split(",")
        ]
    report = {
        "benchmark": "data pipeline vs ResNet-18 training step (images/s)",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # Other processes compete for the cores: figures taken under load are pessimistic.
            "load_average_1m_at_start_and_end": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        },
        "dataset": f"generated PACS-shaped folder, {n} JPEGs of 227x227",
        "batch": f"3 source domains x {PER_DOMAIN_BATCH} images",
        "quick": args.quick,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown_table(results))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
