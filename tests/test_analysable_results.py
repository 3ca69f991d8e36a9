"""Issue 19.4, results a researcher can analyse: every domain's accuracy at every evaluation (history,
TensorBoard, the record), never used to select; `runs.csv` and numeric report CSVs; the per-source
table. Numbers are checked against independent computations (the model's own predictions, the
database's records, a hand-made mean and standard error)."""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from dataclasses import replace

import pytest
import torch
import yaml
from conftest import run_cli

from dgprune.data import Domain, load_dataset, make_lodo_split
from dgprune.experiments.records import ResultRecord
from dgprune.models import build_model
from dgprune.report.flat import flat_rows
from dgprune.training import PretrainSettings, PruneSettings, pretrain, prune_and_finetune
from dgprune.training.evaluation import Evaluator
from dgprune.training.history import TensorBoardLogger, read_history, tensorboard_scalars
from dgprune.training.progress import ProgressEvent

CPU = torch.device("cpu")
DOMAINS = ["0", "15", "30", "45", "60", "75"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("rotated_digits")


def _accuracy(model, domain: Domain) -> float:
    """The share of ``domain`` the model classifies correctly, from one forward of all of it."""
    model.eval()
    with torch.no_grad():
        correct = model(domain.eval_batch(slice(None))).argmax(dim=1) == domain.labels
    return int(correct.sum()) / len(domain)


def test_every_split_against_the_models_own_predictions(digits):
    split = make_lodo_split(digits, "30", 0.1, seed=3)
    model = build_model("mnist_cnn", 10, 1)
    acc = Evaluator(split, CPU)(model)
    assert list(acc.splits) == ["0", "15", "45", "60", "75", "30"]
    for train, val, sample in zip(split.train, split.val, Evaluator(split, CPU).train_samples, strict=True):
        assert acc.splits[val.name]["val"] == _accuracy(model, val)
        # The train sample: as large as the val split, drawn from the train split, the same every time.
        assert len(sample) == len(val) and not torch.equal(sample.labels, val.labels)
        rows = {tuple(x.flatten().tolist()) for x in train.eval_batch(slice(None))}
        assert all(tuple(x.flatten().tolist()) in rows for x in sample.eval_batch(slice(None)))
        assert acc.splits[val.name]["train"] == _accuracy(model, sample)
    target = acc.splits["30"]
    assert target["target"] == acc.cross == _accuracy(model, split.target)
    # The target's val part is the very samples of its val split when it is a source.
    as_source = make_lodo_split(digits, "0", 0.1, seed=3)
    own_val = next(d for d in as_source.val if d.name == "30")
    assert target["target_val"] == _accuracy(model, own_val)
    n_val, n = len(own_val), len(split.target)
    assert (n_val * target["target_val"] + (n - n_val) * target["target_test"]) / n == pytest.approx(
        target["target"]
    )
    assert acc.per_domain_split == {d: "target" if d == "30" else "val" for d in acc.per_domain}


def _relabelled_target(split):
    """The same split, but the target's labels changed: what selection must never notice."""
    t = split.target
    return replace(split, target=Domain(t.name, t.images, (t.labels + 1) % 10, None, t.eval_transform))


def test_selection_never_looks_at_the_target(digits):
    split = make_lodo_split(digits, "45", 0.1, seed=0)
    other = _relabelled_target(split)
    outcomes, events = [], []
    for s in (split, other):
        logged: list[ProgressEvent] = []
        torch.manual_seed(0)
        model = build_model("mnist_cnn", 10, 1)
        settings = PretrainSettings(steps=6, eval_every=2, batch_size=8)
        outcomes.append(pretrain(model, s, settings, 0, CPU, progress=logged.append))
        example = torch.zeros(1, 1, 8, 8)
        prune = PruneSettings(steps=5, interval=2, max_per_step=1000, batch_size=8, eval_every=1)
        outcomes.append(prune_and_finetune(model, s, prune, 0, CPU, example, progress=logged.append))
        events.append([e for e in logged if e.domain_acc is not None])
    for a, b in ((outcomes[0], outcomes[2]), (outcomes[1], outcomes[3])):
        assert a.best_step == b.best_step and a.best_val == b.best_val
        assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)
    assert len(events[0]) == 3 + 4  # pretraining every 2 steps; pruning at every step from the target on
    targets = [
        (e.domain_acc["45"]["target"], f.domain_acc["45"]["target"]) for e, f in zip(*events, strict=True)
    ]
    assert any(x != y for x, y in targets)  # the target was measured, and differs
    sources = [{d: v for d, v in e.domain_acc.items() if d != "45"} for e in events[0]]
    assert sources == [{d: v for d, v in e.domain_acc.items() if d != "45"} for e in events[1]]


def test_tensorboard_tags_name_domain_and_split():
    event = ProgressEvent(
        "prune", 3, 9, 0.5, val_acc=0.8, domain_acc={"0": {"train": 0.9, "val": 0.8}, "15": {"target": 0.7}}
    )
    scalars = tensorboard_scalars(event)
    assert scalars["prune/acc/0/train"] == 0.9 and scalars["prune/acc/0/val"] == 0.8
    assert scalars["prune/acc/15/target"] == pytest.approx(0.7) and scalars["prune/val_acc"] == 0.8


