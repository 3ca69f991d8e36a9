"""The criteria built from per-domain gate gradients (issue 9), both BatchNorm modes, their parameters.

Every criterion is checked against an independent computation: own gate hooks on fresh leaf tensors,
N separate ``autograd.grad(R_i, gates)`` calls, the variance gradient by autograd, and each formula
written out with explicit loops over domains and channels, in float64.
"""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from dgprune.data import DomainBatches, load_dataset, make_lodo_split
from dgprune.errors import ConfigError
from dgprune.experiments.config import build_config
from dgprune.models import build_model
from dgprune.pruning import GateSet, ScoreInputs, find_channel_groups
from dgprune.pruning.criteria import (
    CRITERIA,
    criterion_label,
    criterion_param_defaults,
    make_criterion,
    taylor_scores,
    validate_criterion_params,
)
from dgprune.pruning.scoring import gate_gradients, per_domain_forward_backward
from dgprune.training import PruneSettings, prune_and_finetune

CPU = torch.device("cpu")
DOMAIN_SIZES = (2, 3, 4)  # unequal on purpose
VAL_SIZES = (3, 1, 2)

# (criterion, parameters) checked against the brute force
CASES = [
    ("taylor", {}),
    ("ior", {"alpha": 0.7}),
    ("ior", {"alpha_mode": "share", "share": 0.5}),
    ("ior_val", {"alpha": 0.7}),
    ("ior_val", {"alpha_mode": "share", "share": 2.0}),
    ("disagreement", {}),
    ("taylor_disagreement", {"beta": 0.3}),
    ("taylor_disagreement", {}),
    ("worst_domain", {}),
    ("min_domain", {}),
    ("consistency", {}),
    ("signed_taylor", {}),
    ("signed_worst_domain", {}),
    ("signed_ior", {"alpha": 0.7}),
]


def _problem(name: str, pixels: int):
    generator = torch.Generator().manual_seed(7)
    model = build_model(name, num_classes=4, in_channels=2, small_input=True).double()
    model.train()  # BatchNorm as training uses it

    def batches(sizes):
        return [
            (
                torch.randn(n, 2, pixels, pixels, dtype=torch.float64, generator=generator),
                torch.randint(0, 4, (n,), generator=generator),
            )
            for n in sizes
        ]

    return model, batches(DOMAIN_SIZES), batches(VAL_SIZES)


def _reference_gradients(model, groups, gate_values, batches, mixed):
    """(G [N][M], R [N], dVar/dg [M]) as Python floats: own hooks on fresh leaves, one grad per domain."""
    modules = dict(model.named_modules())
    leaves = [torch.tensor(values, dtype=torch.float64, requires_grad=True) for values in gate_values]
    handles = []
    for leaf, group in zip(leaves, groups, strict=True):
        for site in group.gate_sites:
            assert list(site.channel_index) == list(range(group.size))  # identity order for these models
            hook = lambda m, i, out, leaf=leaf: out * leaf.view(1, -1, 1, 1)  # noqa: E731
            handles.append(modules[site.module_name].register_forward_hook(hook))
    try:
        if mixed:  # one batch of all domains: BatchNorm statistics over every source
            logits = model(torch.cat([x for x, _ in batches])).split([len(y) for _, y in batches])
            risks = [F.cross_entropy(lg, y) for lg, (_, y) in zip(logits, batches, strict=True)]
        else:
            risks = [F.cross_entropy(model(x), y) for x, y in batches]
        grads = [torch.cat(torch.autograd.grad(r, leaves, retain_graph=True)) for r in risks]
        stacked = torch.stack(risks)
        variance = ((stacked - stacked.mean()) ** 2).mean()
        var_grad = torch.cat(torch.autograd.grad(variance, leaves))
    finally:
        for handle in handles:
            handle.remove()
    return [g.tolist() for g in grads], [float(r.detach()) for r in risks], var_grad.tolist()


