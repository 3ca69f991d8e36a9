"""Issue 11.5-6: the documented install (pins, extras, CPU-only route) and the pictures (README images,
the method sketch script, report plots titled correctly for one seed)."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from dgprune.experiments.records import ResultRecord
from dgprune.report import plots

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_pins_and_extras_are_documented() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert "torch>=2.4,<2.15" in deps and "torchvision>=0.19,<0.30" in deps and "torch-pruning~=1.6.1" in deps
    for pin in ("`torch>=2.4,<2.15`", "`torchvision>=0.19,<0.30`", "`torch-pruning~=1.6.1`"):
        assert pin in README
    extras = project["optional-dependencies"]
    assert {"onnx", "ray", "dev"} <= set(extras)
    documented = set(re.findall(r"^\| `([a-z]+)` \| ", README, flags=re.MULTILINE))
    assert set(extras) <= documented, f"extras missing from README's table: {set(extras) - documented}"
    # dev must hold what every other extra adds, so that the test command covers them all
    dev = {re.split(r"[<>=~\[; ]", r)[0] for r in extras["dev"]}
    for name, reqs in extras.items():
        assert {re.split(r"[<>=~\[; ]", r)[0] for r in reqs} <= dev, name


def test_readme_documents_a_cpu_only_install() -> None:
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in README
    install = README.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "cannot reach `download.pytorch.org`" in install  # says what could not be checked here
    assert re.search(r"CPU-only .*\| .*MiB .*\| `\.venv` [\d.]+ GiB", install)  # sizes, measured


def test_readme_images_exist() -> None:
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert {"docs/img/method_sketch.png", "docs/img/paper_digits_accuracy_vs_filters.png"} <= set(images)
    for image in images:
        data = (ROOT / image).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, image


def test_method_sketch_script_draws_the_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("method_sketch", ROOT / "docs/img/method_sketch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path / "sketch.png")
    written = module.main()
    assert written == tmp_path / "sketch.png" and written.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- report plots: one seed


def _record(criterion: str, target: str, seed: int, cross: float, keep: float = 0.5) -> ResultRecord:
    dense = criterion == "none"
    return ResultRecord(
        dataset="rotated_digits",
        target_domain=target,
        model="mnist_cnn",
        algorithm="erm",
        criterion=criterion,
        criterion_params={"alpha": 1.0, "alpha_mode": "fixed", "share": 1.0} if criterion == "ior" else {},
        keep_ratio=1.0 if dense else keep,
        seed=seed,
        intra_acc=0.95,
        cross_acc=cross,
        per_domain_acc={target: cross},
        worst_source_acc=0.9,
        filters_total=448,
        filters_kept=448 if dense else round(448 * keep),
        params=1000,
        macs=10000,
        params_dense=1000,
        macs_dense=10000,
        run_id=f"{criterion}-{target}-{seed}-{keep}",
        selected_step=10,
        model_dir="/nowhere",
        wall_time_s=1.0,
        finetune_algorithm=None if dense else "erm",
    )


def _records(seeds: list[int], targets: list[str]) -> list[ResultRecord]:
    return [
        _record(c, t, s, 0.8 + 0.01 * s) for s in seeds for t in targets for c in ("none", "taylor", "ior")
    ]


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the plot functions close, kept open for inspection."""
    kept: list = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    return kept


def _error_bars(fig) -> list[bool]:
    flags = []
    for ax in fig.axes:
        for container in ax.containers:
            if isinstance(container, ErrorbarContainer):
                flags.append(container.has_yerr)
            elif isinstance(container, BarContainer):
                flags.append(container.errorbar is not None)
    return flags


def test_accuracy_plot_for_one_seed_names_it_and_draws_no_error_bars(tmp_path: Path, figures: list) -> None:
    plots.plot_accuracy_vs_filters(_records([3], ["0", "75"]), tmp_path / "one.png", "one seed")
    title = figures[-1]._suptitle.get_text()
    assert "seed 3" in title and "standard error" not in title and "seed(s)" not in title
    bars = _error_bars(figures[-1])
    assert bars and not any(bars)

    plots.plot_accuracy_vs_filters(_records([0, 1], ["0", "75"]), tmp_path / "two.png", "two seeds")
    title = figures[-1]._suptitle.get_text()
    assert "± standard error over 2 seeds" in title
    assert all(_error_bars(figures[-1]))


def test_layer_width_plot_for_one_run_claims_no_spread(tmp_path: Path, figures: list) -> None:
    records = [r for r in _records([3], ["75"]) if r.criterion != "none"]
    widths = {r.run_id: [["conv1", 32, 64], ["conv2", 64, 128]] for r in records}
    plots.plot_layer_widths(records, widths, tmp_path / "widths.png", "one run")
    title = figures[-1].axes[0].get_title()
    assert "one run (target 75, seed 3)" in title and "standard error" not in title
    assert not any(_error_bars(figures[-1]))

    records = [r for r in _records([3], ["0", "75"]) if r.criterion != "none"]
    widths = {r.run_id: [["conv1", 32, 64], ["conv2", 64, 128]] for r in records}
    plots.plot_layer_widths(records, widths, tmp_path / "widths2.png", "two targets")
    title = figures[-1].axes[0].get_title()
    assert "mean over 2 runs (2 target(s) × seed 3)" in title and "standard error" in title
    dense, *pruned = _error_bars(figures[-1])  # the dense widths are exact: no error bar
    assert not dense and pruned and all(pruned)


def test_layer_width_plot_shades_any_number_of_keep_ratios(tmp_path: Path, figures: list) -> None:
    """A study at keep 100%, 90%, 50% and 30% (methods_study) once made a negative bar alpha."""
    records = []
    for keep in (1.0, 0.9, 0.5, 0.3):
        records += [replace(r, keep_ratio=keep, run_id=f"{r.run_id}-{keep}") for r in _records([0], ["75"])]
    records = [r for r in records if r.criterion != "none"]
    widths = {r.run_id: [["conv1", 32, 64], ["conv2", 64, 128]] for r in records}
    plots.plot_layer_widths(records, widths, tmp_path / "widths.png", "four keep ratios")
    alphas = sorted({bar.get_alpha() for c in figures[-1].axes[0].containers for bar in c if bar.get_alpha()})
    assert alphas == pytest.approx([0.3, 1.0 - 0.7 * 2 / 3, 1.0 - 0.7 / 3, 1.0])
