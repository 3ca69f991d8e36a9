"""What a user ships, measured as shipped: the int8 export (calibrated on source-domain images only) and
the evaluation of an exported ONNX file under ONNX Runtime (`dgprune export --int8`, `dgprune evaluate
--onnx`; docs/experiments.md, docs/benchmarks.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dgprune.data import LodoSplit, MultiDomainDataset
from dgprune.data.batches import image_sample
from dgprune.errors import ConfigError
from dgprune.experiments.config import RunConfig
from dgprune.experiments.pipeline import make_context
from dgprune.pruning.onnx_runtime import OnnxModel, quantize_int8, require_onnxruntime

DEFAULT_CALIBRATION_IMAGES = 256


def calibration_images(split: LodoSplit, count: int, seed: int) -> torch.Tensor:
    """Model-ready images of a seeded sample of the source domains' *train* parts, ``count`` in all
    (spread evenly, the first sources one more when it does not divide; a small domain gives what it
    has). Never the target (unseen in DG, as in training) nor the val splits (intra accuracy is
    measured on them)."""
    if count < 1:
        raise ConfigError(f"--calibration-images must be >= 1, got {count}")
    sources = split.train
    share, extra = divmod(count, len(sources))
    parts = [
        image_sample(domain, share + (i < extra), seed)
        for i, domain in enumerate(sources)
        if share + (i < extra) > 0
    ]
    return torch.cat(parts)


@dataclass(frozen=True)
class Calibration:
    """What calibrated an int8 model: how many images, from which source domains (train parts)."""

    images: int
    sources: tuple[str, ...]
    target: str

    def describe(self) -> str:
        return (
            f"{self.images} train images of the sources {', '.join(self.sources)}; "
            f"target {self.target} unseen"
        )


def export_int8(
    fp32_path: Path, out: Path, config: RunConfig, count: int, dataset: MultiDomainDataset | None = None
) -> Calibration:
    """Quantise the exported ``fp32_path`` (a model of the run ``config``) to int8 at ``out``,
    calibrated on :func:`calibration_images` of the run's split (its data, target and seed);
    ``dataset``: the run's data when already loaded."""
    require_onnxruntime()
    split = make_context(config, dataset).split
    images = calibration_images(split, count, config.seed)
    quantize_int8(fp32_path, out, images)
    return Calibration(len(images), tuple(split.source_names), split.target.name)


def load_onnx_for(path: Path, input_shape: tuple[int, ...], num_classes: int) -> OnnxModel:
    """The ONNX file as an :class:`OnnxModel`, checked against the data it will be evaluated on."""
    model = OnnxModel(path)
    model.check_input_shape(input_shape)
    with torch.inference_mode():
        width = model(torch.zeros(1, *input_shape)).shape[1]
    if width != num_classes:
        raise ConfigError(f"--onnx {path}: the model predicts {width} classes, the data has {num_classes}")
    return model
