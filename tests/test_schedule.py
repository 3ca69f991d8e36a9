"""The pruning schedule: interval averaging, EMA, per-step cap, exact stop, groups never emptied."""

import itertools

import pytest
import torch

from dgprune.pruning.schedule import PruningSchedule, target_channels


def _run(schedule: PruningSchedule, score_fn, max_batches: int = 10_000):
    counts, removed_sets = [schedule.num_alive], []
    ever_pruned = torch.zeros(schedule.total, dtype=torch.bool)
    for _ in range(max_batches):
        if schedule.done:
            break
        schedule.observe(score_fn())
        chosen = schedule.step()
        if chosen is not None:
            assert not ever_pruned[chosen].any(), "a pruned channel was chosen again"
            assert ever_pruned[~schedule.alive].all() or True
            ever_pruned[chosen] = True
            assert torch.equal(~schedule.alive, ever_pruned), "pruned channels must never return"
            counts.append(schedule.num_alive)
            removed_sets.append(chosen)
    return counts


@pytest.mark.parametrize("keep_ratio", [0.5, 0.3, 0.07])
def test_counts_follow_cap_and_stop_exactly(keep_ratio):
    sizes = [64, 128, 128, 256, 3]
    schedule = PruningSchedule(sizes, keep_ratio, interval=4, max_per_step=100)
    counts = _run(schedule, lambda: torch.rand(sum(sizes)))
    target = target_channels(sum(sizes), keep_ratio, len(sizes))
    assert counts[-1] == target
    for before, after in itertools.pairwise(counts):
        assert before - after == min(100, before - target)
    groups = schedule.group_of[schedule.alive]
    assert set(groups.tolist()) == set(range(len(sizes))), "a group was emptied"


def test_group_never_emptied_even_when_its_scores_are_lowest():
    sizes = [10, 50]
    scores = torch.cat([torch.zeros(10), torch.ones(50)])  # group 0 always least important
    schedule = PruningSchedule(sizes, 0.1, interval=1, max_per_step=100)
    _run(schedule, lambda: scores)
    alive_per_group = torch.bincount(schedule.group_of[schedule.alive], minlength=2)
    assert alive_per_group[0] == 1 and schedule.num_alive == 6


def test_interval_mean_and_ema_choose_the_channels():
    # 4 channels in one group; interval 2, momentum 0.5; prune 1 per step.
    schedule = PruningSchedule([4], keep_ratio=0.5, interval=2, max_per_step=1, momentum=0.5)
    schedule.observe(torch.tensor([1.0, 5.0, 3.0, 4.0]))
    assert schedule.step() is None  # interval not complete
    schedule.observe(torch.tensor([3.0, 5.0, 3.0, 4.0]))
    first = schedule.step()  # mean [2, 5, 3, 4] initialises the EMA
    assert first.tolist() == [0]
    torch.testing.assert_close(schedule.ema, torch.tensor([2.0, 5.0, 3.0, 4.0], dtype=torch.float64))
    schedule.observe(torch.tensor([0.0, 0.0, 9.0, 9.0]))
    schedule.observe(torch.tensor([0.0, 0.0, 9.0, 9.0]))
    second = schedule.step()  # ema = 0.5*[2,5,3,4] + 0.5*[0,0,9,9] = [1, 2.5, 6, 6.5]
    assert second.tolist() == [1]
    assert schedule.done and schedule.step() is None


def test_state_dict_round_trip_continues_identically():
    sizes = [30, 40]
    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(70, generator=gen) for _ in range(40)]
    a = PruningSchedule(sizes, 0.3, interval=3, max_per_step=7)
    b = PruningSchedule(sizes, 0.3, interval=3, max_per_step=7)
    for s in scores[:10]:
        a.observe(s), a.step()
        b.observe(s), b.step()
    c = PruningSchedule(sizes, 0.3, interval=3, max_per_step=7)
    c.load_state_dict(b.state_dict())
    for s in scores[10:]:
        a.observe(s)
        c.observe(s)
        ra, rc = a.step(), c.step()
        assert (ra is None and rc is None) or torch.equal(ra, rc)
    assert torch.equal(a.alive, c.alive)


def test_keep_ratio_out_of_range():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            PruningSchedule([10], bad)


@pytest.mark.parametrize("round_mode", ["budget", "per_layer"])
@pytest.mark.parametrize("keep_ratio", [0.5, 0.3, 0.07])
def test_round_to_gives_multiples_and_keeps_each_groups_best(keep_ratio, round_mode):
    sizes = [64, 128, 128, 256, 3]  # the last group is narrower than 8: never pruned
    fixed = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(0))
    rounded = PruningSchedule(
        sizes, keep_ratio, interval=2, max_per_step=100, round_to=8, round_mode=round_mode
    )
    _run(rounded, lambda: fixed)
    assert rounded.done and rounded.steps_to_target() == 0
    widths = torch.bincount(rounded.group_of[rounded.alive], minlength=len(sizes)).tolist()
    assert all(w % 8 == 0 and w >= 8 for w in widths[:-1]), widths
    assert widths[-1] == 3
    assert abs(sum(widths) - rounded.target) <= 4 * (len(sizes) - 1)  # nearest multiples: <= q/2 each
    # Within each group the survivors are that group's highest-scored channels (scores are fixed).
    for group in range(len(sizes)):
        members = torch.nonzero(rounded.group_of == group).flatten()
        best = members[torch.argsort(fixed[members], descending=True)][: widths[group]]
        assert set(best.tolist()) == set(
            torch.nonzero(rounded.alive & (rounded.group_of == group)).flatten().tolist()
        )