def _expected(name, params, train, val, g):
    """The documented formula of ``name``, with explicit loops (docs/criteria.md, 'Formulas')."""
    G, _, dvar = train
    _, _, dvar_val = val
    N, M = len(G), len(g)
    c = [[G[i][m] * g[m] for m in range(M)] for i in range(N)]
    s = [[c[i][m] ** 2 for m in range(M)] for i in range(N)]
    mean_c = [sum(c[i][m] for i in range(N)) / N for m in range(M)]
    taylor = [mean_c[m] ** 2 for m in range(M)]
    disagreement = [sum((c[i][m] - mean_c[m]) ** 2 for i in range(N)) / N for m in range(M)]

    def ior_like(grad_of_variance):
        term = [(grad_of_variance[m] * g[m]) ** 2 for m in range(M)]
        if params.get("alpha_mode", "fixed") == "share":
            total = sum(term)
            alpha = params["share"] * sum(taylor) / total if total > 0 else 0.0
        else:
            alpha = params.get("alpha", 1.0)
        return [taylor[m] + alpha * term[m] for m in range(M)]

    if name == "taylor":
        return taylor
    if name == "ior":
        return ior_like(dvar)
    if name == "ior_val":
        return ior_like(dvar_val)
    if name == "disagreement":
        return disagreement
    if name == "taylor_disagreement":
        return [taylor[m] + params.get("beta", 1.0) * disagreement[m] for m in range(M)]
    if name == "worst_domain":
        return [max(s[i][m] for i in range(N)) for m in range(M)]
    if name == "min_domain":
        return [min(s[i][m] for i in range(N)) for m in range(M)]
    if name == "consistency":
        out = []
        for m in range(M):
            mean = sum(s[i][m] for i in range(N)) / N
            std = math.sqrt(sum((s[i][m] - mean) ** 2 for i in range(N)) / N)
            out.append(mean / (mean + std) if mean > 0 else 0.0)
        return out
    mean_grad = [sum(G[i][m] for i in range(N)) / N for m in range(M)]
    if name == "signed_taylor":
        return [-mean_grad[m] * g[m] for m in range(M)]
    if name == "signed_worst_domain":
        return [max(-c[i][m] for i in range(N)) for m in range(M)]
    if name == "signed_ior":
        return [-mean_grad[m] * g[m] - params["alpha"] * dvar[m] * g[m] for m in range(M)]
    raise AssertionError(name)


@pytest.mark.parametrize("bn_mode", ["per_domain", "mixed"])
@pytest.mark.parametrize(("name", "pixels"), [("mnist_cnn", 8), ("resnet18", 16)])
def test_every_criterion_equals_brute_force(name, pixels, bn_mode):
    model, train, val = _problem(name, pixels)
    groups = find_channel_groups(model, train[0][0][:1], scope="all")
    gates = GateSet(model, groups)
    if name == "resnet18":  # pruned channels must score 0. (MNIST_CNN's GroupNorm computes its
        # statistics over alive channels in float32 once a channel is pruned: not a float64 reference.)
        gates.prune([m for m in range(gates.total) if m % 7 == 3])
    g = gates.flat_gates().double().tolist()
    gate_values = [part.tolist() for part in torch.split(torch.tensor(g), gates.sizes)]
    mixed = bn_mode == "mixed"
    ref_train = _reference_gradients(model, groups, gate_values, train, mixed)
    ref_val = _reference_gradients(model, groups, gate_values, val, mixed)

    gates.attach()
    step = per_domain_forward_backward(model, gates, train, bn_mode=bn_mode)
    val_risks, val_grads = gate_gradients(model, gates, val, bn_mode)
    for (grads, risks), (ref_grads, ref_risks, _) in [
        ((step.domain_grads, step.risks), ref_train),
        ((val_grads, val_risks), ref_val),
    ]:
        expected = torch.tensor(ref_grads, dtype=torch.float64)
        torch.testing.assert_close(risks, torch.tensor(ref_risks, dtype=torch.float64), rtol=1e-10, atol=0)
        torch.testing.assert_close(grads, expected, rtol=1e-6, atol=1e-12 * expected.abs().max())
    inputs = ScoreInputs(
        gates=torch.tensor(g, dtype=torch.float64),
        domain_grads=step.domain_grads,
        risks=step.risks,
        val_domain_grads=val_grads,
        val_risks=val_risks,
    )
    scores = {}
    for criterion, params in CASES:
        got = make_criterion(criterion, params).score(inputs)
        expected = torch.tensor(_expected(criterion, params, ref_train, ref_val, g), dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-10 * expected.abs().max(), msg=criterion)
        assert torch.all(got[torch.tensor(g) == 0] == 0), criterion
        scores[criterion_label(criterion, params)] = got
    # beta = 1 turns Taylor + disagreement into the mean squared contribution
    mean_square = (step.domain_grads * inputs.gates).pow(2).mean(dim=0)
    torch.testing.assert_close(scores["taylor_disagreement"], mean_square, rtol=1e-9, atol=1e-300)
    # the terms matter: none of these is Taylor in disguise, and validation batches change IoR
    taylor = scores["taylor"]
    for label in ("ior (alpha=0.7)", "ior_val (alpha=0.7)", "taylor_disagreement (beta=0.3)"):
        assert (scores[label] - taylor).abs().max() > 1e-4 * taylor.max(), label
    assert (scores["ior_val (alpha=0.7)"] - scores["ior (alpha=0.7)"]).abs().max() > 1e-4 * taylor.max()
    assert (scores["signed_taylor"] < 0).any() and (scores["signed_taylor"] > 0).any()


