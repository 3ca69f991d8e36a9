"""DSS, dss_sources and target_entropy (criteria scored per pruning event), the unlabeled-target setting
(``prune.target_access``) and AdaBN: the scores against brute-force computations from forward hooks
(MNIST_CNN and ResNet-18, eval mode), per-layer allocation, the per-event schedule, resume, the
architecture example, booby-trapped target data through real prune runs, run ids, and the console
script (prune, a sweep with its report, analyze)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dgprune.data import Domain
from dgprune.errors import ConfigError
from dgprune.experiments.config import build_config
from dgprune.experiments.pipeline import make_context, run_pretrain, run_prune
from dgprune.models import build_model
from dgprune.pruning import GateSet, find_channel_groups
from dgprune.pruning.criteria import REGISTRY, make_criterion
from dgprune.pruning.event_inputs import event_score_inputs
from dgprune.pruning.schedule import PruningSchedule
from dgprune.pruning.target_entropy import entropy_gate_gradients
from dgprune.training import adabn as adabn_module
from dgprune.training.adabn import adapt_batchnorm
from dgprune.training.evaluation import Evaluator
from dgprune.training.prune_finetune import prune_and_finetune

SCRIPT = Path(sys.executable).parent / "dgprune"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # two cores shared by several runs


# ---- scores against brute force -----------------------------------------------------------------


def _model(name: str) -> tuple[torch.nn.Module, GateSet, int]:
    """A float64 model in eval mode with non-trivial BatchNorm statistics and a few channels pruned."""
    torch.manual_seed(3)
    channels, pixels = (1, 8) if name == "mnist_cnn" else (3, 8)
    model = build_model(name, num_classes=4, in_channels=channels, small_input=True).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    gates = GateSet(
        model, find_channel_groups(model, torch.zeros(1, channels, pixels, pixels, dtype=torch.float64))
    ).attach()
    gates.prune([0, 5, gates.sizes[0] + 3])  # pruned channels: maps of zeros
    return model.eval(), gates, pixels


def _images(name: str, counts: list[int]) -> list[torch.Tensor]:
    channels, pixels = (1, 8) if name == "mnist_cnn" else (3, 8)
    return [
        torch.randn(n, channels, pixels, pixels, dtype=torch.float64) + 0.3 * i for i, n in enumerate(counts)
    ]


def _brute_maps(model, gates: GateSet, images: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per group, per gate site: [C, S] mean over the images of each channel's gated output, from plain
    forward hooks that keep every image's output (no accumulation), in one batch."""
    modules = dict(model.named_modules())
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for group in gates.groups:
        for site in group.gate_sites:
            outputs[site.module_name] = []
            handles.append(
                modules[site.module_name].register_forward_hook(
                    lambda _m, _i, out, name=site.module_name: outputs[name].append(out.detach().clone())
                )
            )
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    maps = []
    for group in gates.groups:
        per_site = []
        for site in group.gate_sites:
            stacked = torch.cat(outputs[site.module_name])  # [n, C_module, H, W]
            ordered = stacked[:, list(site.channel_index)]  # group position order
            per_site.append(ordered.mean(dim=0).flatten(1))
        maps.append(per_site)
    return maps


