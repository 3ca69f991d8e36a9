"""Paired criterion-vs-baseline comparisons, checked against hand and brute-force computations."""

import itertools
import math

import numpy as np
import pytest

from dgprune.experiments.records import ResultRecord
from dgprune.report.export import write_report
from dgprune.report.paired import dense_comparisons, holm, paired_comparisons, paired_table


def _record(
    criterion: str, seed: int, target: str, cross: float, intra: float = 0.9, keep: float = 0.5, **extra
):
    extra.setdefault("dataset", "d")
    return ResultRecord(
        target_domain=target,
        model="m",
        algorithm="erm",
        criterion=criterion,
        keep_ratio=keep,
        seed=seed,
        intra_acc=intra,
        cross_acc=cross,
        per_domain_acc={},
        worst_source_acc=0.0,
        filters_total=10,
        filters_kept=5,
        params=1,
        macs=1,
        params_dense=2,
        macs_dense=2,
        run_id=f"{criterion}{seed}{target}{keep}",
        selected_step=1,
        model_dir="",
        wall_time_s=0.0,
        finetune_algorithm=None if criterion == "none" else "erm",
        **extra,
    )


def _exact_wilcoxon_p(diffs: list[float]) -> float:
    """Two-sided exact signed-rank p by enumerating all sign patterns (no zeros, no ties)."""
    ranks = {d: r + 1 for r, d in enumerate(sorted(diffs, key=abs))}
    w_plus = sum(ranks[d] for d in diffs if d > 0)
    n = len(diffs)
    total = n * (n + 1) / 2
    observed = min(w_plus, total - w_plus)
    extreme = 0
    for signs in itertools.product([0, 1], repeat=n):
        w = sum(r for r, s in zip(range(1, n + 1), signs, strict=True) if s)
        extreme += min(w, total - w) <= observed
    return extreme / 2**n


def test_pairs_by_seed_and_target_with_interval_and_exact_test():
    base = {(0, "a"): 0.50, (1, "a"): 0.60, (2, "b"): 0.70, (3, "b"): 0.40, (4, "a"): 0.55}
    delta = {(0, "a"): 0.03, (1, "a"): 0.01, (2, "b"): 0.05, (3, "b"): -0.02, (4, "a"): 0.04}
    records = [_record("taylor", s, t, v) for (s, t), v in base.items()]
    records += [_record("new", s, t, base[(s, t)] + delta[(s, t)]) for (s, t) in base]
    records.append(_record("new", 9, "a", 0.99))  # no baseline for seed 9: not a pair
    (c,) = paired_comparisons(records, label=lambda r: r.criterion)
    diffs = [100 * delta[k] for k in sorted(base)]
    assert c.n == 5
    assert c.differences == pytest.approx(diffs)
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    t_975_df4 = 2.7764451051977987  # Student t quantile, from tables
    assert c.mean == pytest.approx(mean)
    half = t_975_df4 * sd / math.sqrt(5)
    assert c.interval == pytest.approx((mean - half, mean + half))
    assert c.p_wilcoxon == pytest.approx(_exact_wilcoxon_p(diffs))
    assert c.verdict == "not resolved"  # one loss among five: the interval straddles 0


def test_verdicts_and_table():
    records = []
    for seed in range(4):
        records.append(_record("taylor", seed, "a", 0.5, intra=0.9))
        records.append(_record("up", seed, "a", 0.6 + 0.01 * seed, intra=0.89 - 0.001 * seed))
        records.append(_record("down", seed, "a", 0.4 - 0.01 * seed, intra=0.9))
    cross = paired_comparisons(records, label=lambda r: r.criterion)
    intra = paired_comparisons(records, label=lambda r: r.criterion, metric="intra_acc")
    verdicts = {c.challenger: c.verdict for c in cross}
    assert verdicts == {"up": "better", "down": "worse"}
    table = paired_table(cross, intra)
    assert [row[2] for row in table.rows] == ["down", "up"]
    assert table.rows[1][9] == "better" and table.rows[1][12] == "worse"


