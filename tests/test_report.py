"""Reports of a small finished sweep (hand-made numbers in a real database) against a hand computation
of means and standard errors; Markdown, CSV, LaTeX and PNG outputs."""

from __future__ import annotations

import csv
import math
from dataclasses import replace

import pytest

from dgprune.errors import ConfigError
from dgprune.experiments.records import ResultRecord
from dgprune.experiments.store import RunResult, RunSpec, Store
from dgprune.experiments.sweep import sweep_records
from dgprune.report.export import latex_escape, to_latex, write_report
from dgprune.report.table1 import Table
from dgprune.report.wins import count_wins

SEEDS = (0, 1, 2)
# Cross-domain accuracy per seed, target "0" / target "15".
CROSS = {
    ("erm", "none", "erm"): ([0.70, 0.70, 0.73], [0.85, 0.85, 0.85]),
    ("erm", "taylor", "erm"): ([0.60, 0.62, 0.67], [0.80, 0.80, 0.80]),
    ("erm", "ior", "erm"): ([0.61, 0.63, 0.68], [0.80, 0.80, 0.80]),
    ("coral", "none", None): ([0.72, 0.72, 0.72], [0.86, 0.86, 0.86]),
    ("coral", "taylor", "erm"): ([0.62, 0.64, 0.66], [0.81, 0.81, 0.81]),
    ("coral", "taylor", "coral"): ([0.64, 0.64, 0.64], [0.82, 0.82, 0.82]),
}


def record(algorithm: str, criterion: str, finetune: str | None, target: str, seed: int, cross: float):
    dense = criterion == "none"
    run_id = f"{algorithm}-{criterion}-{finetune}-{target}-{seed}"
    return ResultRecord(
        dataset="rotated_digits",
        target_domain=target,
        model="mnist_cnn",
        algorithm=algorithm,
        criterion=criterion,
        criterion_params={"alpha": 1.0, "alpha_mode": "fixed", "share": 1.0} if criterion == "ior" else {},
        keep_ratio=1.0 if dense else 0.5,
        seed=seed,
        intra_acc=0.95 if dense else 0.9,
        cross_acc=cross,
        per_domain_acc={target: cross},
        worst_source_acc=0.9,
        filters_total=448,
        filters_kept=448 if dense else 224,
        params=1000 if dense else 170,
        macs=10000 if dense else 1700,
        params_dense=1000,
        macs_dense=10000,
        run_id=run_id,
        selected_step=10,
        model_dir="/nowhere",
        wall_time_s=1.0,
        finetune_algorithm=None if dense else finetune,
    )