def _random_inputs(equal_risks: bool = False) -> ScoreInputs:
    generator = torch.Generator().manual_seed(3)
    gates = (torch.rand(40, generator=generator) > 0.2).double()
    risks = torch.full((3,), 0.5, dtype=torch.float64) if equal_risks else torch.tensor([0.2, 0.9, 1.7])
    return ScoreInputs(
        gates=gates,
        domain_grads=torch.randn(3, 40, generator=generator, dtype=torch.float64),
        risks=risks.double(),
        val_domain_grads=torch.randn(3, 40, generator=generator, dtype=torch.float64),
        val_risks=torch.tensor([1.0, 0.1, 0.4], dtype=torch.float64),
    )


@pytest.mark.parametrize("name", ["ior", "ior_val"])
@pytest.mark.parametrize("share", [0.1, 1.0, 3.0])
def test_share_mode_makes_the_variance_total_share_times_the_taylor_total(name, share):
    inputs = _random_inputs()
    criterion = make_criterion(name, {"alpha_mode": "share", "share": share})
    taylor = taylor_scores(inputs)
    variance_part = criterion.score(inputs) - taylor
    assert float(variance_part.sum()) == pytest.approx(share * float(taylor.sum()), rel=1e-10)
    assert (variance_part > 0).sum() > 10  # a real term, spread over channels
    assert criterion.variance_share(inputs) == pytest.approx(share / (1 + share), rel=1e-10)
    # Equal risks: no variance term at all, so share mode falls back to alpha 0 (Taylor), never NaN.
    flat = _random_inputs(equal_risks=True)
    flat = replace(flat, val_risks=flat.risks)
    torch.testing.assert_close(criterion.score(flat), taylor_scores(flat), rtol=0, atol=0)


def test_ior_val_gradients_leave_parameter_gradients_and_batchnorm_statistics_alone():
    # 16 px: a validation batch of one sample keeps 2x2 values per channel for BatchNorm in layer4
    model, train, val = _problem("resnet18", 16)
    model.float()  # exact equality is asked for below: float32 is enough, and cheaper
    train, val = ([(x.float(), y) for x, y in batches] for batches in (train, val))
    groups = find_channel_groups(model, train[0][0][:1])
    gates = GateSet(model, groups).attach()
    for bn_mode in ("per_domain", "mixed"):
        model.zero_grad(set_to_none=True)
        per_domain_forward_backward(model, gates, train, bn_mode=bn_mode)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        val_risks, val_grads = gate_gradients(model, gates, val, bn_mode)
        assert val_grads.shape == (3, gates.total) and val_grads.abs().max() > 0 and val_risks.shape == (3,)
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, grads[n]), n
        for n, b in model.named_buffers():
            assert torch.equal(b, buffers[n]), n


