"""Two harder embedded benchmarks built from scikit-learn's bundled 8x8 digits (nothing downloads).

Both deal the 1,797 digits into disjoint domains exactly as `rotated_digits` does (one seeded
`torch.randperm`, domain k takes every n_domains-th image from k), then change each domain differently:

- ``styled_digits``: each domain is drawn in its own *style* (PACS-like style shift of low-level
  statistics), 1 channel, 10 classes, values in [0, 1]. See `STYLES` for the exact transforms.
- ``colored_digits``: DomainBed's ColoredMNIST law applied to the digits: label = 1 if the digit is < 5
  else 0, flipped with probability 0.25; colour = label, flipped with the domain's probability e; the
  image is copied into two channels (0 red, 1 green) and channel 1 - colour zeroed. 2 channels,
  2 classes ("5-9", "0-4"), values in [0, 1]. Default domains '+90%', '+80%', '-90%' (e = 0.1, 0.2,
  0.9): the colour predicts the label in the sources better than the shape does, and the opposite way
  in '-90%'.

Every random draw comes from one generator seeded with the *data seed*, in a fixed order: the shuffle,
then per domain in order its draws (noise of the ``noisy`` style; label noise then colour noise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dgprune.data.domains import Domain, MultiDomainDataset
from dgprune.errors import ConfigError

NOISE_STD = 0.3  # ``noisy``: standard deviation of the added Gaussian noise (pixel range [0, 1])
BLUR_SIGMA = 1.0  # ``blurred``: Gaussian kernel's sigma in pixels (5 x 5 kernel)
LABEL_NOISE = 0.25  # ``colored_digits``: DomainBed's label-flip probability
DEFAULT_FLIPS: tuple[float, ...] = (0.1, 0.2, 0.9)  # DomainBed's '+90%', '+80%', '-90%'

StyleFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits as float [1797, 1, 8, 8] in [0, 1] (stored 0..16) and int64 digit labels."""
    from sklearn.datasets import load_digits  # deferred: sklearn import is slow and only needed here

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


