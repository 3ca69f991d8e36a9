"""The criteria_study preset: its grid, and the same grid on any MNIST-format data given by --set."""

from collections import Counter
from pathlib import Path

from test_mnist_data import write_mnist

from dgprune.experiments.sweep import load_sweep

CRITERIA = 14  # 13 criteria + IoR with alpha_mode: share


def test_preset_grid_is_every_criterion_on_both_embedded_benchmarks(tmp_path: Path):
    configs = load_sweep("criteria_study", out=tmp_path).configs()
    runs = Counter((c.data.name, c.target) for c in configs)
    assert runs == {
        ("rotated_digits", "0"): CRITERIA * 2 * 5,
        ("rotated_digits", "45"): CRITERIA * 2 * 5,
        ("colored_digits", "+90%"): CRITERIA * 2 * 5,
        ("colored_digits", "+80%"): CRITERIA * 2 * 5,
        ("colored_digits", "-90%"): CRITERIA * 2 * 5,
    }
    labels = {(c.prune.criterion, c.prune.criterion_params.get("alpha_mode")) for c in configs}
    assert len(labels) == CRITERIA and ("ior", "share") in labels and ("taylor", None) in labels


def test_preset_runs_unchanged_on_mnist_format_data_given_on_the_command_line(tmp_path: Path):
    folder = tmp_path / "mnist"
    write_mnist(folder)
    plain = load_sweep("criteria_study", out=tmp_path / "a")
    mnist = load_sweep(
        "criteria_study",
        out=tmp_path / "b",
        sets=["data.name=RotatedMNIST", f"data.options.root={folder}"],
    )
    configs = mnist.configs()
    by_data = Counter(c.data.name for c in configs)
    assert by_data == {"rotated_mnist": CRITERIA * 2 * 5 * 2, "colored_digits": CRITERIA * 2 * 5 * 3}
    assert {c.target for c in configs if c.data.name == "rotated_mnist"} == {"0", "45"}
    # The colored half is untouched: same runs, same ids as without --set.
    colored = {c.run_id() for c in configs if c.data.name == "colored_digits"}
    assert colored == {c.run_id() for c in plain.configs() if c.data.name == "colored_digits"}