def _split():
    return make_lodo_split(load_dataset("rotated_digits"), target="45", seed=1)


def _fresh_model():
    torch.manual_seed(123)
    return build_model("mnist_cnn", 10, 1)


def test_ior_val_trains_exactly_as_ior_when_it_ranks_the_same():
    """With alpha = 0 both rank by Taylor: then the validation forwards/backwards must change nothing
    in training (parameter gradients, RNG, BatchNorm statistics) — same weights, same history."""
    split = _split()
    common = dict(keep_ratio=0.6, interval=2, max_per_step=100, steps=5, batch_size=8, eval_every=2)
    x = torch.zeros(1, 1, 8, 8)
    outcomes = {}
    for name in ("ior", "ior_val"):
        settings = PruneSettings(criterion=name, criterion_params={"alpha": 0.0}, **common)
        outcomes[name] = (prune_and_finetune(model := _fresh_model(), split, settings, 0, CPU, x), model)
    (a, model_a), (b, model_b) = outcomes["ior"], outcomes["ior_val"]
    assert a.history == b.history
    assert torch.equal(a.gates.flat_alive(), b.gates.flat_alive())
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key


class _Interrupted(Exception):
    pass


def test_interrupted_ior_val_share_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    split = _split()
    settings = PruneSettings(
        criterion="ior_val",
        criterion_params={"alpha_mode": "share", "share": 1.0},
        keep_ratio=0.7,
        interval=2,
        max_per_step=50,
        steps=8,
        batch_size=8,
        eval_every=2,
    )
    x = torch.zeros(1, 1, 8, 8)
    reference = prune_and_finetune(model_ref := _fresh_model(), split, settings, 0, CPU, x)
    assert reference.variance_term_share == pytest.approx(0.5)  # share 1: half of every step's score
    original = DomainBatches.next
    draws = {"n": 0}

    def next_batches(self):
        draws["n"] += 1
        if draws["n"] > 9:  # training and validation draws: step 5's validation draw, after a checkpoint
            raise _Interrupted
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(DomainBatches, "next", next_batches)
        with pytest.raises(_Interrupted):
            prune_and_finetune(
                _fresh_model(), split, settings, 0, CPU, x, checkpoint_dir=tmp_path, checkpoint_every=2
            )
    assert (tmp_path / "checkpoint.pt").is_file()
    resumed = prune_and_finetune(
        model := _fresh_model(), split, settings, 0, CPU, x, checkpoint_dir=tmp_path, checkpoint_every=2
    )
    assert resumed.history == reference.history and resumed.best_step == reference.best_step
    assert resumed.variance_term_share == reference.variance_term_share
    assert torch.equal(resumed.gates.flat_alive(), reference.gates.flat_alive())
    for key, value in model_ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_mixed_batchnorm_pruning_runs_on_resnet():
    split = _split()
    model = build_model("resnet18", 10, 1, small_input=True)
    settings = PruneSettings(
        criterion="ior_val",
        keep_ratio=0.9,
        interval=1,
        max_per_step=300,
        steps=2,
        batch_size=2,
        bn_mode="mixed",
    )
    outcome = prune_and_finetune(model, split, settings, 0, CPU, torch.zeros(1, 1, 8, 8))
    assert outcome.filters_kept == round(0.9 * 2880)
    assert 0 < outcome.variance_term_share < 1


# ---- parameters: validation, config, ids ----------------------------------------------------------