def _deal(n: int, num_domains: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The dealing of `digits.digit_domain_indices` (same first draw of a generator seeded the same)."""
    perm = torch.randperm(n, generator=generator)
    return [perm[k::num_domains] for k in range(num_domains)]


# ---------------------------------------------------------------- styles


def _clean(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


def _noisy(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator) * NOISE_STD
    return (x + noise).clamp(0.0, 1.0)


def _gaussian_kernel(sigma: float, size: int = 5) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(line, line)
    return (kernel / kernel.sum()).view(1, 1, size, size)


def _blurred(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Zero padding: the background beyond the border is black, as the digits' own background.
    return F.conv2d(x, _gaussian_kernel(BLUR_SIGMA), padding=2)


def _inverted(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return 1.0 - x


SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _edges(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    gx = F.conv2d(x, SOBEL_X.view(1, 1, 3, 3), padding=1)
    gy = F.conv2d(x, SOBEL_X.t().contiguous().view(1, 1, 3, 3), padding=1)
    magnitude = torch.sqrt(gx**2 + gy**2)
    peak = magnitude.amax(dim=(1, 2, 3), keepdim=True)
    return magnitude / peak.clamp_min(1e-12)  # each image scaled to peak 1 (a blank image stays 0)


def _thick(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Grey-level dilation by a cross: each pixel takes the maximum of itself and its 4 neighbours (a full
    # 3 x 3 square fills most of an 8 x 8 digit). Zero padding; values are >= 0.
    padded = F.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    shifts = [padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in CROSS]
    return torch.stack(shifts).amax(dim=0)


CROSS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


STYLES: dict[str, StyleFn] = {
    "clean": _clean,  # the digits as they are
    "noisy": _noisy,  # + N(0, NOISE_STD^2) per pixel (seeded), clipped to [0, 1]
    "blurred": _blurred,  # 5 x 5 Gaussian blur, sigma BLUR_SIGMA, zero padding
    "inverted": _inverted,  # 1 - x: dark strokes on a white background
    "edges": _edges,  # Sobel gradient magnitude (zero padding), divided by the image's maximum
    "thick": _thick,  # grey dilation by a 3 x 3 cross (max of the pixel and its 4 neighbours)
}
DEFAULT_STYLES: tuple[str, ...] = tuple(STYLES)


def load_styled_digits(styles: Sequence[str] = DEFAULT_STYLES, seed: int = 0) -> MultiDomainDataset:
    """8x8 digits dealt into one disjoint domain per style (domain name = style), 1 channel, 10 classes.

    `seed` is the data seed (which digit lands in which domain, and the ``noisy`` style's noise).
    """
    styles = list(styles)
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        raise ConfigError(f"styled_digits: unknown style(s) {unknown}; valid: {', '.join(STYLES)}")
    if not styles or len(set(styles)) != len(styles):
        raise ConfigError(f"styled_digits needs at least one style, each at most once; got {styles}")
    images, labels = _load_digit_images()
    generator = torch.Generator().manual_seed(seed)
    domains = []
    for style, idx in zip(styles, _deal(len(images), len(styles), generator), strict=True):
        x = STYLES[style](images[idx], generator).clamp(0.0, 1.0)
        domains.append(Domain(style, x.contiguous(), labels[idx]))
    return MultiDomainDataset(_styled_name(styles), domains, [str(c) for c in range(10)])


def _styled_name(styles: list[str]) -> str:
    """``styled_digits``, or ``styled_digits-no-<style>...`` when default styles are left out (e.g. a
    leave-one-source-out validation run without the true target): tables keep those runs apart."""
    missing = [s for s in DEFAULT_STYLES if s not in styles]
    return "-".join(["styled_digits", *(f"no-{s}" for s in missing)])


# ---------------------------------------------------------------- colour


def environment_name(flip: float) -> str:
    """DomainBed's naming: colour agrees with the label in 1 - flip of the images; 0.1 -> '+90%',
    0.2 -> '+80%', 0.9 -> '-90%' (agrees in only 10%: 90% anti-correlated)."""
    agree = 1.0 - flip
    return f"+{100 * agree:g}%" if agree >= 0.5 else f"-{100 * flip:g}%"


def color_digits(
    images: torch.Tensor, digits: torch.Tensor, flip: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 1, H, W] digits -> ([n, 2, H, W] coloured images, binary noisy labels); draws label noise
    first, then colour noise, from `generator`."""
    n = len(images)
    labels = (digits < 5).to(torch.int64)
    labels = labels ^ (torch.rand(n, generator=generator) < LABEL_NOISE).to(torch.int64)
    colors = labels ^ (torch.rand(n, generator=generator) < flip).to(torch.int64)
    x = images.expand(-1, 2, -1, -1).clone()
    x[torch.arange(n), 1 - colors] = 0.0  # keep channel `colors` (0 red, 1 green)
    return x, labels


def load_colored_digits(environments: Sequence[float] = DEFAULT_FLIPS, seed: int = 0) -> MultiDomainDataset:
    """ColoredMNIST's law on the 8x8 digits: one disjoint domain per colour-flip probability in
    `environments` (named as DomainBed: 0.1 -> '+90%'), 2 channels, 2 classes. `seed`: the data seed."""
    flips = [float(e) for e in environments]
    bad = [e for e in flips if not 0.0 <= e <= 1.0]
    if not flips or bad:
        raise ConfigError(
            "colored_digits: environments must be colour-flip probabilities in [0, 1], "
            f"got {list(environments)}"
        )
    names = [environment_name(e) for e in flips]
    if len(set(names)) != len(names):
        raise ConfigError(f"colored_digits: environments give duplicate domain names {names}")
    images, digits = _load_digit_images()
    generator = torch.Generator().manual_seed(seed)
    domains = []
    for name, flip, idx in zip(names, flips, _deal(len(images), len(flips), generator), strict=True):
        x, y = color_digits(images[idx], digits[idx], flip, generator)
        domains.append(Domain(name, x, y))
    return MultiDomainDataset("colored_digits", domains, ["5-9", "0-4"])