def _brute_cosine(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> torch.Tensor:
    sims = [
        torch.stack([F.cosine_similarity(x, y, dim=1, eps=1e-30) for x, y in zip(ga, gb, strict=True)]).mean(
            0
        )
        for ga, gb in zip(a, b, strict=True)
    ]
    return torch.cat(sims)


@pytest.mark.parametrize("name", ["mnist_cnn", "resnet18"])
def test_dss_and_dss_sources_equal_a_brute_force_computation(name):
    model, gates, _ = _model(name)
    sources = _images(name, [5, 7, 4])  # unequal counts: the pooled means weigh images, not domains
    target = _images(name, [6])[0] - 0.8
    per_source = [_brute_maps(model, gates, x) for x in sources]
    pooled_all = _brute_maps(model, gates, torch.cat(sources))
    expected_dss = _brute_cosine(pooled_all, _brute_maps(model, gates, target))
    rows = []
    for i in range(len(sources)):
        others = torch.cat([x for j, x in enumerate(sources) if j != i])
        rows.append(_brute_cosine(per_source[i], _brute_maps(model, gates, others)))
    rows = torch.stack(rows)

    dss = make_criterion("dss", {"allocation": "global"})
    got = dss.score(event_score_inputs(dss, model, gates, sources, target))
    torch.testing.assert_close(got, expected_dss, atol=1e-6, rtol=0)
    for reduce, expected in (("min", rows.min(0).values), ("mean", rows.mean(0))):
        criterion = make_criterion("dss_sources", {"allocation": "global", "reduce": reduce})
        got = criterion.score(event_score_inputs(criterion, model, gates, sources, None))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    alive = gates.flat_alive()
    assert torch.all(got[~alive] == 0) and not model.training  # pruned channels: zero maps, similarity 0
    if name == "resnet18":  # coupled residual groups: the mean over their members was exercised
        assert any(len(g.gate_sites) > 1 for g in gates.groups)


def test_per_layer_allocation_prunes_the_same_share_of_every_layer():
    model, gates, _ = _model("resnet18")
    sources = _images("resnet18", [3, 3])
    target = _images("resnet18", [4])[0]
    raw = make_criterion("dss", {"allocation": "global"})
    similarity = raw.score(event_score_inputs(raw, model, gates, sources, target))
    per_layer = make_criterion("dss")  # the default: the authors' allocation
    ranks = per_layer.score(event_score_inputs(per_layer, model, gates, sources, target))
    alive = gates.flat_alive()
    start = 0
    for size in gates.sizes:  # within a group: the similarity's order, as j / (alive channels)
        part, live = slice(start, start + size), alive[start : start + size]
        order = torch.argsort(similarity[part][live], stable=True)
        expected = torch.empty(int(live.sum()), dtype=ranks.dtype)
        expected[order] = torch.arange(1, int(live.sum()) + 1, dtype=ranks.dtype) / int(live.sum())
        torch.testing.assert_close(ranks[part][live], expected)
        start += size
    schedule = PruningSchedule(gates.sizes, keep_ratio=0.5, interval=1, max_per_step=10**6)
    schedule.alive = alive.cpu().clone()
    schedule.observe_event(ranks)
    chosen = schedule.step()
    remaining = torch.ones(gates.total, dtype=torch.bool)
    remaining[chosen] = False
    remaining &= alive.cpu()
    shares = [float(part.float().mean()) for part in torch.split(remaining, gates.sizes)]
    for share, size in zip(shares, gates.sizes, strict=True):
        assert abs(share - 0.5) <= 1.5 / size + 1e-9  # the same share of every group, to a channel


def test_a_pruning_event_ranks_by_its_own_scores_alone():
    """observe_event: mini-batches in between are only counted; each event's scores rank it alone (no
    mean over the interval, no moving average across events)."""
    schedule = PruningSchedule([4, 4], keep_ratio=0.5, interval=3, max_per_step=2, momentum=0.9)
    first = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7])
    second = torch.tensor([9.0, 9, 9, 9, 9, 9, 1, 0])
    pruned = []
    for scores in (first, second):
        for _ in range(2):
            assert not schedule.event_due
            schedule.observe_event(None)
            assert schedule.step() is None
        assert schedule.event_due
        schedule.observe_event(scores)
        pruned.append(sorted(schedule.step().tolist()))
    assert pruned == [[0, 1], [6, 7]] and schedule.done  # an EMA would have kept 7 over 2


