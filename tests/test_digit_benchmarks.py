"""The embedded styled and coloured digits: construction as documented, against independent code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.datasets import load_digits

from dgprune.data import load_colored_digits, load_dataset, load_styled_digits
from dgprune.data.digit_styles import BLUR_SIGMA, LABEL_NOISE, NOISE_STD
from dgprune.data.digits import digit_domain_indices, load_rotated_digits
from dgprune.errors import ConfigError

STYLES = ["clean", "noisy", "blurred", "inverted", "edges", "thick"]


@pytest.fixture(scope="module")
def source() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return d.images / 16.0, d.target


@pytest.fixture(scope="module")
def styled():
    return load_styled_digits(seed=0)


@pytest.fixture(scope="module")
def colored():
    return load_colored_digits(seed=0)


def _expected_style(style: str, x: np.ndarray) -> np.ndarray:
    """The documented transform of [n, 8, 8] images, written with scipy.ndimage (zero borders)."""
    if style == "clean":
        return x
    if style == "inverted":
        return 1.0 - x
    if style == "thick":
        cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
        return np.stack([ndimage.grey_dilation(im, footprint=cross, mode="constant", cval=0.0) for im in x])
    if style == "blurred":
        offsets = np.arange(5) - 2.0
        line = np.exp(-(offsets**2) / (2 * BLUR_SIGMA**2))
        kernel = np.outer(line, line) / np.outer(line, line).sum()
        return np.stack([ndimage.correlate(im, kernel, mode="constant", cval=0.0) for im in x])
    if style == "edges":
        out = []
        for im in x:
            mag = np.hypot(ndimage.sobel(im, 0, mode="constant"), ndimage.sobel(im, 1, mode="constant"))
            out.append(mag / mag.max())
        return np.stack(out)
    raise AssertionError(style)


def test_styled_digits_shape_and_classes(styled) -> None:
    assert styled.name == "styled_digits" and styled.domain_names == STYLES
    assert styled.input_shape == (1, 8, 8) and styled.classes == [str(c) for c in range(10)]
    assert sum(len(d) for d in styled.domains) == 1797
    for d in styled.domains:
        assert d.images.dtype == torch.float32 and d.images.min() >= 0 and d.images.max() <= 1


def test_styled_domains_are_disjoint_dealt_digits_in_their_style(styled, source) -> None:
    images, digits = source
    dealt = digit_domain_indices(len(images), len(STYLES), seed=0)  # rotated_digits' dealing
    seen = np.concatenate([idx.numpy() for idx in dealt])
    assert len(seen) == len(set(seen.tolist())) == len(images)  # no digit in two domains, none left out
    for domain, idx in zip(styled.domains, dealt, strict=True):
        idx = idx.numpy()
        np.testing.assert_array_equal(domain.labels.numpy(), digits[idx])
        got = domain.images[:, 0].double().numpy()
        if domain.name == "noisy":
            clean = images[idx]
            assert not np.allclose(got, clean)
            # On the black background, clip(0 + N(0, s^2)) is 0 half the time, else half-normal, whose
            # root mean square is s (values above 1 are 3.3 s away: negligible).
            background = got[clean == 0]
            assert abs(float((background == 0).mean()) - 0.5) < 0.02
            lit = background[background > 0]
            assert abs(math.sqrt(float((lit**2).mean())) - NOISE_STD) < 0.01
        else:
            np.testing.assert_allclose(got, _expected_style(domain.name, images[idx]), atol=1e-6)


def test_inverted_is_one_minus_clean_of_the_same_images(source) -> None:
    images, _ = source
    ds = load_styled_digits(styles=["inverted", "clean"], seed=5)
    idx = digit_domain_indices(len(images), 2, seed=5)[0].numpy()
    np.testing.assert_allclose(ds.domain("inverted").images[:, 0].numpy(), 1 - images[idx], atol=1e-6)


def test_styled_digits_seeded(styled) -> None:
    again = load_styled_digits(seed=0)
    other = load_styled_digits(seed=1)
    for a, b, c in zip(styled.domains, again.domains, other.domains, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert not torch.equal(a.images, c.images)


def test_styled_digits_options_and_errors() -> None:
    ds = load_dataset("styled_digits", styles=["edges", "clean"], seed=2)
    assert ds.domain_names == ["edges", "clean"] and sum(len(d) for d in ds.domains) == 1797
    with pytest.raises(ConfigError, match=r"unknown style.*'wavy'.*valid: clean"):
        load_styled_digits(styles=["clean", "wavy"])
    with pytest.raises(ConfigError, match="at most once"):
        load_styled_digits(styles=["clean", "clean"])


def test_colored_digits_shape_and_names(colored) -> None:
    assert colored.name == "colored_digits" and colored.domain_names == ["+90%", "+80%", "-90%"]
    assert colored.input_shape == (2, 8, 8) and colored.classes == ["5-9", "0-4"]
    assert sum(len(d) for d in colored.domains) == 1797
    names = load_colored_digits(environments=(0.5, 0.3, 0.75)).domain_names
    assert names == ["+50%", "+70%", "-75%"]


def _binomial_tolerance(p: float, n: int) -> float:
    return 4 * math.sqrt(p * (1 - p) / n)  # 4 standard deviations: a false alarm ~1 in 16,000


def test_colored_digits_follow_the_colour_law(colored, source) -> None:
    images, digits = source
    dealt = digit_domain_indices(len(images), 3, seed=0)
    flips = {"+90%": 0.1, "+80%": 0.2, "-90%": 0.9}
    disagree, total = 0, 0
    for domain, idx in zip(colored.domains, dealt, strict=True):
        idx = idx.numpy()
        x, y = domain.images.numpy(), domain.labels.numpy()
        sums = x.sum(axis=(2, 3))  # [n, 2]
        assert np.all((sums[:, 0] == 0) | (sums[:, 1] == 0))  # one channel is zeroed
        color = (sums[:, 1] > 0).astype(int)  # 0 red, 1 green
        np.testing.assert_allclose(x.sum(axis=1), images[idx], atol=1e-6)  # the shape is the digit's
        clean_label = (digits[idx] < 5).astype(int)  # DomainBed: 1 for digits 0-4
        disagree += int((y != clean_label).sum())
        total += len(y)
        agreement = float((color == y).mean())
        expected = 1 - flips[domain.name]
        assert abs(agreement - expected) < _binomial_tolerance(expected, len(y)), domain.name
    assert abs(disagree / total - LABEL_NOISE) < _binomial_tolerance(LABEL_NOISE, total)


def test_colored_digits_seeded_and_errors(colored) -> None:
    again, other = load_colored_digits(seed=0), load_colored_digits(seed=1)
    for a, b, c in zip(colored.domains, again.domains, other.domains, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert not torch.equal(a.labels, c.labels)
    ds = load_dataset("colored_digits", environments=[0.0, 1.0], seed=0)
    for domain, agree in zip(ds.domains, (1, 0), strict=True):  # e = 0: colour is the label; 1: its opposite
        color = (domain.images.sum(dim=(2, 3))[:, 1] > 0).long()
        assert torch.equal(color == domain.labels, torch.full_like(domain.labels, agree, dtype=torch.bool))
    with pytest.raises(ConfigError, match=r"colour-flip probabilities in \[0, 1\]"):
        load_colored_digits(environments=(0.1, 1.5))
    with pytest.raises(ConfigError, match="duplicate domain names"):
        load_colored_digits(environments=(0.1, 0.1))


def test_rotated_digits_without_some_default_angles_is_named_apart():
    """As the styled digits below; an angle outside the defaults keeps the plain name."""
    assert load_rotated_digits([0, 15, 45, 60, 75]).name == "rotated_digits-no-30"
    assert load_rotated_digits([75, 0]).name == "rotated_digits-no-15-no-30-no-45-no-60"
    assert load_rotated_digits().name == load_rotated_digits([0, 7.5, 90]).name == "rotated_digits"


def test_styled_digits_without_some_styles_is_named_apart():
    """A leave-one-source-out run (the true target left out) must not share table cells with the
    full benchmark's runs: its dataset name says which styles are missing."""
    assert (
        load_styled_digits(["noisy", "blurred", "inverted", "edges", "thick"]).name
        == "styled_digits-no-clean"
    )
    assert (
        load_styled_digits(["thick", "clean"]).name
        == "styled_digits-no-noisy-no-blurred-no-inverted-no-edges"
    )