def test_every_criterion_has_validated_defaults():
    for name in CRITERIA:
        defaults = criterion_param_defaults(name)
        if name == "target_entropy":  # its sign has no default: it must be given (docs/criteria.md)
            with pytest.raises(ConfigError, match="target_entropy: sign must be given"):
                validate_criterion_params(name, None)
            defaults = validate_criterion_params(name, {"sign": 1})
            assert criterion_label(name, defaults) == "target_entropy (sign=1)"
            continue
        assert validate_criterion_params(name, None) == defaults
        assert criterion_label(name, defaults) == name  # defaults are not shown
    assert criterion_label("ior", {"alpha": 2.0, "alpha_mode": "fixed", "share": 1.0}) == "ior (alpha=2)"


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ({"criterion": "ior", "criterion_params": {"alhpa": 2}}, "criterion 'ior' has no parameter 'alhpa'"),
        ({"criterion": "taylor", "criterion_params": {"alpha": 2}}, "criterion 'taylor' takes no parameters"),
        ({"criterion": "worst_domain", "criterion_params": {"beta": 0.5}}, "'worst_domain' takes no param"),
        (
            {"criterion": "ior", "criterion_params": {"alpha_mode": "share", "share": 0}},
            "ior: share must be > 0",
        ),
        ({"criterion": "ior_val", "criterion_params": {"share": -1}}, "ior_val: share must be > 0, got -1"),
        (
            {"criterion": "ior", "criterion_params": {"share": 0.5}},
            "share (0.5) is used only with alpha_mode",
        ),
        ({"criterion": "signed_ior", "criterion_params": {"alpha": -1}}, "signed_ior: alpha must be >= 0"),
        ({"criterion": "taylor", "alpha": 2.0}, "prune.alpha (2.0) is a parameter of ior"),
    ],
)
def test_bad_criterion_parameters_give_one_clear_error(prune, message):
    with pytest.raises(ConfigError) as err:
        build_config(overrides={"target": "0", "prune": prune})
    text = str(err.value)
    assert message in text and "\n" not in text
    if "has no parameter" in text or "must be" in text:
        assert "alpha >= 0" in text or "beta" in text or "parameters:" in text  # the valid ones are named


def test_bad_criterion_parameter_on_the_command_line(tmp_path):
    done = run_cli(
        "prune",
        "--pretrained",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "out"),
        "--target",
        "0",
        "--criterion",
        "ior",
        "--criterion-param",
        "share=0",
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ior: share must be > 0, got 0" in lines[0], done.stderr
    malformed = run_cli("prune", "--pretrained", "p", "--out", "o", "--criterion-param", "share", timeout=120)
    assert (
        malformed.returncode == 2 and "KEY=VALUE" in malformed.stderr and "Traceback" not in malformed.stderr
    )


def test_run_ids_of_old_configs_stay_the_same():
    """Ids computed by the code before criterion_params existed (prune.alpha at the top level, 1.0 unless
    set, for every criterion): finished results must keep them."""
    ior2 = build_config(overrides={"target": "0", "prune": {"criterion": "ior", "alpha": 2.0}})
    assert ior2.run_id() == "a06060a3332e" and ior2.pretrain_id() == "76cbbb66dc02"
    assert ior2.prune.criterion_params["alpha"] == 2.0
    same = build_config(
        overrides={"target": "0", "prune": {"criterion": "ior", "criterion_params": {"alpha": 2}}}
    )
    assert same.run_id() == "a06060a3332e"
    taylor = build_config(overrides={"target": "0", "prune": {"criterion": "taylor"}})
    assert taylor.run_id() == "66f118795323"
    # what `dgprune config` used to write for Taylor: alpha 1.0 alongside, dropped silently
    assert build_config(
        overrides={"target": "0", "prune": {"criterion": "taylor", "alpha": 1.0}}
    ).run_id() == ("66f118795323")
    old = build_config(
        overrides={"target": "15", "seed": 3, "prune": {"criterion": "taylor", "keep_ratio": 0.3}}
    )
    assert old.run_id() == "b96ba23b38fa"
    # new settings at non-default values make new ids; re-validating a dumped config keeps the id
    share = build_config(overrides={"target": "0", "prune": {"criterion_params": {"alpha_mode": "share"}}})
    mixed = build_config(overrides={"target": "0", "prune": {"bn_mode": "mixed"}})
    default = build_config(overrides={"target": "0"})
    assert len({share.run_id(), mixed.run_id(), default.run_id()}) == 3
    assert build_config(base=share.model_dump()).run_id() == share.run_id()
    # a dumped IoR config (all of IoR's defaults) switched to another criterion is accepted
    switched = build_config(base=default.model_dump(), overrides={"prune": {"criterion": "worst_domain"}})
    assert switched.prune.criterion_params == {}