def test_target_entropy_is_the_first_order_entropy_change_with_its_sign():
    model, gates, _ = _model("mnist_cnn")
    target = _images("mnist_cnn", [5])[0]
    grads, entropy = entropy_gate_gradients(model, gates, target, batch_size=2)

    def mean_entropy(flat: torch.Tensor) -> torch.Tensor:  # brute force: gates as an explicit input
        values = list(torch.split(flat, gates.sizes))
        with gates.relaxed(values):
            p = F.softmax(model(target), dim=1)
        return -(p * p.log()).sum(1).mean()

    ones = gates.flat_gates().double().requires_grad_(True)
    value = mean_entropy(ones)
    (expected,) = torch.autograd.grad(value, ones)
    alive = gates.flat_alive()  # (a pruned channel's gate is 0 in the brute force's product: no gradient)
    torch.testing.assert_close(grads[alive], expected[alive], atol=1e-10, rtol=1e-8)
    assert entropy == pytest.approx(float(value.detach()))
    for sign in (1, -1):
        criterion = make_criterion("target_entropy", {"sign": sign})
        scores = criterion.score(event_score_inputs(criterion, model, gates, [target], target))
        torch.testing.assert_close(scores, sign * -(expected * gates.flat_gates().double()))
    assert all(p.grad is None for p in model.parameters())  # only the gates were differentiated


