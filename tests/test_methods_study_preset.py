"""The methods_study preset (issue 17.4): what it runs, as docs/criteria.md describes it."""

from collections import Counter
from pathlib import Path

from dgprune.experiments.sweep import load_sweep

BENCHMARKS = {"rotated_digits": 6, "colored_digits": 3, "styled_digits": 6}  # targets each


def _label(config) -> str:
    sign = config.prune.criterion_params.get("sign")
    return config.prune.criterion + ("" if sign is None else f"{sign:+d}")


def test_powered_part_breadth_and_leave_one_source_out_runs(tmp_path: Path):
    configs = load_sweep("methods_study", out=tmp_path).configs()
    main = [c for c in configs if not c.data.options]
    loso = [c for c in configs if c.data.options]
    runs = Counter((c.data.name, c.prune.keep_ratio, _label(c), c.seed) for c in main)
    for dataset, targets in BENCHMARKS.items():
        for name in ["taylor", "ior", "dss_sources", "dss", "target_entropy+1"]:
            for seed in range(4):  # the powered part: keep 50%, four seeds, every target
                assert runs[(dataset, 0.5, name, seed)] == targets
            for keep in (0.9, 0.3):  # breadth: two seeds
                assert [runs[(dataset, keep, name, s)] for s in range(3)] == [targets, targets, 0]
        for name in ["worst_domain", "taylor_disagreement", "learned_masks", "target_entropy-1"]:
            assert [runs[(dataset, 0.5, name, s)] for s in range(3)] == [targets, targets, 0]
        # The control: the dense model fine-tuned as the pruned ones are, every seed.
        assert [runs[(dataset, 1.0, "taylor", s)] for s in range(5)] == [targets] * 4 + [0]
    # The methods that read the target's images, and only they, run under the unlabeled mode.
    for c in main:
        transductive = c.prune.criterion in ("dss", "target_entropy")
        assert c.prune.target_access == ("unlabeled" if transductive else "none")
    # Leave-one-source-out: the true target (clean, inverted) left out, every other style in turn.
    held_out = Counter((tuple(c.data.options["styles"]), c.target, _label(c)) for c in loso)
    assert len(held_out) == 2 * 5 * 2 and set(held_out.values()) == {1}
    assert {"clean", "inverted"} == {
        ({"clean", "noisy", "blurred", "inverted", "edges", "thick"} - set(styles)).pop()
        for styles, _, _ in held_out
    }


def test_powered_follow_up_repeats_the_study_s_runs_and_leaves_each_target_out(tmp_path: Path):
    """methods_power: 16 seeds of every rotated target for the four methods; seeds 0-3 are the
    methods study's own runs (same ids), so both records agree; every domain of the rotated and the
    styled digits is left out once for the leave-one-source-out choice of the method."""
    configs = load_sweep("methods_power", out=tmp_path / "p").configs()
    study_ids = {c.run_id() for c in load_sweep("methods_study", out=tmp_path / "s").configs()}
    powered = [c for c in configs if c.data.name == "rotated_digits" and not c.data.options]
    runs = Counter((_label(c), c.seed) for c in powered)
    for name in ["taylor", "dss_sources", "dss", "target_entropy+1"]:
        assert [runs[(name, s)] for s in range(17)] == [6] * 16 + [0]
    assert all(c.prune.keep_ratio == 0.5 for c in configs)
    assert {c.run_id() for c in powered if c.seed < 4} <= study_ids
    loso = [c for c in configs if c.data.options]
    for dataset, key, domains in (
        ("rotated_digits", "angles", [0, 15, 30, 45, 60, 75]),
        ("styled_digits", "styles", ["clean", "noisy", "blurred", "inverted", "edges", "thick"]),
    ):
        left_out = Counter(
            (next(d for d in domains if d not in c.data.options[key]), c.target, _label(c))
            for c in loso
            if c.data.name == dataset
        )
        assert len(left_out) == 6 * 5 * 3 and set(left_out.values()) == {1}  # 6 true x 5 pseudo x 3
    # The styled digits' full-benchmark runs the table sets beside the choice: seeds 0-1.
    styled = Counter(
        (_label(c), c.seed) for c in configs if c.data.name == "styled_digits" and not c.data.options
    )
    assert styled == {(name, s): 6 for name in ("taylor", "dss_sources", "dss") for s in (0, 1)}