def test_interval_with_targets_fixed_equals_least_squares_with_a_mean_per_target():
    """Independent computation: regress the differences on one indicator per target (numpy's least
    squares); the plain mean of the differences is the n_t/n-weighted mean of the fitted target means,
    whose variance follows from the residual variance and (X'X)^-1."""
    rng = np.random.default_rng(0)
    targets = ["a"] * 5 + ["b"] * 4 + ["c"] * 6  # unbalanced on purpose
    effect = {"a": 8.0, "b": -6.0, "c": 1.0}  # large spread between targets, small within
    records = []
    for seed, target in enumerate(targets):
        records.append(_record("taylor", seed, target, 0.5))
        records.append(_record("new", seed, target, 0.5 + (effect[target] + rng.normal()) / 100))
    (c,) = paired_comparisons(records, label=lambda r: r.criterion)
    d = np.array(c.differences)
    names = sorted(set(targets))
    x = np.array([[float(t == name) for name in names] for t in c.targets])
    beta, residual_ss, _rank, _sv = np.linalg.lstsq(x, d, rcond=None)
    df = len(d) - len(names)
    weights = x.sum(axis=0) / len(d)
    se = np.sqrt(residual_ss[0] / df * weights @ np.linalg.inv(x.T @ x) @ weights)
    half = 2.1788128296672284 * se  # Student t 0.975 quantile, 12 degrees of freedom, from tables
    assert weights @ beta == pytest.approx(c.mean)
    assert c.interval_targets_fixed == pytest.approx((c.mean - half, c.mean + half))
    # The between-target spread makes the pooled interval several times wider.
    assert c.interval[1] - c.interval[0] > 3 * (c.interval_targets_fixed[1] - c.interval_targets_fixed[0])
    # One pair per target leaves no within-target spread to estimate: no interval.
    (one,) = paired_comparisons([r for r in records if r.seed in (0, 5, 9)], lambda r: r.criterion)
    assert all(math.isnan(v) for v in one.interval_targets_fixed)


def test_holm_matches_hand_computation():
    # sorted: 0.01 (x3 -> 0.03), 0.02 (x2 -> 0.04), 0.04 (x1 -> 0.04, monotone); NaN kept.
    assert holm([0.04, 0.01, math.nan, 0.02]) == pytest.approx([0.04, 0.03, math.nan, 0.04], nan_ok=True)


def test_against_the_dense_model_pairs_each_run_with_the_model_it_pruned():
    dense = {(0, "a"): 0.50, (1, "a"): 0.60, (0, "b"): 0.70}
    records = [_record("none", s, t, v, keep=1.0) for (s, t), v in dense.items()]
    gain = {(0, "a"): 0.02, (1, "a"): -0.01, (0, "b"): 0.04}
    records += [_record("dss", s, t, dense[(s, t)] + gain[(s, t)]) for (s, t) in dense]
    records += [_record("dss", 5, "a", 0.99)]  # its dense model is not among the records: no pair
    (c,) = dense_comparisons(records, label=lambda r: r.criterion)
    assert (c.challenger, c.baseline, c.setting[-1]) == ("dss", "dense", 0.5)
    assert c.differences == pytest.approx([100 * gain[k] for k in sorted(gain)])


def test_study_report_has_the_dense_and_model_selection_sections(tmp_path):
    records = []
    for seed in range(3):
        records.append(
            _record("none", seed, "a", 0.80, keep=1.0, cross_test_acc=0.8, oracle_cross_test_acc=0.9)
        )
        for name, cross, oracle in (
            ("taylor", 0.70, 0.75),
            ("ior", 0.71, 0.74),
            ("dss", 0.72 + seed / 100, 0.8),
        ):
            records.append(
                _record(name, seed, "a", cross, cross_test_acc=cross, oracle_cross_test_acc=oracle)
            )
    report = write_report(records, tmp_path, formats=("md", "csv"), plots=False)
    stems = [s.stem for s in report.sections]
    assert {"paired_vs_taylor", "paired_vs_dense", "paired_vs_taylor_selection"} <= set(stems)
    selection = next(s.table for s in report.sections if s.stem == "paired_vs_taylor_selection")
    dss = next(row for row in selection.rows if row[2] == "dss")
    assert dss[4] == "+3.00" and dss[10] == "+5.00"  # source-val selection, then the oracle's
    versus_dense = next(s.table for s in report.sections if s.stem == "paired_vs_dense")
    assert {row[2] for row in versus_dense.rows} == {"taylor", "ior", "dss"}
    taylor = next(row for row in versus_dense.rows if row[2] == "taylor")
    assert taylor[4] == "-10.00"
    assert (tmp_path / "paired_vs_dense.csv").is_file()


