"""The shared parts of the command line (issue 13, point 5): option groups, and the library functions
the commands call (a model directory's input shape, a report's inputs)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import pytest
import typer

from dgprune.cli.options import DataOptions, RunOptions, with_option_groups
from dgprune.errors import ConfigError, WeightsError
from dgprune.experiments.store import RunResult, RunSpec, Store
from dgprune.models import build_model
from dgprune.pruning.surgery import STRUCTURE_FILE, save_compressed, saved_input_shape
from dgprune.report.database import read_report_inputs


def test_an_option_group_is_spelled_out_in_place_and_gathered_back():
    seen = {}

    @with_option_groups
    def command(
        out: Annotated[Path, typer.Option()],
        run: RunOptions,
        data: DataOptions,
        steps: Annotated[int, typer.Option()] = 1,
    ) -> None:
        seen.update(out=out, run=run, data=data, steps=steps)

    names = list(inspect.signature(command).parameters)
    assert names == [
        "out",
        *("config", "set_values", "target", "test_env", "seed", "device"),
        *("data", "data_root", "image_size", "download", "skip_bad_images"),
        "steps",
    ]
    given = dict.fromkeys(names[1:-1])
    given.update(download=False, skip_bad_images=True, data="pacs", data_root=Path("/d"), seed=3)
    command(out=Path("o"), steps=2, **given)
    assert seen["run"] == RunOptions(seed=3)
    assert seen["data"] == DataOptions(data="pacs", data_root=Path("/d"), skip_bad_images=True)
    assert (seen["out"], seen["steps"]) == (Path("o"), 2)
    # Only the flags given override a config file's data options.
    assert seen["data"].overrides() == {"name": "pacs", "options": {"root": "/d", "skip_bad_images": True}}
    assert DataOptions().overrides() == {"name": None, "options": {}}


def test_a_group_may_not_repeat_an_option_of_the_command():
    with pytest.raises(TypeError, match="repeats a parameter name"):

        @with_option_groups
        def command(seed: int, run: RunOptions) -> None: ...


def _model_dir(directory: Path, input_shape: tuple[int, ...] | None) -> Path:
    spec = {"name": "mnist_cnn", "num_classes": 3, "in_channels": 1, "small_input": False}
    save_compressed(directory, build_model(**spec), {}, spec, input_shape)
    return directory


def test_saved_input_shape(tmp_path):
    assert saved_input_shape(_model_dir(tmp_path / "a", (1, 28, 28))) == (1, 28, 28)
    without = _model_dir(tmp_path / "b", None)
    with pytest.raises(WeightsError, match=f"{STRUCTURE_FILE}: no input_shape recorded"):
        saved_input_shape(without)


def test_report_inputs_of_an_empty_or_missing_database(tmp_path):
    with pytest.raises(ConfigError, match="no results database"):
        read_report_inputs(tmp_path / "missing.sqlite")
    db = tmp_path / "results.sqlite"
    Store(db).close()
    with pytest.raises(ConfigError, match="no finished runs to report yet"):
        read_report_inputs(db)


def test_report_inputs_are_the_done_runs_with_their_configs_and_widths(tmp_path):
    from test_report import record

    done, other, pending = (record("erm", "taylor", "erm", t, 0, 0.5) for t in ("0", "15", "30"))
    db = tmp_path / "results.sqlite"
    with Store(db) as store:
        store.register(
            (f"u{i}", [RunSpec(r.run_id, f"u{i}", "pruned", {"seed": i}, {})])
            for i, r in enumerate((done, other, pending))
        )
        store.record_done(done.run_id, RunResult(done, layer_widths=[["conv1", 32, 64]]))
        store.record_done(other.run_id, RunResult(other))  # no widths recorded

    inputs = read_report_inputs(db)
    assert sorted(r.run_id for r in inputs.records) == sorted([done.run_id, other.run_id])
    assert inputs.widths == {done.run_id: [["conv1", 32, 64]]}
    assert inputs.configs == {done.run_id: {"seed": 0}, other.run_id: {"seed": 1}}


@pytest.mark.parametrize(("criterion", "finetune"), [("none", None), ("ior", "erm"), ("taylor", "coral")])
def test_status_lines_and_done_lines_describe_a_run_alike(criterion, finetune):
    """`dgprune status` (from a database row) and the sweep's `done` line (from the record) name a
    run's settings with the same words: both come from experiments.records.describe_run."""
    from test_report import record

    from dgprune.cli.output import describe_row
    from dgprune.experiments.sweep import describe_result

    r = record("coral", criterion, finetune, "30", 2, cross=0.5)
    row = {
        "kind": "dense" if criterion == "none" else "pruned",
        "target_domain": r.target_domain,
        "seed": r.seed,
        "algorithm": r.algorithm,
        "criterion": r.criterion,
        "criterion_params": r.criterion_params,
        "keep_ratio": r.keep_ratio,
        "finetune_algorithm": r.finetune_algorithm,
    }
    expected = {
        "none": "target 30 seed 2 coral dense",
        "ior": "target 30 seed 2 coral ior keep 0.5",
        "taylor": "target 30 seed 2 coral taylor keep 0.5 ft coral",
    }[criterion]
    assert describe_row(row) == expected
    assert f": rotated_digits {expected}: intra" in describe_result(r)
