"""Exported ONNX models under ONNX Runtime: run them as a torch module, and quantise them to int8.

What a user ships is the ONNX file, so it is what `dgprune evaluate --onnx` measures: `OnnxModel` wraps
an ONNX Runtime session as an eval-only ``nn.Module``, so the same evaluation code
(``training/evaluation.py``) and latency measure (``pruning/measure.py``) run the exported file.
`quantize_int8` writes an int8 copy by ONNX Runtime's static quantisation, calibrated on the images
it is given (the caller chooses them: dgprune passes source-domain images only, never the target).
Needs onnxruntime (the ``onnx`` extra).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dgprune.errors import ConfigError, WeightsError

ORT_EXTRA = "pip install 'dgprune[onnx]'"
# Activations uint8, weights int8 (per output channel): ONNX Runtime's recommended pairing for x86 CPUs.
# QDQ format: the file stays a float graph with Quantize/Dequantize pairs, which the session fuses into
# integer kernels (QLinearConv...) where it has them.
CALIBRATION_BATCH = 32
# Only the layers with weights: quantising the element-wise ops of an exported GroupNorm (MNIST_CNN) as
# well made the int8 model slower than this, and no faster on ResNet-18 (docs/benchmarks.md §7).
QUANTIZED_OPS = ("Conv", "Gemm")


def require_onnxruntime() -> Any:
    """The onnxruntime module, or one error line naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"running or quantising ONNX models needs onnxruntime: {ORT_EXTRA}") from None
    return onnxruntime


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU, called like the torch model it was exported from:
    float images ``[N, C, H, W]`` in, logits out. Eval only (no parameters, no gradients).

    ``threads``: the session's intra-op threads; default torch's thread count, so that one setting
    (e.g. ``OMP_NUM_THREADS``) gives torch and ONNX Runtime latencies measured alike.
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        ort = require_onnxruntime()
        if not path.is_file():
            raise ConfigError(f"--onnx {path}: no such file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1  # one chain of ops: a second pool would only compete for cores
        self.threads = options.intra_op_num_threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for a foreign or damaged file
            raise WeightsError(f"{path}: not a model ONNX Runtime can load ({_one_line(err)})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise WeightsError(f"{path}: expected one input (images), the model has {len(inputs)}")
        self.path = path
        self.input_name = inputs[0].name
        self.train(False)

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """WeightsError unless the file takes images of ``shape`` (C, H, W); symbolic axes accept any."""
        declared = self.session.get_inputs()[0].shape[1:]
        if len(declared) != len(shape) or any(
            isinstance(d, int) and d != s for d, s in zip(declared, shape, strict=False)
        ):
            raise WeightsError(
                f"{self.path}: the model takes inputs of shape {declared}, the data has {list(shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        logits = self.session.run(None, {self.input_name: images})[0]
        return torch.from_numpy(logits)


class _ImageBatches:
    """onnxruntime's CalibrationDataReader protocol (``get_next`` -> feed dict or None) over a tensor."""

    def __init__(self, input_name: str, images: torch.Tensor, batch_size: int) -> None:
        self._batches: Iterator[torch.Tensor] = iter(images.split(batch_size))
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        return {self.input_name: np.ascontiguousarray(batch.cpu().numpy(), dtype=np.float32)}


def quantize_int8(fp32_path: Path, out: Path, calibration: torch.Tensor) -> Path:
    """Write ``out``: the fp32 ONNX model ``fp32_path`` statically quantised to int8 (QDQ; the inputs
    of convolutions and linear layers uint8, their ranges from min/max over ``calibration``
    [n, C, H, W]; their weights int8 per output channel; everything else stays float). Only
    ``calibration`` is ever shown to the calibration: choose it from the data the model may see
    (dgprune: the source domains' train split)."""
    require_onnxruntime()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ConfigError("int8 calibration needs at least one image")

    class Reader(_ImageBatches, CalibrationDataReader):
        pass

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dgprune-int8-") as tmp:
        # Shape inference and graph optimisation first (BatchNorm folded into convs...), as onnxruntime
        # advises: ranges are then calibrated on the graph that will run.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        input_name = OnnxModel(prepared, threads=1).input_name
        quantize_static(
            str(prepared),
            str(out),
            Reader(input_name, calibration, CALIBRATION_BATCH),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return out
