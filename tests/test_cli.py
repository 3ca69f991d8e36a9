"""The command line end to end: the demo on a tiny budget, single stages, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED_FIELDS = {
    "dataset",
    "target_domain",
    "model",
    "criterion",
    "keep_ratio",
    "seed",
    "intra_acc",
    "cross_acc",
    "per_domain_acc",
    "filters_total",
    "filters_kept",
    "params",
    "macs",
}


def dgprune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dgprune", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    result = dgprune(
        "demo",
        "--out",
        str(out),
        "--targets",
        "0,45",
        "--pretrain-steps",
        "12",
        "--prune-steps",
        "45",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    return out


def test_demo_writes_complete_results_and_table(demo_out):
    records = json.loads((demo_out / "results.json").read_text())
    assert len(records) == 2 * (1 + 2 * 2)  # per target: dense + {0.5, 0.3} x {taylor, ior}
    for r in records:
        assert r.keys() >= REQUIRED_FIELDS
        assert set(r["per_domain_acc"]) == {"0", "15", "30", "45", "60", "75"}
        assert 0.0 <= r["intra_acc"] <= 1.0 and 0.0 <= r["cross_acc"] <= 1.0
        assert r["per_domain_acc"][r["target_domain"]] == r["cross_acc"]
        if r["criterion"] == "none":
            assert r["filters_kept"] == r["filters_total"] == 448 and r["params"] == r["params_dense"]
        else:
            assert r["filters_kept"] == round(r["keep_ratio"] * r["filters_total"])
            assert r["params"] < r["params_dense"] and r["macs"] < r["macs_dense"]
            assert r["masked_vs_compressed_max_abs_diff"] < 1e-4
            assert (Path(r["model_dir"]) / "model.safetensors").is_file()
    table = (demo_out / "table.md").read_text().splitlines()
    assert table[0].startswith("| Model | 0 Intra | 0 Cross | 45 Intra | 45 Cross |")
    assert table[2].startswith("| dense (before pruning) |")
    assert len(table) == 2 + 5  # header, rule, dense + 4 pruned rows
    assert "-" not in "".join(cell for line in table[2:] for cell in line.split("|")[2:6])


def test_demo_resumes_without_recomputing(demo_out):
    before = (demo_out / "results.json").read_text()
    result = dgprune(
        "demo",
        "--out",
        str(demo_out),
        "--targets",
        "0,45",
        "--pretrain-steps",
        "12",
        "--prune-steps",
        "45",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((demo_out / "results.json").read_text()) == json.loads(before)


def test_evaluate_a_compressed_model(demo_out):
    records = json.loads((demo_out / "results.json").read_text())
    pruned = next(r for r in records if r["criterion"] == "ior" and r["target_domain"] == "45")
    result = dgprune("evaluate", "--model", pruned["model_dir"], "--target", "45", "--seed", "0")
    assert result.returncode == 0, result.stderr
    acc = json.loads(result.stdout)
    assert acc["cross_acc"] == pytest.approx(pruned["cross_acc"])
    assert acc["intra_acc"] == pytest.approx(pruned["intra_acc"])


def test_pretrain_and_prune_stages_from_a_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "target: '30'\npretrain:\n  steps: 5\n  eval_every: 5\nprune:\n  steps: 5\n"
        "  interval: 2\n  keep_ratio: 0.8\n  criterion: taylor\ndevice: cpu\n"
    )
    pre = dgprune("pretrain", "--config", str(config), "--out", str(tmp_path / "pre"), "-q")
    assert pre.returncode == 0, pre.stderr
    pruned = dgprune(
        "prune",
        "--config",
        str(config),
        "--pretrained",
        str(tmp_path / "pre"),
        "--out",
        str(tmp_path / "pruned"),
        "--criterion",
        "ior",
        "-q",
    )
    assert pruned.returncode == 0, pruned.stderr
    [record] = json.loads((tmp_path / "pruned" / "results.json").read_text())
    assert record["criterion"] == "ior" and record["keep_ratio"] == 0.8
    assert record["filters_kept"] == round(0.8 * 448)


def _assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error:")
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_unknown_domain_names_the_valid_ones(tmp_path):
    _assert_clean_error(dgprune("demo", "--out", str(tmp_path), "--targets", "0,90"), "'90'", "15", "75")
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("ratio", ["1.5", "0", "-0.2"])
def test_keep_ratio_outside_range(tmp_path, ratio):
    result = dgprune(
        "prune",
        "--pretrained",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--target",
        "0",
        "--keep-ratio",
        ratio,
    )
    _assert_clean_error(result, "prune.keep_ratio")


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope" / "resnet18.pth"
    result = dgprune(
        "pretrain",
        "--out",
        str(tmp_path / "o"),
        "--target",
        "0",
        "--model",
        "resnet18",
        "--weights",
        str(missing),
    )
    _assert_clean_error(result, str(missing))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("prune: [unclosed", "not valid YAML"),
        ("prune:\n  keep_ration: 0.5\n", "prune.keep_ration"),
        ("- a list\n", "mapping"),
        ("prune:\n  criterion: magic\n", "prune.criterion"),
    ],
)
def test_malformed_config(tmp_path, text, fragment):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = dgprune("pretrain", "--config", str(config), "--out", str(tmp_path / "o"), "--target", "0")
    _assert_clean_error(result, str(config), fragment)


def test_missing_config_file(tmp_path):
    _assert_clean_error(dgprune("pretrain", "--config", str(tmp_path / "x.toml"), "--out", "o"), "x.toml")


def test_help_explains_every_option():
    for command in ("demo", "pretrain", "prune", "evaluate"):
        result = dgprune(command, "--help")
        assert result.returncode == 0
        assert "--device" in result.stdout


def test_table2_layout_and_deltas(tmp_path):
    result = dgprune(
        "table2",
        "--out",
        str(tmp_path),
        "--targets",
        "75",
        "--algorithms",
        "erm,coral",
        "--pretrain-steps",
        "8",
        "--prune-steps",
        "35",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "results.json").read_text())
    # erm: dense + pruned(erm ft); coral: dense + pruned(erm ft) + pruned(coral ft)
    assert sorted((r["algorithm"], r["criterion"], r["finetune_algorithm"]) for r in records) == [
        ("coral", "none", None),
        ("coral", "taylor", "coral"),
        ("coral", "taylor", "erm"),
        ("erm", "none", None),
        ("erm", "taylor", "erm"),
    ]
    rows = [line.split("|")[1:-1] for line in (tmp_path / "table.md").read_text().splitlines()[2:]]
    labels = [(r[0].strip(), r[1].strip()) for r in rows]
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
    by = {(r["algorithm"], r["finetune_algorithm"]): r for r in records}
    coral_delta = 100 * (by[("coral", "coral")]["cross_acc"] - by[("coral", None)]["cross_acc"])
    assert float(rows[7][3]) == pytest.approx(coral_delta, abs=0.006)


def test_a_run_does_not_depend_on_what_ran_before_it(demo_out, tmp_path):
    """Target 45 alone gives the numbers it gave after target 0 in the demo (model init is seeded)."""
    alone = dgprune(
        "demo",
        "--out",
        str(tmp_path),
        "--targets",
        "45",
        "--pretrain-steps",
        "12",
        "--prune-steps",
        "45",
        "--device",
        "cpu",
        "--quiet",
    )
    assert alone.returncode == 0, alone.stderr
    by_variant = {
        (r["criterion"], r["keep_ratio"]): r for r in json.loads((tmp_path / "results.json").read_text())
    }
    after_other = [
        r for r in json.loads((demo_out / "results.json").read_text()) if r["target_domain"] == "45"
    ]
    assert len(after_other) == len(by_variant) == 5
    for r in after_other:
        other = by_variant[(r["criterion"], r["keep_ratio"])]
        assert (other["intra_acc"], other["cross_acc"]) == (r["intra_acc"], r["cross_acc"])