# ---- the parameters through sweeps, records, the store and the reports ---------------------------


def test_grid_applies_a_criterion_parameter_only_to_the_criteria_that_take_it():
    from dgprune.experiments.sweep import expand_grid

    base = {"data": {"name": "rotated_digits"}, "device": "cpu"}
    grid = {
        "target": "0",
        "prune.criterion": ["taylor", "ior", "signed_ior"],
        "prune.criterion_params.alpha": [1.0, 2.0],
    }
    configs = expand_grid(base, [grid])
    params = sorted((c.prune.criterion, c.prune.criterion_params.get("alpha")) for c in configs)
    assert params == [("ior", 1.0), ("ior", 2.0), ("signed_ior", 1.0), ("signed_ior", 2.0), ("taylor", None)]
    with pytest.raises(ConfigError, match="'taylor' takes no parameters, got 'alpha'"):
        expand_grid(base, [{"target": "0", "prune.criterion": "taylor", "prune.criterion_params.alpha": 2.0}])


def _old_row_record(criterion: str, alpha: float | None) -> dict:
    return {
        "dataset": "d",
        "target_domain": "0",
        "model": "m",
        "algorithm": "erm",
        "criterion": criterion,
        "alpha": alpha,
        "keep_ratio": 0.5,
        "seed": 0,
        "intra_acc": 0.9,
        "cross_acc": 0.5,
        "per_domain_acc": {},
        "worst_source_acc": 0.9,
        "filters_total": 10,
        "filters_kept": 5,
        "params": 1,
        "macs": 1,
        "params_dense": 2,
        "macs_dense": 2,
        "run_id": f"{criterion}-{alpha}",
        "selected_step": 1,
        "model_dir": "x",
        "wall_time_s": 1.0,
    }


def test_results_written_before_criterion_params_are_read_and_labelled(tmp_path):
    import json
    import sqlite3

    from dgprune.experiments.records import read_records
    from dgprune.experiments.store import Store
    from dgprune.report.table1 import table1

    rows = [_old_row_record("taylor", None), _old_row_record("ior", 1.0), _old_row_record("ior", 2.0)]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    records = read_records(tmp_path / "results.json")
    assert [r.criterion_params for r in records] == [{}, {"alpha": 1.0}, {"alpha": 2.0}]
    assert [row[0] for row in table1(records).rows] == [
        "50% Taylor (baseline)",
        "50% IoR",
        "50% IoR (alpha=2)",
    ]
    # an old database: an alpha column, no criterion_params column
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:
        columns = [key for key in rows[0] if key != "run_id"]
        conn.execute(
            "CREATE TABLE runs (run_id TEXT PRIMARY KEY, unit_id TEXT NOT NULL, kind TEXT NOT NULL,"
            " position INTEGER NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL, error TEXT,"
            " started_at REAL, finished_at REAL, " + ", ".join(f"{c}" for c in columns) + ")"
        )
        for position, row in enumerate(rows):
            values = [json.dumps(v) if isinstance(v, dict) else v for v in (row[c] for c in columns)]
            conn.execute(
                f"INSERT INTO runs (run_id, unit_id, kind, position, config, status, {', '.join(columns)})"
                f" VALUES (?, 'u', 'pruned', ?, '{{}}', 'done', {', '.join('?' * len(columns))})",
                (row["run_id"], position, *values),
            )
    with Store(db) as store:
        assert [r.criterion_params for r in store.records()] == [{}, {"alpha": 1.0}, {"alpha": 2.0}]
        assert [r["criterion_params"] for r in store.rows()] == [{}, {"alpha": 1.0}, {"alpha": 2.0}]