def test_adabn_re_estimates_batchnorm_statistics_on_the_target_images():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, in_channels=3, small_input=True).eval()
    images = [torch.randn(4, 3, 8, 8) * 2 + 1 for _ in range(3)]
    adapted = adapt_batchnorm(model, iter(images))
    with torch.no_grad():
        stem = model.conv1(torch.cat(images))  # the first BatchNorm's input: independent of any statistics
    torch.testing.assert_close(adapted.bn1.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert torch.equal(model.bn1.running_mean, torch.zeros(64))  # the model itself is untouched
    assert not adapted.training


def test_the_architecture_example_is_one_file_and_prunes_once_registered(monkeypatch):
    """docs/examples/my_event_criterion.py: registered at run time, scored per event from feature maps
    (against the brute force), accepted by a config and pruning to the target."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "docs" / "examples"))
    from my_event_criterion import SPEC

    monkeypatch.setitem(REGISTRY, SPEC.name, SPEC)
    model, gates, _ = _model("mnist_cnn")
    sources = _images("mnist_cnn", [3, 4])
    pooled = _brute_maps(model, gates, torch.cat(sources))
    expected = (
        torch.stack([_brute_cosine(_brute_maps(model, gates, x), pooled) for x in sources]).min(0).values
    )
    criterion = make_criterion("steady", {"images": 4})
    torch.testing.assert_close(
        criterion.score(event_score_inputs(criterion, model, gates, sources, None)),
        expected,
        atol=1e-6,
        rtol=0,
    )
    config = build_config(overrides=_tiny(criterion="steady", criterion_params={"images": 4}))
    ctx = make_context(config)
    torch.manual_seed(0)
    tiny = build_model("mnist_cnn", 10, 1)
    outcome = prune_and_finetune(tiny, ctx.split, config.prune, 0, torch.device("cpu"), ctx.example_input)
    assert outcome.filters_kept == round(0.5 * outcome.filters_total)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize(
    ("criterion", "params", "access"),
    [("dss_sources", {"images": 8}, "none"), ("target_entropy", {"images": 8, "sign": 1}, "unlabeled")],
)
def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch, criterion, params, access):
    """Several pruning events; killed between two of them, resumed from the checkpoint: the same
    masks, curve and weights as the uninterrupted run (the event images are drawn again identically,
    the schedule's state is checkpointed)."""
    from dgprune.data import DomainBatches, load_dataset, make_lodo_split
    from dgprune.training import PruneSettings

    split = make_lodo_split(load_dataset("rotated_digits"), target="45", seed=1)
    settings = PruneSettings(
        criterion=criterion,
        criterion_params=params,
        target_access=access,
        keep_ratio=0.5,
        interval=2,
        max_per_step=60,
        steps=10,
        batch_size=4,
        eval_every=2,
    )
    x = torch.zeros(1, 1, 8, 8)

    def fresh():
        torch.manual_seed(7)
        return build_model("mnist_cnn", 10, 1)

    reference = prune_and_finetune(model_ref := fresh(), split, settings, 0, torch.device("cpu"), x)
    original, count = DomainBatches.next, {"n": 0}

    def next_batches(self):
        count["n"] += 1
        if count["n"] > 5:  # after the checkpoint of step 4, before the event of step 6
            raise _Interrupted
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(DomainBatches, "next", next_batches)
        with pytest.raises(_Interrupted):
            prune_and_finetune(
                fresh(),
                split,
                settings,
                0,
                torch.device("cpu"),
                x,
                checkpoint_dir=tmp_path,
                checkpoint_every=4,
            )
    resumed = prune_and_finetune(
        model := fresh(),
        split,
        settings,
        0,
        torch.device("cpu"),
        x,
        checkpoint_dir=tmp_path,
        checkpoint_every=4,
    )
    assert torch.equal(resumed.gates.flat_alive(), reference.gates.flat_alive())
    assert resumed.history == reference.history and resumed.best_step == reference.best_step
    for key, value in model_ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ---- settings, ids, leakage ----------------------------------------------------------------------


def test_a_criterion_that_reads_target_images_is_refused_under_target_access_none():
    for name, params in (("dss", {}), ("target_entropy", {"sign": 1})):
        with pytest.raises(ConfigError, match=f"prune.criterion {name} reads the target domain's images"):
            build_config(overrides={"target": "0", "prune": {"criterion": name, "criterion_params": params}})
    build_config(overrides={"target": "0", "prune": {"criterion": "dss_sources"}})  # source-only: fine


def test_unlabeled_run_ids_differ_and_old_ids_are_unchanged():
    taylor = build_config(overrides={"target": "0", "prune": {"criterion": "taylor"}})
    explicit = build_config(
        overrides={"target": "0", "prune": {"criterion": "taylor", "target_access": "none"}}
    )
    unlabeled = build_config(
        overrides={"target": "0", "prune": {"criterion": "taylor", "target_access": "unlabeled"}}
    )
    assert taylor.run_id() == explicit.run_id() == "66f118795323"  # pinned in test_criteria_extra
    assert unlabeled.run_id() != taylor.run_id()
    assert unlabeled.pretrain_id() == taylor.pretrain_id()  # the same pretrained model


class _Trap:
    """Reading the trapped parts of the target outside evaluation raises; image reads are counted."""

    def __init__(self) -> None:
        self.armed = False
        self.image_reads = 0


class _TrappedDomain(Domain):
    def __init__(self, domain: Domain, trap: _Trap, images_too: bool) -> None:
        self._trap, self._images_too = trap, images_too
        super().__init__(
            domain.name, domain.images, domain.labels, domain.train_transform, domain.eval_transform
        )

    @property
    def labels(self) -> torch.Tensor:
        if self._trap.armed:
            raise AssertionError("the target's labels were read outside evaluation")
        return self._labels

    @labels.setter
    def labels(self, value: torch.Tensor) -> None:
        self._labels = value

    @property
    def images(self):
        if self._trap.armed:
            if self._images_too:
                raise AssertionError("the target's images were read under target_access none")
            self._trap.image_reads += 1
        return self._images

    @images.setter
    def images(self, value) -> None:
        self._images = value


def _disarmed(trap: _Trap, function):
    def call(*args, **kwargs):
        armed, trap.armed = trap.armed, False
        try:
            return function(*args, **kwargs)
        finally:
            trap.armed = armed

    return call


def _tiny(model: str = "mnist_cnn", **prune) -> dict:
    # ResNet-18 on the CPU: three domains of ~600 digits, to keep its evaluations short
    options = {"angles": [0, 30, 60]} if model == "resnet18" else {}
    return {
        "data": {"name": "rotated_digits", "options": options},
        "model": {"name": model, "small_input": True},
        "target": "30",
        "device": "cpu",
        "pretrain": {"steps": 3, "batch_size": 4, "eval_every": 3},
        "prune": {
            "steps": 2,
            "batch_size": 4,
            "eval_every": 2,
            "interval": 1,
            "max_per_step": 10**4,
            **prune,
        },
    }


@pytest.mark.parametrize(
    ("model", "criterion", "params", "access"),
    [
        ("mnist_cnn", "dss", {"images": 8}, "unlabeled"),
        ("mnist_cnn", "target_entropy", {"images": 8, "sign": -1}, "unlabeled"),
        ("resnet18", "dss", {"images": 4}, "unlabeled"),  # BatchNorm: AdaBN runs too
        ("mnist_cnn", "dss_sources", {"images": 8}, "none"),
        ("mnist_cnn", "taylor", {}, "none"),
    ],
)
def test_booby_trapped_target_through_a_real_prune_run(
    tmp_path, monkeypatch, model, criterion, params, access
):
    """Under unlabeled, any read of the target's labels outside evaluation raises (its images are
    read); under none, any read of the target at all outside evaluation raises. Evaluation (the
    record's accuracies and AdaBN's accuracy) is the only reader allowed."""
    pre = build_config(overrides=_tiny(model))
    run_pretrain(make_context(pre), tmp_path / "pre")
    config = build_config(
        overrides=_tiny(model, criterion=criterion, criterion_params=params, target_access=access)
    )
    ctx = make_context(config)
    trap = _Trap()
    ctx.split.target = _TrappedDomain(ctx.split.target, trap, images_too=access == "none")
    for attribute in ("__init__", "__call__"):
        monkeypatch.setattr(Evaluator, attribute, _disarmed(trap, getattr(Evaluator, attribute)))
    monkeypatch.setattr(adabn_module, "correct_mask", _disarmed(trap, adabn_module.correct_mask))
    trap.armed = True
    record = run_prune(ctx, tmp_path / "pre", tmp_path / "out")
    trap.armed = False
    assert record.target_access == access and record.filters_kept == round(0.5 * record.filters_total)
    assert (trap.image_reads > 0) == (access == "unlabeled")  # the trap was on the path the images take
    if model == "resnet18":
        assert record.cross_acc_adabn is not None and record.dense_cross_acc_adabn is not None
    else:
        assert record.cross_acc_adabn is None  # GroupNorm: nothing to re-estimate
    if access == "unlabeled":
        assert record.label.endswith("[unlabeled target]")


# ---- the console script: prune, sweep + report, analyze ------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dss")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(_tiny()))
    done = subprocess.run(
        [str(SCRIPT), "pretrain", "--config", str(config), "--out", str(root / "pre"), "-q"],
        capture_output=True, text=True, env=ONE_THREAD, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return config, root / "pre"


@pytest.mark.parametrize(
    ("criterion", "extra"),
    [
        ("dss", ["--target-access", "unlabeled"]),
        ("dss_sources", []),
        ("target_entropy", ["--target-access", "unlabeled", "--criterion-param", "sign=1"]),
    ],
)
def test_each_new_criterion_prunes_through_the_console_script(pretrained, tmp_path, criterion, extra):
    config, pre = pretrained
    out = tmp_path / criterion
    args = [
        str(SCRIPT), "prune", "--config", str(config), "--pretrained", str(pre), "--out", str(out),
        "--criterion", criterion, "--criterion-param", "images=8", *extra,
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, env=ONE_THREAD, timeout=300)
    assert done.returncode == 0, done.stderr
    [record] = json.loads((out / "results.json").read_text())
    access = "unlabeled" if extra else "none"
    assert record["criterion"] == criterion and record["target_access"] == access
    assert record["filters_kept"] == round(0.5 * record["filters_total"])
    last = done.stdout.strip().splitlines()[-1]
    assert ("target 30 [unlabeled target]:" in last) == (access == "unlabeled"), last
    if access == "unlabeled":  # every progress line says it
        progress = [line for line in done.stderr.splitlines() if "prune step" in line]
        assert progress and all(line.startswith("[unlabeled target] ") for line in progress)


def test_the_console_script_refuses_a_target_criterion_without_target_access(pretrained, tmp_path):
    config, pre = pretrained
    done = subprocess.run(
        [
            str(SCRIPT), "prune", "--config", str(config), "--pretrained", str(pre), "--out",
            str(tmp_path / "o"), "--criterion", "dss",
        ],
        capture_output=True, text=True, env=ONE_THREAD, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "prune.target_access unlabeled" in done.stderr and not (tmp_path / "o").exists()


def test_a_tiny_sweep_and_its_report_mark_the_transductive_runs(tmp_path):
    base = _tiny()
    spec = {
        "base": base,
        "grid": [
            {"prune.criterion": ["taylor", "dss_sources"], "prune.criterion_params.images": 8},
            {
                "prune.criterion": ["dss", "target_entropy"],
                "prune.target_access": "unlabeled",
                "prune.criterion_params.images": 8,
                "prune.criterion_params.sign": 1,  # target_entropy's only
            },
        ],
        "sweep": {"db": "results.sqlite", "workers": 1},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [str(SCRIPT), "sweep", str(path), "--out", str(tmp_path / "sw"), "-q"],
        capture_output=True, text=True, env=ONE_THREAD, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    conn = sqlite3.connect(tmp_path / "sw" / "results.sqlite")
    try:
        rows = conn.execute(
            "SELECT criterion, status, target_access FROM runs WHERE kind != 'dense'"
        ).fetchall()
    finally:
        conn.close()
    assert sorted(rows) == [
        ("dss", "done", "unlabeled"),
        ("dss_sources", "done", "none"),
        ("target_entropy", "done", "unlabeled"),
        ("taylor", "done", "none"),
    ]
    report = subprocess.run(
        [str(SCRIPT), "report", str(path), "--out", str(tmp_path / "sw"), "--format", "md"],
        capture_output=True, text=True, env=ONE_THREAD, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    text = "\n".join(p.read_text() for p in (tmp_path / "sw").rglob("*.md"))
    assert "dss (images=8) [unlabeled target]" in text
    assert "target_entropy (images=8, sign=1) [unlabeled target]" in text
    assert "dss_sources (images=8) |" in text and "dss_sources (images=8) [" not in text
    assert "a transductive method against a source-only one" in text  # the paired table says so


def test_analyze_reports_the_new_signals(pretrained, tmp_path):
    _, pre = pretrained
    out = tmp_path / "analysis.json"
    done = subprocess.run(
        [
            str(SCRIPT), "analyze", "--model", str(pre), "--channels", "16", "--batch-size", "6",
            "--device", "cpu", "--out", str(out),
        ],
        capture_output=True, text=True, env=ONE_THREAD, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    payload = json.loads(out.read_text())
    rows = {r["name"]: r for r in payload["rows"]}
    for name in (
        "dss [unlabeled target]",
        "dss_sources",
        "target_entropy (sign=1) [unlabeled target]",
        "target_entropy (sign=-1) [unlabeled target]",
    ):
        assert rows[name]["spearman_target"] is not None and -1 <= rows[name]["spearman_target"] <= 1, name
        assert name in done.stdout  # the printed table shows the mark (escaped, not read as markup)
    plus, minus = (
        rows["target_entropy (sign=1) [unlabeled target]"],
        rows["target_entropy (sign=-1) [unlabeled target]"],
    )
    assert plus["spearman_target"] == pytest.approx(-minus["spearman_target"])
