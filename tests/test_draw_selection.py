"""The report keeps, per pretraining slot, the hyper-parameter draw with the best source validation
accuracy (DomainBed's training-domain validation), and says so."""

from __future__ import annotations

import dataclasses

import pytest
from test_report import record

from dgprune.errors import ConfigError
from dgprune.report.export import check_one_run_per_cell, write_report
from dgprune.report.selection import select_draws_by_validation


def _config(target: str, seed: int, lr: float, keep: float | None) -> dict:
    prune = {"criterion": "taylor", "keep_ratio": keep} if keep is not None else {"criterion": "taylor"}
    return {
        "data": {"name": "rotated_digits"},
        "model": {"name": "mnist_cnn"},
        "target": target,
        "seed": seed,
        "pretrain": {
            "algorithm": "coral",
            "steps": 10,
            "lr": lr,
            "batch_size": 32,
            "hparams": {"mmd_gamma": lr},
        },
        "prune": prune,
    }


def _draws():
    """Two slots (targets 0 and 15, seed 0), two draws each (lr 1e-3, 1e-2): a dense and a pruned run
    per draw. The better-validated draw is lr 1e-2 for target 0 and lr 1e-3 for target 15, while the
    cross-domain accuracy (never used to select) points the other way."""
    records, configs = [], {}
    validation = {("0", 1e-3): 0.80, ("0", 1e-2): 0.90, ("15", 1e-3): 0.95, ("15", 1e-2): 0.70}
    for (target, lr), intra in validation.items():
        for criterion in ("none", "taylor"):
            r = record("coral", criterion, None if criterion == "none" else "erm", target, 0, cross=1 - intra)
            r = dataclasses.replace(
                r, run_id=f"{r.run_id}-{lr}", intra_acc=intra if criterion == "none" else 0.5
            )
            records.append(r)
            configs[r.run_id] = _config(target, 0, lr, None if criterion == "none" else 0.5)
    return records, configs


def test_each_slot_keeps_its_best_validated_draw_and_only_it():
    records, configs = _draws()
    with pytest.raises(ConfigError, match=r"differ in pretrain\.hparams\.mmd_gamma, pretrain\.lr"):
        check_one_run_per_cell(records, configs)  # without selection: two runs per cell
    selected, selection = select_draws_by_validation(records, configs)
    assert sorted(r.run_id for r in selected) == sorted(
        [
            "coral-none-None-0-0-0.01",
            "coral-taylor-erm-0-0-0.01",
            "coral-none-None-15-0-0.001",
            "coral-taylor-erm-15-0-0.001",
        ]
    )
    assert (selection.slots, selection.draws) == (2, 4)
    check_one_run_per_cell(selected, configs)  # one run per cell now


def test_without_several_draws_nothing_changes(tmp_path):
    records, configs = _draws()
    single = [r for r in records if r.run_id.endswith("-0.001")]
    selected, selection = select_draws_by_validation(single, configs)
    assert selected == single and selection.slots == 0
    report = write_report(single, tmp_path, plots=False, configs=configs)
    assert "Hyper-parameter search" not in (tmp_path / "report.md").read_text()
    assert report.draw_selection.slots == 0


def test_the_report_says_it_selected(tmp_path):
    records, configs = _draws()
    report = write_report(records, tmp_path, plots=False, configs=configs)
    assert report.to_dict()["hparam_draws"]["slots"] == 2
    assert "2 pretraining slot(s) had 4 hyper-parameter draws" in (tmp_path / "report.md").read_text()


def test_a_searched_sweep_runs_and_reports_through_the_console_script(tmp_path):
    """`dgprune sweep` then `dgprune report` on a 2-draw search (tiny budgets): the report keeps one
    draw per slot, the one whose dense model validated best, and prints that it selected."""
    import json
    import sqlite3

    import yaml
    from conftest import run_cli

    base = {
        "data": {"name": "rotated_digits"},
        "model": {"name": "mnist_cnn"},
        "pretrain": {"steps": 6, "eval_every": 3},
        "prune": {"steps": 8, "interval": 2, "batch_size": 16, "eval_every": 4},
        "device": "cpu",
    }
    grid = {"target": "0", "seed": 0, "hparams_seed": [0, 1], "prune.criterion": "taylor"}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"base": base, "grid": grid, "sweep": {"workers": 1}}))
    assert run_cli("sweep", str(path), "--quiet").returncode == 0
    result = run_cli("report", str(path), "--no-plots", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["hparam_draws"]["slots"] == 1 and report["hparam_draws"]["draws"] == 2
    with sqlite3.connect(tmp_path / "search-sweep" / "results.sqlite") as db:
        dense = db.execute(
            "SELECT run_id, intra_acc FROM runs WHERE kind = 'dense' ORDER BY position"
        ).fetchall()
    best = max(dense, key=lambda row: row[1])[0]  # ties: the first, as the report
    assert list(report["hparam_draws"]["kept"]) == [best]