def test_tensorboard_files_hold_every_domain_and_split(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    domain_acc = {
        "15": {"train": 0.5, "val": 0.25},
        "0": {"target": 0.75, "target_val": 1.0, "target_test": 0.5},
    }
    logger = TensorBoardLogger(tmp_path)
    logger(ProgressEvent("pretrain", 2, 4, 1.0, val_acc=0.25, domain_acc=domain_acc))
    logger.close()
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    for domain, splits in domain_acc.items():
        for split, value in splits.items():
            [scalar] = events.Scalars(f"pretrain/acc/{domain}/{split}")
            assert (scalar.step, scalar.value) == (2, value)


def test_an_older_record_says_which_split_its_numbers_come_from():
    old = {
        "dataset": "rotated_digits", "target_domain": "0", "model": "mnist_cnn", "algorithm": "erm",
        "criterion": "none", "keep_ratio": 1.0, "seed": 0, "intra_acc": 0.9, "cross_acc": 0.7,
        "per_domain_acc": {"15": 0.9, "0": 0.7}, "worst_source_acc": 0.9, "filters_total": 448,
        "filters_kept": 448, "params": 1, "macs": 1, "params_dense": 1, "macs_dense": 1, "run_id": "x",
        "selected_step": 1, "model_dir": "/nowhere", "wall_time_s": 1.0, "alpha": None,
    }  # fmt: skip
    record = ResultRecord.from_dict(old)
    assert record.per_domain_split == {"15": "val", "0": "target"}
    assert record.domain_split_acc == {"15": {"val": 0.9}, "0": {"target": 0.7}}


# -- through the console script: a tiny sweep, its histories, its report ----------------------------

SWEEP = {
    "base": {
        "device": "cpu",
        "pretrain": {"steps": 4, "batch_size": 8, "eval_every": 2},
        "prune": {"steps": 4, "batch_size": 8, "interval": 2, "max_per_step": 1000, "eval_every": 1},
    },
    "grid": {"target": "0", "prune.criterion": ["taylor", "ior"]},
    "sweep": {"workers": 1},
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysable")
    (root / "s.yaml").write_text(yaml.safe_dump(SWEEP))
    result = run_cli("sweep", "s.yaml", "--quiet", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    report = run_cli("report", "s.yaml", "--no-plots", cwd=root)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stdout + report.stderr
    with sqlite3.connect(root / "s-sweep" / "results.sqlite") as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM runs WHERE status = 'done' ORDER BY position")]
    return root, rows, report.stdout


def test_history_has_every_domain_at_every_evaluation(swept, digits):
    root, rows, _ = swept
    split = make_lodo_split(digits, "0", 0.1, seed=0)
    val_sizes = {d.name: len(d) for d in split.val}
    for row in rows:
        model_dir = root / row["model_dir"]  # relative to where the sweep ran
        history = read_history(model_dir / "history.jsonl")
        evaluated = [r for r in history if "val_acc" in r]
        assert evaluated and all("acc" in r for r in evaluated)
        assert all("acc" not in r for r in history if "val_acc" not in r)
        for r in evaluated:
            assert list(r["acc"]) == [*val_sizes, "0"]
            assert all(set(r["acc"][d]) == {"train", "val"} for d in val_sizes)
            assert set(r["acc"]["0"]) == {"target", "target_val", "target_test"}
            # val_acc (the selection metric) is the union of the sources' val splits, nothing else.
            union = sum(val_sizes[d] * r["acc"][d]["val"] for d in val_sizes) / sum(val_sizes.values())
            assert r["val_acc"] == pytest.approx(union)
        best = max(evaluated, key=lambda r: r["val_acc"])  # the first of equals, as the loops keep it
        assert row["selected_step"] == best["step"]
        metrics = json.loads((model_dir / "metrics.json").read_text())
        assert metrics["per_domain_split"] == {d: "target" if d == "0" else "val" for d in DOMAINS}
        assert metrics["domain_split_acc"]["0"]["target"] == metrics["cross_acc"]
        assert {d: metrics["domain_split_acc"][d]["val"] for d in val_sizes} == {
            d: metrics["per_domain_acc"][d] for d in val_sizes
        }


def _number(text: str) -> float:
    return math.nan if text == "" else float(text)


def test_runs_csv_is_one_numeric_row_per_run_matching_the_records(swept):
    root, rows, _ = swept
    with (root / "s-sweep" / "report" / "runs.csv").open() as f:
        flat = list(csv.DictReader(f))
    assert [r["run_id"] for r in flat] == [r["run_id"] for r in rows]
    numeric = ["keep_ratio", "seed", "intra_acc", "cross_acc", "worst_source_acc", "filters_kept", "macs"]
    numeric += [f"acc/{d}/{s}" for d in DOMAINS[1:] for s in ("train", "val")]
    numeric += ["acc/0/target", "acc/0/target_val", "acc/0/target_test", "in_tables"]
    for csv_row, row in zip(flat, rows, strict=True):
        assert all(not math.isnan(_number(csv_row[k])) for k in numeric), csv_row
        assert (
            float(csv_row["cross_acc"]) == row["cross_acc"]
            and float(csv_row["intra_acc"]) == row["intra_acc"]
        )
        assert int(csv_row["filters_kept"]) == row["filters_kept"] and csv_row["in_tables"] == "1"
        per_domain, splits = json.loads(row["per_domain_acc"]), json.loads(row["domain_split_acc"])
        for d in DOMAINS[1:]:
            assert float(csv_row[f"acc/{d}/val"]) == per_domain[d]
            assert float(csv_row[f"acc/{d}/train"]) == splits[d]["train"]
        assert float(csv_row["acc/0/target"]) == row["cross_acc"]
    measured = {k for k in flat[0] if k.startswith("acc/")}
    assert measured == {f"acc/{d}/{s}" for d in DOMAINS[1:] for s in ("train", "val")} | {
        "acc/0/target", "acc/0/target_val", "acc/0/target_test"
    }  # fmt: skip


def test_runs_of_other_targets_leave_the_splits_they_did_not_measure_empty():
    base = ResultRecord.from_dict(
        {
            "dataset": "d", "target_domain": "0", "model": "m", "algorithm": "erm", "criterion": "none",
            "keep_ratio": 1.0, "seed": 0, "intra_acc": 0.9, "cross_acc": 0.7, "worst_source_acc": 0.9,
            "per_domain_acc": {"15": 0.9, "0": 0.7}, "filters_total": 4, "filters_kept": 4, "params": 1,
            "macs": 1, "params_dense": 1, "macs_dense": 1, "run_id": "a", "selected_step": 1,
            "model_dir": "/nowhere", "wall_time_s": 1.0,
        }
    )  # fmt: skip
    other = replace(
        base, run_id="b", target_domain="15", per_domain_acc={}, per_domain_split={},
        domain_split_acc={"0": {"train": 0.95, "val": 0.8}, "15": {"target": 0.6, "target_val": 0.5}},
    )  # fmt: skip
    a, b = flat_rows([base, other], in_tables={"b"})
    columns = ["acc/0/train", "acc/0/val", "acc/0/target", "acc/15/val", "acc/15/target", "acc/15/target_val"]
    assert [k for k in a if k.startswith("acc/")] == columns  # domains in order, then splits
    assert (a["acc/0/target"], a["acc/0/val"], a["acc/15/val"], a["acc/15/target"]) == ("0.7", "", "0.9", "")
    assert (b["acc/0/val"], b["acc/0/target"], b["acc/15/target_val"]) == ("0.8", "", "0.5")
    assert (a["in_tables"], b["in_tables"]) == (0, 1)


def test_per_source_table_in_console_report_and_csv(swept):
    root, rows, stdout = swept
    assert "Per source domain: mnist_cnn on rotated_digits, ERM pretraining" in stdout
    report_dir = root / "s-sweep" / "report"
    assert "### Per source domain" in (report_dir / "report.md").read_text()
    with (report_dir / "per_source-rotated_digits-mnist_cnn-erm.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["Model"] for r in table] == ["dense (before pruning)", "50% Taylor (baseline)", "50% IoR"]
    assert "0 val" not in table[0]  # the target is never a source here
    by_criterion = {r["criterion"]: r for r in rows}
    for csv_row, criterion in zip(table, ("none", "taylor", "ior"), strict=True):
        per_domain = json.loads(by_criterion[criterion]["per_domain_acc"])
        for d in DOMAINS[1:]:
            assert float(csv_row[f"{d} val"]) == pytest.approx(100 * per_domain[d])
            assert csv_row[f"{d} val se"] == "" and csv_row[f"{d} val n"] == "1"  # one seed: no ±
        worst = min(per_domain[d] for d in DOMAINS[1:])
        assert float(csv_row["worst source"]) == pytest.approx(100 * worst)


def test_model_selection_rules_from_the_histories(swept):
    """Issue 17.5: each record's target test half at the source-val checkpoint and at the test-domain
    oracle's (best target_val half), recomputed from history.jsonl, for the dense and pruned runs."""
    root, rows, _ = swept
    assert {row["criterion"] for row in rows} == {"none", "taylor", "ior"}
    for row in rows:
        history = read_history(root / row["model_dir"] / "history.jsonl")
        evaluated = [r for r in history if "val_acc" in r]
        halves = {r["step"]: r["acc"]["0"] for r in evaluated}
        assert row["cross_test_acc"] == halves[row["selected_step"]]["target_test"]
        best_val = max(h["target_val"] for h in halves.values())
        first_best = min(step for step, h in halves.items() if h["target_val"] == best_val)
        assert row["oracle_step"] == first_best
        assert row["oracle_cross_test_acc"] == halves[first_best]["target_test"]
