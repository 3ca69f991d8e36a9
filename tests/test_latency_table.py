"""The latency lookup table (pruning/latency_table.py): grids, interpolation, caching with keys that make a
stale table impossible to reuse, and the model prediction built from it (issue 18 §2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dgprune.models import build_model
from dgprune.pruning import latency_table as lut
from dgprune.pruning.cost_model import ChannelStructure
from dgprune.pruning.groups import find_channel_groups
from dgprune.pruning.latency_table import (
    Conditions,
    LatencyTable,
    LayerTable,
    cache_path,
    latency_table,
    load_table,
    table_keys,
    width_grid,
)
from dgprune.pruning.measure import conv_widths

MNIST_SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mnist() -> tuple[torch.nn.Module, ChannelStructure]:
    model = build_model("mnist_cnn", 10, in_channels=1)
    example = torch.zeros(1, *MNIST_SHAPE)
    return model, ChannelStructure.of(model, find_channel_groups(model, example), example)


@pytest.mark.parametrize(
    ("dense", "round_to", "points", "least", "expected"),
    [
        (64, 8, 8, 1, [8, 16, 24, 32, 40, 48, 56, 64]),
        (64, 8, 100, 1, [8, 16, 24, 32, 40, 48, 56, 64]),  # never more than the reachable widths
        (10, 8, 8, 1, [8, 10]),  # the dense width is always measured
        (6, 8, 8, 1, [6]),  # narrower than round_to: never pruned, one width
        (128, 8, 3, 32, [32, 80, 128]),  # from the floor (max_layer_prune), step a multiple of 8
        (5, 1, 8, 1, [1, 2, 3, 4, 5]),
        (128, 1, 4, 1, [1, 44, 87, 128]),  # thinned: at most `points` widths
    ],
)
def test_the_grid_holds_reachable_widths_only(dense, round_to, points, least, expected):
    grid = width_grid(dense, round_to, points, least)
    assert grid == expected
    assert len(grid) <= points and grid == sorted(set(grid))
    assert all(w % round_to == 0 or w == dense for w in grid)


def test_interpolation_is_bilinear_and_clamped():
    table = LayerTable([8, 16], [8, 24], [[1.0, 3.0], [2.0, 6.0]])
    assert table(8, 8) == 1.0 and table(16, 24) == 6.0
    # halfway on both axes: the mean of the four corners
    assert table(12, 16) == pytest.approx((1.0 + 3.0 + 2.0 + 6.0) / 4)
    assert table(12, 8) == pytest.approx(1.5) and table(8, 20) == pytest.approx(1.0 + 2.0 * 0.75)
    assert table(4, 4) == 1.0 and table(32, 40) == 6.0  # outside the grid: its nearest entry


def test_a_table_is_made_monotone_in_both_widths():
    table = LayerTable([1, 2, 3], [1, 2], [[1.0, 0.5], [0.8, 2.0], [3.0, 1.0]])
    table.make_monotone()
    assert table.ms == [[1.0, 1.0], [1.0, 2.0], [3.0, 3.0]]
    for i in range(3):
        for o in range(2):
            # every entry is the largest raw entry at equal or smaller widths (computed independently)
            assert table.ms[i][o] >= max(table.ms[a][b] for a in range(i + 1) for b in range(o + 1))


def test_measured_table_predicts_the_dense_model_by_construction_and_sums_the_layers(tmp_path: Path):
    model, structure = _mnist()
    conditions = Conditions("torch", 1, 1, MNIST_SHAPE)
    table = latency_table(model, structure, conditions, round_to=8, points=2, cache_dir=tmp_path)
    convs = [layer.name for layer in structure.layers if layer.kind == "conv"]
    assert sorted(table.layers) == sorted(convs)
    assert table.layers["conv2"].in_grid == [8, 64] and table.layers["conv2"].out_grid == [8, 128]
    assert table.layers["conv1"].in_grid == [1]  # the image's channel: fixed
    assert all(ms > 0 for t in table.layers.values() for row in t.ms for ms in row)
    widths = [24, 40, 128, 16]
    entries = 0.0
    inputs = {"conv1": 1, "conv2": widths[0], "conv3": widths[1], "conv4": widths[2]}
    for index, name in enumerate(convs):
        entries += table.layers[name](inputs[name], widths[index])
    assert table.predict_ms(structure, widths, calibrated=False) == pytest.approx(table.rest_ms + entries)
    # calibrated: the fit of the entries' sum and the convs' output elements (a 28 x 28 map, then 14 x 14)
    elements = sum(w * p for w, p in zip(widths, (28 * 28, 14 * 14, 14 * 14, 14 * 14), strict=True))
    assert structure.activations(widths) == elements
    fit = table.fit
    assert fit is not None and fit.conv_scale >= 0 and fit.ms_per_kilo_activation >= 0
    by_hand = fit.conv_scale * entries + fit.ms_per_kilo_activation * elements / 1000 + fit.constant_ms
    assert table.predict_ms(structure, widths) == pytest.approx(by_hand)
    # the constant is the dense model's measured latency minus its layers: at dense widths, that latency,
    # which is also the first calibration sample
    dense_layers = sum(table.layers[n](structure.layers[i].in_dense, structure.layers[i].out_dense)
                       for i, n in enumerate(convs))  # fmt: skip
    uncalibrated = table.predict_ms(structure, structure.group_sizes, calibrated=False)
    assert uncalibrated == pytest.approx(table.rest_ms + dense_layers)
    assert fit.points[0]["filters"] == 1.0 and fit.points[0]["measured_ms"] == pytest.approx(uncalibrated)
    assert fit.points[0]["fitted_ms"] == pytest.approx(uncalibrated)  # the fit is exact at dense widths
    assert [round(p["filters"], 3) for p in fit.points[1:]] == [
        0.009,
        0.25,
        0.5,
        0.75,
    ]  # floors (1, none given), 1/4..3/4
    assert table.build_s > 0
    # the fit is stored with the table and read back
    assert latency_table(model, structure, conditions, round_to=8, points=2, cache_dir=tmp_path).fit == fit


def _law_ms(model: torch.nn.Module, positions: dict[str, int]) -> float:
    """A latency law the fit can represent: 2 x the convs' MACs (in units of 1e-6 ms) + 0.05 ms per
    1000 conv output elements + 3 ms."""
    macs = elements = 0
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.Conv2d):
            macs += (
                conv.in_channels
                * conv.out_channels
                * conv.kernel_size[0]
                * conv.kernel_size[1]
                * positions[name]
            )
            elements += conv.out_channels * positions[name]
    return 2e-6 * macs + 0.05 * elements / 1000 + 3.0


def test_the_fit_recovers_a_latency_law_and_predicts_models_it_never_measured(monkeypatch):
    """Fake timers (no wall clock): a conv alone costs 1e-6 ms per MAC, a whole model follows _law_ms.
    Bilinear interpolation is exact for the product of widths, so the calibrated table must recover the
    law's coefficients from its five calibration models and predict any other widths exactly, the
    compressed model built for real; the uncalibrated prediction (entries + one constant) does not."""
    from dgprune.pruning.latency_fit import narrowed_copy
    from dgprune.pruning.schedule import group_floors

    model, structure = _mnist()
    positions = {layer.name: layer.out_positions for layer in structure.layers}
    monkeypatch.setattr(
        lut, "_conv_timer", lambda conditions: lambda layer, w_in, w_out: (
            1e-6 * w_in * w_out * layer.kernel_size * layer.out_positions)
    )  # fmt: skip
    measured: list[int] = []

    def fake_interleaved(models, conditions, rounds=lut.ROUNDS):
        measured.extend(sum(conv_widths(m).values()) for m in models)
        return [_law_ms(m, positions) for m in models]

    monkeypatch.setattr(lut, "interleaved_ms", fake_interleaved)
    floors = group_floors(structure.group_sizes, 8)
    table = lut.measure_table(model, structure, Conditions("torch", 1, 1, MNIST_SHAPE), 8, 3, floors)
    fit = table.fit
    assert fit is not None and len(measured) == 5  # dense, floors, 1/4, 1/2, 3/4
    assert (fit.conv_scale, fit.ms_per_kilo_activation, fit.constant_ms) == pytest.approx(
        (2, 0.05, 3), rel=1e-6
    )
    example = torch.zeros(1, *MNIST_SHAPE)
    for widths in ([8, 16, 120, 128], [32, 8, 64, 128], [24, 56, 8, 8]):
        truth = _law_ms(narrowed_copy(model, structure, widths, example), positions)
        assert table.predict_ms(structure, widths) == pytest.approx(truth, rel=1e-6)
    # one constant for all but the convs is exact at the dense widths only
    assert table.predict_ms(structure, [8, 16, 120, 128], calibrated=False) != pytest.approx(
        _law_ms(narrowed_copy(model, structure, [8, 16, 120, 128], example), positions), rel=1e-3
    )


@pytest.mark.parametrize("seed", range(6))
def test_the_fit_goes_through_the_dense_model_and_is_the_bounded_least_squares(seed: int):
    """Against scipy's SLSQP on the problem as stated (squared relative error of the narrowed samples,
    the dense sample exact, conv_scale and ms_per_kilo_activation >= 0), on random samples, some of
    whose unconstrained fits have a negative coefficient."""
    import numpy as np
    from scipy.optimize import minimize

    from dgprune.pruning.latency_fit import fit_latency

    rng = np.random.default_rng(seed)
    conv = np.sort(rng.uniform(1, 50, 6))[::-1].copy()  # the first sample is the widest: dense
    kilo = np.sort(rng.uniform(0.5, 20, 6))[::-1].copy()
    measured = 1.5 * conv + rng.uniform(-0.3, 0.3) * kilo + 4 + rng.normal(0, 1, 6)
    fit = fit_latency(list(zip(conv, kilo * 1000, strict=True)), measured.tolist())
    ours = np.array([fit.conv_scale, fit.ms_per_kilo_activation, fit.constant_ms])

    def predicted(x):
        return x[0] * conv + x[1] * kilo + x[2]

    def objective(x):
        return float(np.sum((predicted(x)[1:] / measured[1:] - 1) ** 2))

    reference = minimize(
        objective, np.array([1.0, 0.0, 0.0]), method="SLSQP",
        bounds=[(0, None), (0, None), (None, None)],
        constraints=[{"type": "eq", "fun": lambda x: predicted(x)[0] - measured[0]}],
        options={"ftol": 1e-14, "maxiter": 500},
    )  # fmt: skip
    assert reference.success
    assert predicted(ours)[0] == pytest.approx(measured[0], rel=1e-12)  # the dense model: exact
    assert objective(ours) <= objective(reference.x) + 1e-9
    assert ours[:2] == pytest.approx(reference.x[:2], abs=1e-4)


def test_without_a_narrowed_sample_the_fit_is_the_uncalibrated_prediction():
    from dgprune.pruning.latency_fit import fit_latency

    fit = fit_latency([(10.0, 2000.0)], [13.0])
    assert (fit.conv_scale, fit.ms_per_kilo_activation, fit.constant_ms) == (1.0, 0.0, 3.0)
    # a narrowed model measured slower than dense: no slope >= 0 fits it, the same fallback
    fit = fit_latency([(10.0, 2000.0), (5.0, 1000.0)], [13.0, 14.0])
    assert (fit.conv_scale, fit.ms_per_kilo_activation, fit.constant_ms) == (1.0, 0.0, 3.0)


def _counting(monkeypatch) -> list[Conditions]:
    """Replace the measurement by a fast fake that records the conditions it was asked for."""
    calls: list[Conditions] = []

    def fake(model, structure, conditions, round_to=1, points=8, floors=None):
        calls.append(conditions)
        return LatencyTable({}, {}, rest_ms=float(conditions.threads * 100 + conditions.input_shape[-1]))

    monkeypatch.setattr(lut, "measure_table", fake)
    return calls


def test_a_cached_table_is_reused_only_in_the_same_conditions(tmp_path: Path, monkeypatch):
    model, structure = _mnist()
    calls = _counting(monkeypatch)
    base = Conditions("torch", 1, 1, MNIST_SHAPE)
    first = latency_table(model, structure, base, points=2, cache_dir=tmp_path)
    again = latency_table(model, structure, base, points=2, cache_dir=tmp_path)
    assert len(calls) == 1 and again.rest_ms == first.rest_ms  # read back, not measured again
    others = [
        Conditions("onnxruntime", 1, 1, MNIST_SHAPE),  # another runtime
        Conditions("torch", 2, 1, MNIST_SHAPE),  # another thread count
        Conditions("torch", 1, 1, (1, 32, 32)),  # another input size
        Conditions("torch", 1, 8, MNIST_SHAPE),  # another batch size
    ]
    for conditions in others:
        latency_table(model, structure, conditions, points=2, cache_dir=tmp_path)
    assert calls[1:] == others  # each measured afresh
    assert len(list(tmp_path.glob("lut-*.json"))) == 5
    latency_table(model, structure, base, points=3, cache_dir=tmp_path)  # another grid
    assert len(calls) == 6


def test_a_file_with_other_keys_is_never_used_even_under_the_right_name(tmp_path: Path, monkeypatch):
    """The keys stored in the file are compared on load: a table measured with 2 threads, copied (or
    hashed) to the place of the 1-thread table, is refused and measured again."""
    model, structure = _mnist()
    calls = _counting(monkeypatch)
    one = Conditions("torch", 1, 1, MNIST_SHAPE)
    two = Conditions("torch", 2, 1, MNIST_SHAPE)
    latency_table(model, structure, two, points=2, cache_dir=tmp_path)
    keys_one, keys_two = table_keys(structure, one, 1, 2), table_keys(structure, two, 1, 2)
    stale = cache_path(keys_two, tmp_path)
    target = cache_path(keys_one, tmp_path)
    target.write_text(stale.read_text())
    assert load_table(target, keys_one) is None and load_table(stale, keys_two) is not None
    table = latency_table(model, structure, one, points=2, cache_dir=tmp_path)
    assert len(calls) == 2 and table.keys["threads"] == 1 and table.rest_ms == 100 + 28
    assert json.loads(target.read_text())["keys"]["threads"] == 1  # replaced by the right one
    for key in ("architecture", "input_shape", "runtime", "threads", "batch_size", "torch", "cpu"):
        assert key in keys_one
    other_arch = ChannelStructure.of(
        build_model("mnist_cnn", 7, in_channels=1), find_channel_groups(model, torch.zeros(1, *MNIST_SHAPE)),
        torch.zeros(1, *MNIST_SHAPE),
    )  # fmt: skip
    assert table_keys(other_arch, one, 1, 2)["architecture"] != keys_one["architecture"]
    target.write_text("{not json")
    assert load_table(target, keys_one) is None  # a damaged file is measured again too


def test_onnxruntime_times_a_single_conv_model():
    pytest.importorskip("onnxruntime")
    _, structure = _mnist()
    conv2 = next(layer for layer in structure.layers if layer.name == "conv2")
    conditions = Conditions("onnxruntime", 1, 1, MNIST_SHAPE)
    assert lut._ort_conv_ms(conv2, 16, 32, conditions) > 0
    assert lut._torch_conv_ms(conv2, 16, 32, Conditions("torch", 1, 1, MNIST_SHAPE)) > 0


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.delenv(lut.CACHE_ENV, raising=False)
    monkeypatch.setenv("DGPRUNE_CACHE_DIR", str(tmp_path / "c"))
    assert lut.default_cache_dir() == tmp_path / "c" / "latency"  # beside the dataset cache
    monkeypatch.setenv(lut.CACHE_ENV, str(tmp_path / "lut"))
    assert lut.default_cache_dir() == tmp_path / "lut"