@pytest.fixture
def finished_db(tmp_path):
    records = [
        record(algorithm, criterion, finetune, target, seed, values[t][i])
        for (algorithm, criterion, finetune), values in CROSS.items()
        for t, target in enumerate(("0", "15"))
        for i, seed in enumerate(SEEDS)
    ]
    widths = {"conv1": 64, "conv2": 128}
    db = tmp_path / "results.sqlite"
    with Store(db) as store:
        specs = [RunSpec(r.run_id, f"unit-{r.run_id}", "pruned", {}, {}) for r in records]
        store.register((s.unit_id, [s]) for s in specs)
        for i, r in enumerate(records):
            kept = [
                [name, dense if r.criterion == "none" else dense // 2 - i % 2, dense]
                for name, dense in widths.items()
            ]
            store.record_done(r.run_id, RunResult(r, latency_ms=1.0, layer_widths=kept))
        widths_by_run = {row["run_id"]: row["layer_widths"] for row in store.rows("done")}
    return db, records, widths_by_run


def hand_cell(values: list[float], signed: bool = False) -> str:
    """mean ± sample standard deviation / sqrt(n), in percent: computed without dgprune."""
    pct = [100 * v for v in values]
    m = sum(pct) / len(pct)
    sd = math.sqrt(sum((v - m) ** 2 for v in pct) / (len(pct) - 1))
    text = f"{m:+.2f}" if signed else f"{m:.2f}"
    return f"{text} ± {sd / math.sqrt(len(pct)):.2f}"


def hand_mean_se(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation / sqrt(n)) in percent, computed without dgprune."""
    pct = [100 * v for v in values]
    m = sum(pct) / len(pct)
    return m, math.sqrt(sum((v - m) ** 2 for v in pct) / (len(pct) - 1)) / math.sqrt(len(pct))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cell(table: Table, row_label: str, column: str, label_column: int = 0) -> str:
    row = next(r for r in table.rows if r[label_column] == row_label)
    return row[table.header.index(column)]


def test_report_matches_hand_computation(finished_db, tmp_path):
    db, records, widths = finished_db
    loaded = sweep_records(None, db)
    assert sorted(loaded, key=lambda r: r.run_id) == sorted(records, key=lambda r: r.run_id)
    report = write_report(loaded, tmp_path / "report", widths)
    by_stem = {s.stem: s.table for s in report.sections}
    assert set(by_stem) == {"table1-rotated_digits-mnist_cnn-erm", "table2-rotated_digits-mnist_cnn"}

    t1 = by_stem["table1-rotated_digits-mnist_cnn-erm"]
    assert hand_cell([0.60, 0.62, 0.67]) == "63.00 ± 2.08"  # sqrt(13) / sqrt(3)
    assert cell(t1, "50% Taylor (baseline)", "0 Cross") == hand_cell(CROSS[("erm", "taylor", "erm")][0])
    assert cell(t1, "50% IoR", "0 Cross") == hand_cell(CROSS[("erm", "ior", "erm")][0])
    assert cell(t1, "dense (before pruning)", "0 Cross") == hand_cell(CROSS[("erm", "none", "erm")][0])
    assert cell(t1, "50% IoR", "15 Cross") == "80.00 ± 0.00"
    assert [r[0] for r in t1.rows] == ["dense (before pruning)", "50% Taylor (baseline)", "50% IoR"]

    t2 = by_stem["table2-rotated_digits-mnist_cnn"]
    labels = [(r[0], r[1]) for r in t2.rows]
    assert labels == [
        ("ERM", "dense"),
        ("", "pruned 50%, ERM fine-tune"),
        ("", "Δ"),
        ("CORAL", "dense"),
        ("", "pruned 50%, ERM fine-tune"),
        ("", "Δ"),
        ("", "pruned 50%, CORAL fine-tune"),
        ("", "Δ"),
    ]
    delta_erm = [
        p - d
        for p, d in zip(CROSS[("erm", "taylor", "erm")][0], CROSS[("erm", "none", "erm")][0], strict=True)
    ]
    assert t2.rows[2][t2.header.index("0 Cross")] == hand_cell(delta_erm, signed=True) == "-8.00 ± 1.15"
    delta_coral = [
        p - d
        for p, d in zip(
            CROSS[("coral", "taylor", "coral")][0], CROSS[("coral", "none", None)][0], strict=True
        )
    ]
    assert t2.rows[7][t2.header.index("0 Cross")] == "-8.00 ± 0.00" == hand_cell(delta_coral, signed=True)

    # IoR vs Taylor, cross-domain, per target: 0 -> IoR +1.00 (win), 15 -> equal (tie).
    wins = report.wins
    assert (wins.count("win"), wins.count("tie"), wins.count("loss")) == (1, 1, 0)
    assert "1 wins, 1 ties, 0 losses in 2 comparisons" in wins.summary()

    out = tmp_path / "report"
    # The CSVs hold numbers: mean, standard error and n as separate columns (percent, points for Δ).
    with (out / "table1-rotated_digits-mnist_cnn-erm.csv").open() as f:
        rows = list(csv.DictReader(f))
    taylor = next(r for r in rows if r["Model"] == "50% Taylor (baseline)")
    mean, se = hand_mean_se(CROSS[("erm", "taylor", "erm")][0])
    assert float(taylor["0 Cross"]) == pytest.approx(mean)
    assert float(taylor["0 Cross se"]) == pytest.approx(se)
    assert taylor["0 Cross n"] == "3" and float(taylor["filters kept"]) == 50.0
    assert all(_is_number(v) for row in rows for k, v in row.items() if k != "Model")
    with (out / "table2-rotated_digits-mnist_cnn.csv").open() as f:
        t2_rows = list(csv.DictReader(f))
    assert float(t2_rows[2]["0 Cross"]) == pytest.approx(hand_mean_se(delta_erm)[0]) == -8.0
    assert float(t2_rows[2]["0 Cross se"]) == pytest.approx(hand_mean_se(delta_erm)[1])
    with (out / "wins.csv").open() as f:
        wins_rows = list(csv.DictReader(f))
    assert [float(r["Δ (points)"]) for r in wins_rows] == pytest.approx([1.0, 0.0])
    assert float(wins_rows[0]["IoR Cross"]) == pytest.approx(hand_mean_se(CROSS[("erm", "ior", "erm")][0])[0])
    tex = (out / "table1-rotated_digits-mnist_cnn-erm.tex").read_text()
    assert r"63.00 $\pm$ 2.08" in tex and r"50\% Taylor (baseline)" in tex and r"\toprule" in tex
    md = (out / "table2-rotated_digits-mnist_cnn.md").read_text()
    assert "| -8.00 ± 1.15 |" in md
    assert "1 wins, 1 ties, 0 losses" in (out / "report.md").read_text()
    for name in ("accuracy_vs_filters", "layer_widths"):
        png = out / f"{name}-rotated_digits-mnist_cnn-erm.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_wins_are_paired_over_common_seeds():
    base = record("erm", "taylor", "erm", "0", 0, 0.5)
    runs = [
        replace(base, run_id="t0", seed=0, cross_acc=0.50),
        replace(base, run_id="t1", seed=1, cross_acc=0.70),
        replace(base, run_id="i0", seed=0, criterion="ior", criterion_params={"alpha": 1.0}, cross_acc=0.49),
    ]
    wins = count_wins(runs)
    assert len(wins.comparisons) == 1 and wins.comparisons[0].baseline == [0.50]  # seed 1 has no IoR pair
    assert wins.count("loss") == 1


def test_latex_escaping():
    assert latex_escape("50% a_b & c ± Δ") == r"50\% a\_b \& c $\pm$ $\Delta$"
    tex = to_latex(Table(["Model", "x"], [["a", "1"]]), caption="cap 10%")
    assert r"\caption{cap 10\%}" in tex and r"\begin{tabular}{lr}" in tex


def test_runs_the_tables_cannot_tell_apart_are_refused(tmp_path):
    a = record("erm", "taylor", "erm", "0", 0, 0.7)
    b = replace(a, run_id="other-run", cross_acc=0.5)
    configs = {
        a.run_id: {"prune": {"round_to": 1, "lr": 0.001}},
        b.run_id: {"prune": {"round_to": 8, "lr": 0.001}},
    }
    with pytest.raises(ConfigError, match=r"same table cell .* differ in prune\.round_to; "):
        write_report([a, b], tmp_path, configs=configs, plots=False)
    write_report([a], tmp_path, plots=False)  # one run per cell is fine