def test_round_to_state_round_trip_keeps_it_finished():
    schedule = PruningSchedule([64, 64], 0.3, interval=1, max_per_step=100, round_to=8)
    _run(schedule, lambda: torch.rand(128))
    restored = PruningSchedule([64, 64], 0.3, interval=1, max_per_step=100, round_to=8)
    restored.load_state_dict(schedule.state_dict())
    assert restored.done and restored.step() is None


def test_round_to_finishes_when_its_floors_stop_it_above_the_target():
    # 4 groups can keep no fewer than 8 each (32) but the target is 22: stop at the floors, not loop.
    schedule = PruningSchedule([64, 128, 128, 128], 0.05, interval=1, max_per_step=100, round_to=8)
    _run(schedule, lambda: torch.rand(448), max_batches=50)
    assert schedule.done and schedule.num_alive == 32
    assert torch.bincount(schedule.group_of[schedule.alive]).tolist() == [8, 8, 8, 8]


def _kept_mass(schedule: PruningSchedule, scores: torch.Tensor) -> float:
    return float(scores[schedule.alive].sum())


def _best_mass_by_enumeration(sizes: list[int], scores: torch.Tensor, q: int, total: int) -> float:
    """Brute force: every choice of widths (multiples of q, at least q; a group of at most q kept
    whole) whose sum is ``total``, each group keeping its best channels; the largest score mass."""
    options, prefix = [], []
    start = 0
    for n in sizes:
        ranked = scores[start : start + n].sort(descending=True).values
        prefix.append(torch.cat([torch.zeros(1, dtype=scores.dtype), ranked.cumsum(0)]))
        options.append([n] if n <= q else list(range(q, n + 1 - n % q if n % q else n + 1, q)))
        start += n
    best = float("-inf")
    for widths in itertools.product(*options):
        if sum(widths) == total:
            best = max(best, sum(float(p[w]) for p, w in zip(prefix, widths, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("keep_ratio", [0.5, 0.3])
def test_budget_rounding_keeps_the_most_score_mass_at_the_nearest_total(seed, keep_ratio):
    """One pruning step (interval 1, no cap): the budget rule's widths equal the brute-force optimum
    over all widths that are multiples of q and sum to the multiple of q nearest the target."""
    sizes, q = [24, 16, 32, 9, 3, 20], 4
    generator = torch.Generator().manual_seed(seed)
    # Signed, unequal scales per group: the optimum is not simply "round every group alike".
    scale = torch.cat([torch.full((n,), 1.0 + i) for i, n in enumerate(sizes)])
    scores = (torch.randn(sum(sizes), generator=generator, dtype=torch.float64) + 0.3) * scale
    schedule = PruningSchedule(sizes, keep_ratio, interval=1, max_per_step=10_000, round_to=q)
    schedule.observe(scores)
    schedule.step()
    assert schedule.done
    widths = torch.bincount(schedule.group_of[schedule.alive], minlength=len(sizes)).tolist()
    fixed = 3  # the group of 3 is narrower than q and kept whole
    total = fixed + q * round((schedule.target - fixed) / q)
    assert sum(widths) == total, (widths, schedule.target)
    assert all(w % q == 0 for w, n in zip(widths, sizes, strict=True) if n > q)
    assert _kept_mass(schedule, scores) == pytest.approx(_best_mass_by_enumeration(sizes, scores, q, total))


def test_budget_rounding_hits_the_nearest_total_where_per_layer_rounding_drifts():
    """MNIST_CNN-like widths, keep 0.3 (target 134) over 4 capped steps: the budget rule always ends at
    136, the multiple of 8 nearest 134, while rounding each layer alone drifts (120-136 here)."""
    sizes = [32, 64, 64, 128, 160]
    totals = {"budget": set(), "per_layer": set()}
    for seed in range(10):
        scores = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(seed)) ** 3
        runs = {}
        for mode in totals:
            schedule = PruningSchedule(sizes, 0.3, interval=1, max_per_step=100, round_to=8, round_mode=mode)
            _run(schedule, lambda scores=scores: scores)
            runs[mode] = schedule
            totals[mode].add(schedule.num_alive)
        if runs["budget"].num_alive == runs["per_layer"].num_alive:  # same total: never less score mass
            assert _kept_mass(runs["budget"], scores) >= _kept_mass(runs["per_layer"], scores) - 1e-6
    assert totals["budget"] == {136}
    assert min(totals["per_layer"]) < 128


def test_unknown_round_mode_is_refused():
    with pytest.raises(ValueError, match="round_mode must be one of budget, per_layer"):
        PruningSchedule([16], 0.5, round_to=8, round_mode="nearest")
