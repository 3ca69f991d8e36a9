"""Presets on the sweep machinery: `base_preset` (one home for the demo's budgets), the demo and table2
presets (their runs are paper_digits' runs), table2 run by run_sweep in grid order and resumed from the
database; the sweep package's structure (no import of the sweep package by the Ray runner)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from dgprune.errors import ConfigError
from dgprune.experiments.config import build_config, read_mapping
from dgprune.experiments.demo import DEMO_SETTINGS, TABLE2_ALGORITHMS, run_table2
from dgprune.experiments.records import read_records
from dgprune.experiments.sweep import PRESETS_DIR, load_sweep, preset_file, read_sweep_file, spec

ROOT = Path(__file__).parents[1]
# The demo's budgets as dgprune.experiments.demo defined them before they moved to presets/demo.yaml.
OLD_DEMO_SETTINGS = {
    "data": {"name": "rotated_digits", "val_fraction": 0.1, "data_seed": 0},
    "model": {"name": "mnist_cnn"},
    "pretrain": {"steps": 150, "batch_size": 32, "lr": 1e-3, "eval_every": 25},
    "prune": {"interval": 10, "max_per_step": 100, "steps": 100, "batch_size": 32, "eval_every": 20},
}
USERS_OF_DEMO_BASE = [
    PRESETS_DIR / "paper_digits.yaml",
    PRESETS_DIR / "criteria_study.yaml",
    PRESETS_DIR / "table2.yaml",
    ROOT / "benchmarks" / "round_to_sweep.yaml",
]


def test_the_demo_budgets_live_in_the_demo_preset_only():
    assert DEMO_SETTINGS == preset_file("demo").base == OLD_DEMO_SETTINGS
    for path in USERS_OF_DEMO_BASE:
        raw = read_mapping(path)
        assert raw["base_preset"] == "demo", path
        assert not {"data", "model", "pretrain", "prune"} & set(raw.get("base", {})), path  # not copied
        resolved = read_sweep_file(path).base
        assert {k: v for k, v in resolved.items() if k != "device"} == OLD_DEMO_SETTINGS, path


def test_base_preset_lies_under_the_files_base(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_preset": "demo",
                "base": {"pretrain": {"steps": 7}, "device": "cpu"},
                "grid": {"target": "0", "prune.keep_ratio": 0.5},
            }
        )
    )
    [config] = load_sweep(path, tmp_path / "out").configs()
    assert config.pretrain.steps == 7 and config.pretrain.batch_size == 32  # merged key by key
    overrides = {"pretrain": {"steps": 7}, "target": "0", "prune": {"keep_ratio": 0.5}}
    expected = build_config(base=OLD_DEMO_SETTINGS, overrides=overrides)
    assert config.run_id() == expected.run_id()


def test_unknown_base_preset_names_the_file_and_the_presets(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base_preset: dmo\ngrid: {target: '0'}\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    message = str(err.value)
    assert str(path) in message and "'dmo'" in message
    assert "valid: criteria_study, demo, methods_power, methods_study, paper_digits, table2" in message


def test_base_presets_that_lead_back_to_themselves_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(spec, "PRESETS_DIR", tmp_path)
    (tmp_path / "a.yaml").write_text("base_preset: b\n")
    (tmp_path / "b.yaml").write_text("base_preset: a\n")
    with pytest.raises(ConfigError, match=r"'a' leads back to itself \(a -> b -> a\)"):
        preset_file("a")


def test_demo_and_table2_presets_are_paper_digits_seed_0_runs():
    paper = load_sweep("paper_digits")
    seed0 = {c.run_id() for c in paper.configs() if c.seed == 0}
    seed0 |= {c.pretrain_id() for c in paper.configs() if c.seed == 0}
    demo = load_sweep("demo")
    table2 = load_sweep("table2")
    assert len(demo.run_ids()) == 6 * (1 + 2 * 2)  # per target: dense + {0.5, 0.3} x {taylor, ior}
    assert len(table2.run_ids()) == 6 * (2 + 3 + 3)  # ERM: dense + ERM ft; CORAL, Mixup: + own ft
    assert set(demo.run_ids()) | set(table2.run_ids()) == seed0
    assert TABLE2_ALGORITHMS == ("erm", "coral", "mixup")


def test_table2_runs_as_a_sweep_in_grid_order_and_resumes_from_the_database(tmp_path):
    tiny = {"pretrain": {"steps": 3, "eval_every": 3}, "prune": {"steps": 4, "interval": 1, "eval_every": 4}}
    args = dict(targets=["75"], algorithms=("CORAL", "erm"), device="cpu", overrides=tiny)
    labels: list[str] = []
    records = run_table2(tmp_path, progress_for=lambda label: labels.append(label), **args)
    # Built as the old grid built them: the preset's base, then the run's own settings.
    base = build_config(base=OLD_DEMO_SETTINGS, overrides={**tiny, "device": "cpu", "target": "75"})
    expected = []
    for algorithm, finetunes in (("coral", ["erm", "coral"]), ("erm", ["erm"])):
        pretrained = build_config(base=base.model_dump(), overrides={"pretrain": {"algorithm": algorithm}})
        expected.append(pretrained.pretrain_id())
        for finetune in finetunes:
            prune = {"criterion": "taylor", "keep_ratio": 0.5, "finetune_algorithm": finetune}
            expected.append(build_config(base=pretrained.model_dump(), overrides={"prune": prune}).run_id())
    assert [r.run_id for r in records] == expected  # in the order of --algorithms, dense first
    assert [(r.algorithm, r.finetune_algorithm) for r in records] == [
        ("coral", None),
        ("coral", "erm"),
        ("coral", "coral"),
        ("erm", None),
        ("erm", "erm"),
    ]
    coral = ["[75 coral] ", "[75 coral taylor-keep0.5] ", "[75 coral taylor-keep0.5-ft-coral] "]
    assert sorted(labels) == sorted([*coral, "[75 erm] ", "[75 erm taylor-keep0.5] "])
    assert [r.to_dict() for r in read_records(tmp_path / "results.json")] == [r.to_dict() for r in records]
    assert {Path(r.model_dir).parent.name for r in records} == {"pretrained", "runs"}

    labels.clear()
    again = run_table2(tmp_path, progress_for=lambda label: labels.append(label), **args)
    assert labels == []  # nothing ran: every record came from the database
    assert [r.to_dict() for r in again] == [r.to_dict() for r in records]
    assert json.loads((tmp_path / "results.json").read_text()) == [r.to_dict() for r in records]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def test_the_ray_runner_does_not_import_the_sweep_and_no_private_name_crosses_modules():
    experiments = ROOT / "src" / "dgprune" / "experiments"
    ray_imports = _imports(experiments / "ray_runner.py")
    assert not [m for m, _ in ray_imports if m.startswith("dgprune.experiments.sweep")]
    sources = [experiments / "demo.py", experiments / "ray_runner.py", *(experiments / "sweep").glob("*.py")]
    for path in sources:
        for module, names in _imports(path):
            if module.startswith("dgprune"):
                assert not [n for n in names if n.startswith("_")], (path.name, module, names)
