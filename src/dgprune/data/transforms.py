"""Batched image transforms: DomainBed's training augmentation and evaluation transform as tensor ops.

Images are stored as uint8 [n, C, S, S] at the working resolution; these transforms turn a batch of
them into float tensors for the model. Every random parameter is drawn *per sample* from the
generator passed in (DomainBatches' per-domain augmentation generator), all on the CPU and in a fixed
order, so a batch depends only on the generator state: resuming restores it exactly. The arithmetic
may run on another device (`device`), the random draws never do.

DomainBed's augmentation (datasets.py, `MultipleEnvironmentImageFolder`), in its order:
RandomResizedCrop(S, scale=(0.7, 1.0)) -> RandomHorizontalFlip() -> ColorJitter(0.3, 0.3, 0.3, 0.3)
-> RandomGrayscale(p=0.1) -> ToTensor -> Normalize(ImageNet). Its evaluation transform is
Resize((S, S)) -> ToTensor -> Normalize. Differences here (see docs/datasets.md): the crop is taken
from the stored S x S image (already squashed to a square like the evaluation transform) rather than
from the full-resolution file, and the colour operations run on floats, not on 8-bit PIL images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale and PIL's convert("L").
_LUMA = (0.2989, 0.587, 0.114)


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """None/"cpu" -> no move; "auto" -> CUDA when present; anything else is passed to torch."""
    if device is None:
        return None
    if str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    dev = torch.device(device)
    return None if dev.type == "cpu" else dev


def _to_float(x: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (ToTensor's scaling); float input is taken as already in [0, 1]."""
    if device is not None:
        x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


class ScaleToUnit:
    """uint8 -> float in [0, 1], nothing else: DomainBed's MNIST-type data have no augmentation."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = str(device) if device is not None else None

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _to_float(x, resolve_device(self.device))

    def output_shape(self, stored: tuple[int, int, int]) -> tuple[int, int, int]:
        return stored

    def __repr__(self) -> str:
        return "ScaleToUnit()"


class Normalize:
    """Shared by both image transforms: (x - mean) / std per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)


