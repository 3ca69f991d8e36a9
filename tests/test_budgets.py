"""Budgets in the user's units (prune.budget, issue 18 §1 and §3): settings and run ids, the exact params /
MACs of a channel structure, the cost-aware schedule and its stopping rule, and `dgprune prune --budget`
through the installed console script."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from dgprune.errors import ConfigError
from dgprune.experiments.config import build_config
from dgprune.models import build_model
from dgprune.pruning.budget import StructureCost
from dgprune.pruning.cost_model import ChannelStructure, counted_macs
from dgprune.pruning.gates import GateSet
from dgprune.pruning.groups import find_channel_groups
from dgprune.pruning.latency_table import Conditions, cache_path, latency_table, load_table, table_keys
from dgprune.pruning.measure import conv_widths
from dgprune.pruning.schedule import PruningSchedule, group_floors
from dgprune.pruning.surgery import compress, load_compressed, saved_input_shape

PINNED = "8e60a205d1e5"  # tests/test_sweep.py's pin of the default run


def _target(**prune) -> str:
    return build_config(overrides={"target": "0", "prune": prune}).run_id()


# --- settings and ids -------------------------------------------------------------------------------


def test_without_a_budget_run_ids_are_unchanged():
    assert build_config(overrides={"target": "0"}).run_id() == PINNED
    assert build_config(overrides={"target": "0"}, sets=["prune.budget=null"]).run_id() == PINNED
    # a filters budget is keep_ratio: the same run, the same id
    assert build_config(overrides={"target": "0"}, sets=["prune.budget=filters=0.5"]).run_id() == PINNED
    assert _target(budget={"metric": "filters", "ratio": 0.3}) == _target(keep_ratio=0.3)


def test_budgets_have_their_own_ids_and_latency_conditions_count_for_latency_only():
    ids = {
        _target(budget="macs=0.5"),
        _target(budget="params=0.5"),
        _target(budget="latency=0.5"),
        _target(budget="latency=0.3"),
        _target(budget={"metric": "latency", "ratio": 0.5, "threads": 2}),
        _target(budget={"metric": "latency", "ratio": 0.5, "runtime": "onnxruntime"}),
        _target(budget={"metric": "latency", "ratio": 0.5, "batch_size": 8}),
    }
    assert len(ids | {PINNED}) == 8
    config = build_config(overrides={"target": "0"}, sets=["prune.budget=macs=0.5"])
    assert config.pretrain_id() == build_config(overrides={"target": "0"}).pretrain_id()  # same model
    assert config.prune.budget is not None and config.prune.budget.label() == "macs=0.5"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["prune.keep_ratio=0.3", "prune.budget=macs=0.5"], "keep_ratio 0.3 and prune.budget macs=0.5 both"),
        (["prune.keep_ratio=0.3", "prune.budget=filters=0.4"], "disagree"),
        (["prune.budget=flops=0.5"], "expected METRIC=RATIO"),
        (["prune.budget=macs=1.5"], "ratio"),
        (["prune.budget={metric: macs, ratio: 0.5, threads: 2}"], "condition of a latency budget"),
    ],
)
def test_contradicting_or_malformed_budgets_are_one_error(sets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config(overrides={"target": "0"}, sets=sets)


def test_a_dumped_budget_config_reads_back_as_the_same_run(tmp_path: Path):
    from dgprune.experiments.config import dump_config

    config = build_config(overrides={"target": "0"}, sets=["prune.budget=latency=0.4"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert build_config(path).run_id() == config.run_id()


# --- exact params and MACs ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "shape"), [("mnist_cnn", (1, 28, 28)), ("resnet18", (3, 24, 24))])
def test_structure_costs_equal_the_counts_of_the_compressed_model(name, shape):
    """Predicted from widths alone == counted on the physically compressed model (all parameters;
    conv and linear MACs by Torch-Pruning's counter), at random widths."""
    torch.set_num_threads(1)
    model = build_model(name, 10, in_channels=shape[0], small_input=True)
    example = torch.zeros(1, *shape)
    groups = find_channel_groups(model, example)
    structure = ChannelStructure.of(model, groups, example)
    assert structure.params(structure.group_sizes) == sum(p.numel() for p in model.parameters())
    assert structure.macs(structure.group_sizes) == counted_macs(model, example)
    gates = GateSet(model, groups).attach()
    generator = torch.Generator().manual_seed(1)
    keep = [int(torch.randint(1, n + 1, (1,), generator=generator)) for n in structure.group_sizes]
    chosen = []
    for group, (n, k) in enumerate(zip(structure.group_sizes, keep, strict=True)):
        start = sum(structure.group_sizes[:group])
        chosen += (start + torch.randperm(n, generator=generator)[: n - k]).tolist()
    gates.prune(torch.tensor(chosen))
    compress(model, gates, example)
    assert structure.params(keep) == sum(p.numel() for p in model.parameters())
    assert structure.macs(keep) == counted_macs(model, example)


# --- the cost-aware schedule -----------------------------------------------------------------------


def _mnist_structure() -> ChannelStructure:
    model = build_model("mnist_cnn", 10, in_channels=1)
    example = torch.zeros(1, 1, 28, 28)
    return ChannelStructure.of(model, find_channel_groups(model, example), example)


def _run(schedule: PruningSchedule, scores: torch.Tensor) -> list[tuple[int, float]]:
    """Prune to the end; (channels removed, predicted ratio) after every pruning step."""
    steps = []
    for _ in range(1000):
        if schedule.done:
            break
        schedule.observe(scores)
        chosen = schedule.step()
        if chosen is not None:
            steps.append((len(chosen), schedule.predicted_ratio))
    assert schedule.done
    return steps


@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize(("round_to", "limit"), [(1, None), (8, None), (8, 0.75)])
def test_the_schedule_stops_at_the_first_step_within_budget(metric, round_to, limit):
    structure = _mnist_structure()
    cost = StructureCost(structure, metric)
    scores = torch.rand(sum(structure.group_sizes), generator=torch.Generator().manual_seed(3))
    schedule = PruningSchedule(
        structure.group_sizes, 0.5, interval=2, max_per_step=60, round_to=round_to,
        max_layer_prune=limit, cost=cost, budget_ratio=0.4,
    )  # fmt: skip
    steps = _run(schedule, scores)
    ratios = [ratio for _, ratio in steps]
    assert ratios[-1] <= 0.4 and all(r > 0.4 for r in ratios[:-1])  # stops as soon as it is reached
    assert ratios == sorted(ratios, reverse=True)
    assert all(count <= max(60, round_to) for count, _ in steps)  # the cap per step
    widths = schedule.widths()
    floors = group_floors(structure.group_sizes, round_to, limit)
    assert all(w >= f for w, f in zip(widths, floors, strict=True))
    assert all(w % round_to == 0 or w == n for w, n in zip(widths, structure.group_sizes, strict=True))
    assert schedule.predicted_ratio == pytest.approx(cost(widths) / cost(structure.group_sizes))


def _greedy_by_hand(sizes, cost, scores, ratio):
    """HALP's greedy computed independently: one channel at a time (round_to 1, no cap), the channel with
    the lowest (score - lowest score) / (cost saved by removing one channel of its group) first."""
    alive = [sorted(scores[sum(sizes[:g]) : sum(sizes[: g + 1])].tolist()) for g in range(len(sizes))]
    low = min(min(a) for a in alive)
    widths = list(sizes)
    goal = ratio * cost(sizes)
    while cost(widths) > goal:
        options = []
        for g, width in enumerate(widths):
            if width > 1:
                trial = list(widths)
                trial[g] -= 1
                saving = cost(widths) - cost(trial)
                if saving > 0:
                    options.append(((alive[g][sizes[g] - width] - low) / saving, g))
        if not options:
            break
        widths[min(options)[1]] -= 1
    return widths


def test_the_greedy_follows_importance_per_unit_of_cost():
    sizes = [4, 6, 5]

    def cost(widths):  # a chain of three layers: w0 w1 + w1 w2 + 3 w2 (a bilinear cost like MACs)
        return float(widths[0] * widths[1] + widths[1] * widths[2] + 3 * widths[2] + 10)

    scores = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    schedule = PruningSchedule(sizes, 0.5, interval=1, max_per_step=100, cost=cost, budget_ratio=0.45)
    schedule.observe(scores)
    schedule.step()
    assert schedule.done
    assert schedule.widths() == _greedy_by_hand(sizes, cost, scores, 0.45)
    for g, width in enumerate(schedule.widths()):  # each group keeps its best channels
        group = scores[sum(sizes[:g]) : sum(sizes[: g + 1])]
        kept = group[schedule.alive[sum(sizes[:g]) : sum(sizes[: g + 1])]]
        assert kept.min() >= group.sort(descending=True).values[width - 1]


def test_an_unreachable_budget_is_refused_before_training():
    structure = _mnist_structure()
    with pytest.raises(ConfigError, match=r"prune.budget ratio 0.001: .* still cost .* ask for"):
        PruningSchedule(structure.group_sizes, 0.5, round_to=8, cost=StructureCost(structure, "macs"),
                        budget_ratio=0.001)  # fmt: skip


# --- the command -------------------------------------------------------------------------------------


TINY_PRUNE = ("--steps", "4", "--set", "prune.interval=1", "--set", "prune.max_per_step=4000",
              "--set", "prune.batch_size=4", "--device", "cpu", "-q")  # fmt: skip


def _pretrain(root: Path, *model: str) -> Path:
    pre = root / "pre"
    result = run_cli(
        "pretrain", "--out", str(pre), "--target", "0", "--steps", "2", "--set", "pretrain.eval_every=2",
        "--set", "pretrain.batch_size=4", *model, "--device", "cpu", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return pre


@pytest.fixture(scope="module")
def mnist_pretrained(tmp_path_factory) -> Path:
    return _pretrain(tmp_path_factory.mktemp("budget_mnist"))


def _record(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _widths_of(directory: Path, structure: ChannelStructure) -> list[int]:
    """The compressed model's group widths, read from its convs (each group's first conv)."""
    compressed, _ = load_compressed(directory, build_model)
    kept = conv_widths(compressed)
    out_of = {
        layer.out_group: layer.name for layer in reversed(structure.layers) if layer.out_group is not None
    }
    return [kept[out_of[g]] for g in range(len(structure.group_sizes))]


@dataclass
class _LatencySetup:
    """What a latency-budget run of ``name`` on the inputs saved in a model directory measures its table
    with: the dense model, its structure, the conditions, round_to, grid points and floors."""

    dense: torch.nn.Module
    structure: ChannelStructure
    conditions: Conditions
    round_to: int
    points: int
    floors: list[int]

    @classmethod
    def of(cls, directory: Path, name: str, **cond) -> _LatencySetup:
        shape = saved_input_shape(directory)
        dense = build_model(name, 10, in_channels=shape[0], small_input=True)
        example = torch.zeros(1, *shape)
        structure = ChannelStructure.of(dense, find_channel_groups(dense, example), example)
        round_to = cond.get("round_to", 1)
        conditions = Conditions("torch", cond.get("threads", 1), cond.get("batch_size", 1), shape)
        floors = group_floors(structure.group_sizes, round_to)
        return cls(dense, structure, conditions, round_to, cond.get("points", 8), floors)

    def ratio(self, table, widths) -> float:
        return table.predict_ms(self.structure, widths) / table.predict_ms(
            self.structure, self.structure.group_sizes
        )


def _reachable_latency_ratio(pretrained: Path, cache: Path, name: str, **cond) -> float:
    """A latency budget this machine can reach: halfway between the narrowest widths' predicted cost and
    the dense one, from the table the run will read back from ``cache`` (measured here, in the run's
    exact conditions). A fixed ratio is not portable: the floor is 0.60 on one 2-core machine, 0.605 on
    another."""
    run = _LatencySetup.of(pretrained, name, **cond)
    table = latency_table(
        run.dense, run.structure, run.conditions, run.round_to, run.points, run.floors, cache_dir=cache
    )
    least = run.ratio(table, run.floors)
    assert least < 0.97, f"the narrowest widths cost {least:.3f} of dense: nothing left to budget"
    return round(least + (1 - least) / 2, 3)


def _latency_check(out: Path, cache: Path, ratio: float, name: str, **cond):
    record = _record(out)
    assert record["budget_metric"] == "latency" and record["budget_target"] == ratio
    assert record["keep_ratio"] == ratio and record["budget_measured"] > 0  # measured: reported, not asserted
    assert record["budget_predicted"] <= ratio
    # the prediction again, independently: the cached table at the compressed model's widths
    run = _LatencySetup.of(out, name, **cond)
    keys = table_keys(run.structure, run.conditions, run.round_to, run.points, run.floors)
    table = load_table(cache_path(keys, cache), keys)
    assert table is not None  # the run cached its table under exactly these keys
    widths = _widths_of(out, run.structure)
    assert record["budget_predicted"] == pytest.approx(run.ratio(table, widths), rel=1e-9)
    assert record["filters_kept"] == sum(widths) < sum(run.structure.group_sizes)


def test_latency_budget_run_on_mnist_cnn(tmp_path: Path, mnist_pretrained: Path, monkeypatch):
    cache = tmp_path / "lut"
    monkeypatch.setenv("DGPRUNE_LATENCY_CACHE", str(cache))
    ratio = _reachable_latency_ratio(mnist_pretrained, cache, "mnist_cnn", batch_size=8, points=3)
    out = tmp_path / "pruned"
    result = run_cli(
        "prune", "--pretrained", str(mnist_pretrained), "--out", str(out), "--target", "0",
        "--criterion", "taylor", "--budget", f"latency={ratio}", "--set", "prune.budget.grid_points=3",
        "--set", "prune.budget.batch_size=8", *TINY_PRUNE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _latency_check(out, cache, ratio, "mnist_cnn", batch_size=8, points=3)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["prune"]["budget"]["metric"] == "latency"


@pytest.mark.parametrize(("metric", "criterion"), [("macs", "ior"), ("params", "l1")])
def test_macs_and_params_budgets_end_within_budget_exactly_as_counted(
    tmp_path: Path, mnist_pretrained: Path, metric: str, criterion: str
):
    out = tmp_path / "pruned"
    result = run_cli(
        "prune", "--pretrained", str(mnist_pretrained), "--out", str(out), "--target", "0",
        "--criterion", criterion, "--budget", f"{metric}=0.5", "--round-to", "8", *TINY_PRUNE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = _record(out)
    assert record["budget_metric"] == metric and record["budget_predicted"] <= 0.5
    # measured on the compressed model by counting (record) == predicted from the widths (schedule)
    assert record["budget_measured"] == pytest.approx(record["budget_predicted"], rel=1e-12)
    compressed, _ = load_compressed(out, build_model)
    dense = build_model("mnist_cnn", 10, in_channels=1)
    example = torch.zeros(1, *saved_input_shape(out))
    if metric == "params":
        counted = sum(p.numel() for p in compressed.parameters()) / sum(p.numel() for p in dense.parameters())
        assert record["params"] == sum(p.numel() for p in compressed.parameters())
    else:
        counted = counted_macs(compressed, example) / counted_macs(dense, example)
    assert counted == pytest.approx(record["budget_predicted"], rel=1e-12)
    assert all(w % 8 == 0 for w in conv_widths(compressed).values())


def test_budget_and_keep_ratio_together_are_one_error_line(tmp_path: Path, mnist_pretrained: Path):
    result = run_cli(
        "prune", "--pretrained", str(mnist_pretrained), "--out", str(tmp_path / "p"), "--target", "0",
        "--keep-ratio", "0.3", "--budget", "latency=0.5", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error:") and "--budget filters=0.3" in line


def test_latency_budget_run_on_resnet18(tmp_path: Path, monkeypatch):
    """At the embedded digits' 8 x 8 px, batch 1 is all overhead (the narrowest widths still cost 0.6 of
    dense): batch 32 gives the convolutions their weight."""
    cache = tmp_path / "lut"
    monkeypatch.setenv("DGPRUNE_LATENCY_CACHE", str(cache))
    pre = _pretrain(tmp_path, "--model", "resnet18", "--set", "model.small_input=true")
    cond = {"round_to": 8, "points": 3, "batch_size": 32}
    ratio = _reachable_latency_ratio(pre, cache, "resnet18", **cond)
    out = tmp_path / "pruned"
    result = run_cli(
        "prune", "--pretrained", str(pre), "--out", str(out), "--target", "0", "--criterion", "taylor",
        "--budget", f"latency={ratio}", "--round-to", "8", "--set", "prune.budget.grid_points=3",
        "--set", "prune.budget.batch_size=32", *TINY_PRUNE[2:], "--steps", "2",  # one event, one step after
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _latency_check(out, cache, ratio, "resnet18", **cond)


def test_learned_scores_prune_to_the_budget_at_once():
    """A criterion that prunes once (learned_masks: PruningSchedule.prune_at_once) spends the budget in
    that one step, with no cap."""
    structure = _mnist_structure()
    cost = StructureCost(structure, "macs")
    schedule = PruningSchedule(structure.group_sizes, 0.5, max_per_step=10, cost=cost, budget_ratio=0.3)
    chosen = schedule.prune_at_once(torch.rand(sum(structure.group_sizes), generator=torch.Generator()))
    assert schedule.done and len(chosen) > 10 and schedule.predicted_ratio <= 0.3