def test_transductive_runs_are_reported_beside_adabn(tmp_path):
    records = [_record("none", seed, "a", 0.80, keep=1.0) for seed in range(2)]
    records += [_record("taylor", seed, "a", 0.70) for seed in range(2)]
    for seed, (cross, adabn, dense) in enumerate([(0.60, 0.70, 0.85), (0.64, 0.74, 0.87)]):
        records.append(
            _record(
                "dss",
                seed,
                "a",
                cross,
                target_access="unlabeled",
                cross_acc_adabn=adabn,
                dense_cross_acc_adabn=dense,
            )
        )
    report = write_report(records, tmp_path, formats=("md",), plots=False)
    (table,) = [s.table for s in report.sections if s.stem == "adabn"]
    assert table.rows == [
        ["d", "m", "50%", "dss [unlabeled target]", "2", "62.00 ± 2.00", "72.00 ± 2.00", "86.00 ± 1.00"]
    ]


def test_leave_one_source_out_choice_uses_only_pseudo_target_runs(tmp_path):
    """The sign is chosen on runs with the true target left out (dataset "<name>-no-<target>"): the
    higher mean pseudo-target accuracy wins, whatever the true target's runs say."""
    records = []
    for seed, pseudo in ((0, "x"), (0, "y"), (1, "x")):
        for sign, acc in ((1, 0.70), (-1, 0.60 + 0.05 * seed)):  # sign +1: 70, 70, 70; -1: 60, 60, 65
            params = {"sign": sign}
            records.append(_record("te", seed, pseudo, acc, dataset="d-no-t", criterion_params=params))
    records.append(_record("none", 0, "x", 0.9, keep=1.0, dataset="d-no-t"))
    # Another method on the same left-out data competes too (here it loses: 65 on average).
    records += [_record("taylor", s, p, 0.65, dataset="d-no-t") for s, p in ((0, "x"), (0, "y"), (1, "x"))]
    records += [_record("te", 0, "t", 0.99, criterion_params={"sign": -1}), _record("taylor", 0, "t", 0.5)]
    report = write_report(records, tmp_path, formats=("md",), plots=False)
    (table,) = [s.table for s in report.sections if s.stem == "loso_choice"]
    # The last column is each candidate's accuracy on the true target in the full benchmark's runs.
    assert [row[:4] + row[5:] for row in table.rows] == [
        ["d", "t", "50%", "taylor", "65.00 ± 0.00", "", "50.00"],
        ["d", "t", "50%", "te (sign=-1)", "61.67 ± 1.67", "", "99.00"],
        ["d", "t", "50%", "te (sign=1)", "70.00 ± 0.00", "yes", "-"],
    ]


def test_leave_one_source_out_selection_is_scored_on_the_true_targets(tmp_path):
    """Per true target the choice is made on pseudo-targets; the selection table then averages the
    chosen candidate's true-target accuracy over targets, beside each candidate always and the
    per-target best (the oracle)."""
    records = []
    # Target t: dss wins on the pseudo-targets and on t. Target u: taylor wins on the pseudo-targets,
    # dss on u (the choice is wrong there).
    for true, pseudo_acc in (("t", {"dss": 0.8, "taylor": 0.7}), ("u", {"dss": 0.6, "taylor": 0.7})):
        for label, acc in pseudo_acc.items():
            records += [_record(label, 0, p, acc, dataset=f"d-no-{true}") for p in ("x", "y")]
    true_acc = {("t", "dss"): (0.90, 0.94), ("t", "taylor"): (0.80, 0.80), ("u", "dss"): (0.50, 0.50)}
    true_acc[("u", "taylor")] = (0.40, 0.42)
    for (true, label), accs in true_acc.items():
        records += [_record(label, seed, true, acc) for seed, acc in enumerate(accs)]
    report = write_report(records, tmp_path, formats=("md",), plots=False)
    (table,) = [s.table for s in report.sections if s.stem == "loso_selection"]
    # Chosen: dss on t (92), taylor on u (41) -> 66.5 ± 25.5 over the two targets.
    assert table.rows == [
        ["d", "50%", "leave-one-source-out choice", "2", "66.50 ± 25.50"],
        ["d", "50%", "always dss", "2", "71.00 ± 21.00"],
        ["d", "50%", "always taylor", "2", "60.50 ± 19.50"],
        ["d", "50%", "best per target (oracle: reads target labels)", "2", "71.00 ± 21.00"],
    ]


def test_budget_runs_are_labelled_apart_from_filter_budget_runs(tmp_path):
    """keep_ratio holds a latency budget's ratio: such a run must not share a cell with keep 0.5."""
    records = [_record("taylor", 0, "a", 0.7), _record("taylor", 0, "a", 0.72, budget_metric="latency")]
    assert [r.label for r in records] == ["taylor", "taylor [latency budget]"]
    report = write_report(records, tmp_path, formats=("md",), plots=False)
    assert report.sections  # two table rows, not the "same table cell" refusal