class EvalTransform:
    """DomainBed's evaluation transform on stored images: (resize to `size`,) scale to [0, 1], normalise.

    With images stored at `size` (the default) there is nothing to resize: the stored image *is*
    Resize((size, size)) of the file, computed by PIL as DomainBed does.
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        device: str | torch.device | None = None,
    ) -> None:
        self.size = size
        self.normalize = Normalize(mean, std)
        self.device = str(device) if device is not None else None

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _to_float(x, resolve_device(self.device))
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True).clamp_(0, 1)
        return self.normalize(x)

    def output_shape(self, stored: tuple[int, int, int]) -> tuple[int, int, int]:
        return stored[0], self.size, self.size

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, mean={self.normalize.mean}, std={self.normalize.std})"


# ---------------------------------------------------------------- random parameters (CPU, seeded)


def sample_resized_crops(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    attempts: int = 10,
) -> torch.Tensor:
    """Per-sample crop boxes [n, 4] = (top, left, h, w), with RandomResizedCrop's distribution.

    As torchvision: up to 10 tries of an area fraction ~ U(scale) and a log-uniform aspect ratio;
    the first box that fits is placed uniformly; if none fits, a centre crop clamped to `ratio`.
    All tries are drawn at once (vectorised), so the random stream differs from torchvision's, not
    the distribution.
    """
    area = height * width
    target = area * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(dim=1)  # index of the first fitting try (0 if none fits)
    rows = torch.arange(n)
    w, h = w[rows, first], h[rows, first]
    place = torch.rand(n, 2, generator=generator)
    top = torch.floor(place[:, 0] * (height - h + 1))
    left = torch.floor(place[:, 1] * (width - w + 1))
    # Fallback when no try fits: the largest centred box whose ratio lies within `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    none = ~fits.any(dim=1)
    h = torch.where(none, torch.full_like(h, fh), h)
    w = torch.where(none, torch.full_like(w, fw), w)
    top = torch.where(none, torch.full_like(top, (height - fh) // 2), top)
    left = torch.where(none, torch.full_like(left, (width - fw) // 2), left)
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def resized_crop(
    x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop box i of image i and resize it to size x size (bilinear), mirrored where `flip` is set.

    One batched `grid_sample` with a per-sample affine grid: it samples the same points as
    `F.interpolate(crop, mode="bilinear", align_corners=False)` (pixel centres, half-pixel offset),
    so a crop is resized as torchvision resizes a tensor (without antialiasing, which only matters
    when shrinking; crops here are at most the stored size).
    """
    n, _, height, width = x.shape
    b = boxes.to(device=x.device, dtype=x.dtype)
    top, left, h, w = b.unbind(dim=1)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    # Normalised input coordinate = centre + half-extent * output coordinate (align_corners=False).
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    if flip is not None:
        theta[:, 0, 0] = torch.where(flip.to(x.device), -theta[:, 0, 0], theta[:, 0, 0])
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------- colour operations (per-sample factors)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] -> [n, 1, H, W] luma."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (torchvision's `_blend` for float images)."""
    return torch.lerp(other.expand_as(x), x, factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)  # a blend with black


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # The mean of the grey image, from the channel means (the luma is linear): no grey image needed.
    luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)
    mean = (x.mean(dim=(-2, -1)) @ luma).view(-1, 1, 1, 1)
    f = factor.view(-1, 1, 1, 1)
    return (x * f).add_(mean * (1 - f)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` (fraction of a turn, per sample): RGB -> HSV, h += shift, HSV -> RGB.

    Same model as torchvision's `adjust_hue` on float tensors, written with few full-size ops (it is
    the costliest augmentation): the hue, in sixths of a turn, comes from the maximum channel (red
    wins ties, then green, as torchvision), and HSV -> RGB uses the closed form
    channel = v - (v - min) * clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1.
    """
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = chroma.masked_fill(chroma == 0, 1.0).reciprocal_()
    # Grey pixels (chroma 0) take the first branch with g - b = 0: hue 0, and their ramp is unused.
    sixths = torch.where(
        maxc == r, (g - b) * inv, torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0)
    )
    sixths += 6.0 * shift.view(-1, 1, 1)
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(sixths.unsqueeze(1) + offsets, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), ramp, value=-1.0)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-sample factors [n, 4] (brightness, contrast, saturation, hue) and per-sample
    order [n, 4] (a permutation of 0..3, as torchvision draws one per image)."""
    x = x.clone()
    factors = factors.to(x.device)
    order = order.to(x.device)
    for position in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            rows = (order[:, position] == op_index).nonzero().squeeze(1)
            if rows.numel():
                x[rows] = op(x[rows], factors[rows, op_index])
    return x


class DomainBedAugment:
    """DomainBed's training augmentation on a batch, with per-sample random parameters.

    `__call__(x, generator)`: x is uint8 [n, 3, H, W] (or float in [0, 1]); returns normalised float32
    [n, 3, size, size]. Draw order from `generator`: crop boxes, flips, jitter factors, jitter order,
    grayscale; the same generator state always gives the same batch.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.7, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.3),
        grayscale_p: float = 0.1,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        device: str | torch.device | None = None,
    ) -> None:
        self.size = size
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.flip_p, self.jitter, self.grayscale_p = flip_p, tuple(jitter), grayscale_p
        self.normalize = Normalize(mean, std)
        self.device = str(device) if device is not None else None

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None) -> dict:
        """All random parameters of a batch of n images (CPU tensors)."""
        boxes = sample_resized_crops(n, height, width, self.scale, self.ratio, generator)
        flip = torch.rand(n, generator=generator) < self.flip_p
        b, c, s, h = self.jitter
        lows = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        highs = torch.tensor([1 + b, 1 + c, 1 + s, h])
        factors = lows + (highs - lows) * torch.rand(n, 4, generator=generator)
        order = torch.rand(n, 4, generator=generator).argsort(dim=1)
        gray = torch.rand(n, generator=generator) < self.grayscale_p
        return {"boxes": boxes, "flip": flip, "factors": factors, "order": order, "gray": gray}

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        x = _to_float(x, resolve_device(self.device))
        x = resized_crop(x, params["boxes"], self.size, params["flip"])
        x = color_jitter(x, params["factors"], params["order"])
        gray = params["gray"].to(x.device).nonzero().squeeze(1)
        if gray.numel():
            x[gray] = grayscale(x[gray]).expand(-1, x.shape[1], -1, -1)
        return self.normalize(x)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.sample(len(x), x.shape[-2], x.shape[-1], generator))

    def output_shape(self, stored: tuple[int, int, int]) -> tuple[int, int, int]:
        return stored[0], self.size, self.size

    def __repr__(self) -> str:
        return (
            f"DomainBedAugment(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"flip_p={self.flip_p}, jitter={self.jitter}, grayscale_p={self.grayscale_p})"
        )
