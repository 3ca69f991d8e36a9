"""Issue 11.3-4: `--set KEY=VALUE` overrides (library and every running command), DomainBed's names
(algorithms, datasets, `--test-env` indices) resolved to dgprune's canonical names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from dgprune.algorithms import ALGORITHMS, algorithm_name, make_algorithm
from dgprune.data import dataset_name, load_dataset
from dgprune.errors import ConfigError, DataError
from dgprune.experiments.config import build_config, parse_set_overrides
from dgprune.experiments.demo import DEMO_SETTINGS, demo_base_config
from dgprune.experiments.pipeline import apply_test_env, target_of_test_env
from dgprune.experiments.sweep import expand_grid, load_sweep
from dgprune.models import build_model
from dgprune.names import canonical_name
from dgprune.training.settings import PretrainSettings, PruneSettings

# ---------------------------------------------------------------- --set: parsing and precedence


def test_set_items_parse_as_dotted_yaml() -> None:
    tree = parse_set_overrides(
        [
            "prune.lr=0.01",
            "pretrain.hparams.mmd_gamma=1",
            "prune.criterion_params.share=0.5",
            "data.options.angles=[0, 15]",
            "model.weights=null",
            "target=first=second",  # only the first '=' splits
            "prune.lr=0.02",  # a later item wins
        ]
    )
    assert tree == {
        "prune": {"lr": 0.02, "criterion_params": {"share": 0.5}},
        "pretrain": {"hparams": {"mmd_gamma": 1}},
        "data": {"options": {"angles": [0, 15]}},
        "model": {"weights": None},
        "target": "first=second",
    }


@pytest.mark.parametrize("item", ["prune.lr", "=1", "prune..lr=1", ".lr=1", "prune.=1"])
def test_set_without_key_or_equals_is_one_line_error(item: str) -> None:
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE") as err:
        parse_set_overrides([item])
    assert "\n" not in str(err.value) and repr(item) in str(err.value)


def test_set_precedence_file_then_set_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"pretrain": {"steps": 7, "lr": 0.5, "batch_size": 4}, "seed": 3}))
    cfg = build_config(
        path,
        overrides={"pretrain": {"steps": 2, "lr": None}},  # flags: None means "not given"
        sets=["pretrain.steps=3", "pretrain.lr=0.002", "prune.criterion_params.alpha=2"],
    )
    assert cfg.pretrain.steps == 2  # flag over --set over file
    assert cfg.pretrain.lr == 0.002  # --set over file
    assert cfg.pretrain.batch_size == 4 and cfg.seed == 3  # file over defaults
    assert cfg.prune.criterion_params["alpha"] == 2
    # Same values through the file give the same run: --set is only another way to say them.
    same = build_config(
        base={"pretrain": {"steps": 2, "lr": 0.002, "batch_size": 4}, "seed": 3},
        overrides={"prune": {"criterion_params": {"alpha": 2}}},
    )
    assert cfg.run_id() == same.run_id()


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["prune.lrr=0.1"], "prune.lrr: Extra inputs are not permitted"),
        (["prune.keep_ratio=1.5"], "prune.keep_ratio: Input should be less than or equal to 1"),
        (["data=pacs"], "--set: data: expected a mapping such as {name: pacs}"),
        (["prune.criterion_params.share=0.5"], "share (0.5) is used only with alpha_mode 'share'"),
        (["prune.lr=[1"], "--set 'prune.lr=[1': the value is not valid YAML"),
    ],
)
def test_set_validated_like_the_config(items: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match="--set") as err:
        build_config(sets=items)
    assert expected in str(err.value)


def test_set_null_clears_a_file_value(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("target: '30'\nmodel: {weights: /nowhere.safetensors}\n")
    cfg = build_config(path, sets=["model.weights=null", "target=45"])
    assert cfg.model.weights is None and cfg.target == "45"  # YAML's int 45 read as the domain "45"


def test_demo_base_is_preset_then_file_then_set_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump({"seed": 4, "prune": {"lr": 0.5, "interval": 5}}))
    cfg = demo_base_config(None, None, {"prune": {"steps": 9}}, path, ["prune.lr=0.05", "device=cpu"])
    assert cfg.seed == 4 and cfg.device == "cpu"  # not given as flags: the file's and --set's
    assert (cfg.prune.lr, cfg.prune.interval, cfg.prune.steps) == (0.05, 5, 9)
    assert cfg.pretrain.steps == DEMO_SETTINGS["pretrain"]["steps"]  # the preset stands elsewhere
    assert demo_base_config(1, "auto", None, path, None).seed == 1  # a flag wins over the file


def _sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": {"pretrain": {"steps": 2}, "device": "cpu"},
                "grid": {"target": ["0", "75"], "prune.criterion": ["taylor", "ior"]},
            }
        )
    )
    return path


def test_sweep_set_updates_base_and_refuses_grid_keys(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path)
    plain = load_sweep(path, tmp_path / "out")
    tuned = load_sweep(path, tmp_path / "out", sets=["prune.lr=0.01", "pretrain.algorithm=CORAL"])
    assert tuned.base["prune"] == {"lr": 0.01}
    assert tuned.base["pretrain"] == {"steps": 2, "algorithm": "CORAL"}
    configs = tuned.configs()
    assert len(configs) == 4 and all(c.prune.lr == 0.01 and c.pretrain.algorithm == "coral" for c in configs)
    assert set(tuned.run_ids()).isdisjoint(plain.run_ids())  # other settings, other runs
    for item in ("prune.criterion=l1", "target=30", "prune=null"):
        with pytest.raises(ConfigError, match=r"the grid of .* sets"):
            load_sweep(path, tmp_path / "out", sets=[item])


# ---------------------------------------------------------------- --set on the command line


def test_cli_pretrain_config_set_flags_test_env_and_domainbed_names(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"pretrain": {"steps": 7, "lr": 0.5, "batch_size": 4}, "device": "cpu"}))
    out = tmp_path / "pre"
    result = run_cli(
        "pretrain", "--out", str(out), "--config", str(config),
        "--set", "pretrain.steps=3", "--set", "pretrain.lr=0.002", "--set", "pretrain.eval_every=1",
        "--set", "data.name=RotatedDigits",
        "--steps", "2", "--algorithm", "ERM", "--test-env", "5", "-q",
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stored = json.loads((out / "run.json").read_text())
    cfg = stored["config"]
    assert (cfg["pretrain"]["steps"], cfg["pretrain"]["lr"], cfg["pretrain"]["batch_size"]) == (2, 0.002, 4)
    assert cfg["pretrain"]["algorithm"] == "erm" and cfg["data"]["name"] == "rotated_digits"
    assert cfg["target"] == "75"  # domain 5 of 0, 15, ..., 75
    expected = build_config(
        base={
            "pretrain": {"steps": 2, "lr": 0.002, "batch_size": 4, "eval_every": 1, "algorithm": "erm"},
            "target": "75",
        }
    )
    assert stored["run_id"] == expected.pretrain_id()  # DomainBed's spelling: the same run as dgprune's

    # evaluate and analyze take --set and --test-env too (here: another target than the model's).
    evaluated = run_cli(
        "evaluate", "--model", str(out), "--set", "data.name=ROTATED_DIGITS", "--set", "device=cpu",
        "--test-env", "0", timeout=120,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["target_domain"] == "0"
    report = tmp_path / "analysis.json"
    analyzed = run_cli(
        "analyze", "--model", str(out), "--set", "device=cpu", "--test-env", "1", "--channels", "2",
        "--batch-size", "4", "--out", str(report), "--set", "prune.criterion=learned_masks",
        "--set", "prune.criterion_params.mask_steps=5", timeout=120,
    )  # fmt: skip
    assert analyzed.returncode == 0, analyzed.stderr
    assert '"15"' in report.read_text()  # the target domain analysed: index 1 of 0, 15, ...


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["pretrain", "--out", "x", "--set", "prune.lr"], "--set expects KEY=VALUE"),
        (["pretrain", "--out", "x", "--set", "prune.lrr=1", "--target", "0"], "prune.lrr: Extra inputs"),
        (["prune", "--pretrained", "p", "--out", "x", "--set", "prune.keep_ratio=0"], "prune.keep_ratio"),
        (["pretrain", "--out", "x", "--set", "seed=x"], "seed: Input should be a valid integer"),
        (["demo", "--set", "prune.steps=0"], "prune.steps: Input should be greater than or equal to 1"),
        (["table2", "--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["demo", "--config", "bad.yaml"], "bad.yaml: invalid configuration"),
        (["pretrain", "--out", "x", "--test-env", "6"], "indices 0..5 (0: 0, 1: 15, 2: 30, 3: 45"),
        (["prune", "--pretrained", "p", "--out", "x", "--test-env", "0", "--target", "30"], "disagree"),
        (["pretrain", "--out", "x", "--target", "0", "--algorithm", "sgd"], "erm, coral, mixup, vrex"),
        (["pretrain", "--out", "x", "--target", "0", "--data", "PCAS"], "valid: colored_digits"),
    ],
)
def test_cli_set_and_name_errors(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "bad.yaml").write_text("prune: {lrr: 1}\n")
    result = run_cli(*args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


def test_cli_sweep_status_with_set(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path)
    result = run_cli("status", str(path), "--out", str(tmp_path / "s"), "--set", "prune.lr=0.01", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "6 runs" in result.stdout and "pending 6" in result.stdout  # 2 targets x (dense + 2 criteria)
    clash = run_cli("sweep", str(path), "--out", str(tmp_path / "s"), "--set", "target=30", timeout=120)
    assert clash.returncode == 2 and "--set target: the grid of" in clash.stderr


# ---------------------------------------------------------------- DomainBed's names


ALGORITHM_SPELLINGS = {"ERM": "erm", "CORAL": "coral", "Mixup": "mixup", "VREx": "vrex"} | {
    "GroupDRO": "groupdro", "IRM": "irm", "group_dro": "groupdro", "erm": "erm"
}  # fmt: skip
DATASET_SPELLINGS = {"RotatedMNIST": "rotated_mnist", "ColoredMNIST": "colored_mnist", "PACS": "pacs"} | {
    "OfficeHome": "office_home", "TerraIncognita": "terra_incognita", "DomainNet": "domain_net",
    "VLCS": "vlcs", "Rotated_Digits": "rotated_digits", "folder:/data/PACS": "folder:/data/PACS",
}  # fmt: skip


@pytest.mark.parametrize(("spelling", "canonical"), list(ALGORITHM_SPELLINGS.items()))
def test_algorithm_names(spelling: str, canonical: str) -> None:
    assert algorithm_name(spelling) == canonical
    assert PretrainSettings(algorithm=spelling).algorithm == canonical
    assert PruneSettings(finetune_algorithm=spelling).finetune_algorithm == canonical
    model = build_model("mnist_cnn", 10, in_channels=1)
    assert isinstance(make_algorithm(spelling, model, 2), ALGORITHMS[canonical])


@pytest.mark.parametrize(("spelling", "canonical"), list(DATASET_SPELLINGS.items()))
def test_dataset_names(spelling: str, canonical: str) -> None:
    assert dataset_name(spelling) == canonical
    assert build_config(base={"data": {"name": spelling}}).data.name == canonical


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown algorithm 'ermm'; valid: erm, coral, mixup, vrex"):
        algorithm_name("ermm")
    with pytest.raises(DataError, match=r"unknown dataset 'pacs2'; valid: .*office_home.*folder:/path"):
        load_dataset("pacs2")
    with pytest.raises(ConfigError, match=r"data\.name: .*unknown dataset 'Pacs_x'"):
        build_config(base={"data": {"name": "Pacs_x"}})
    assert canonical_name("ab", ["a_b", "ab_"]) is None  # ambiguous: no guess


def test_domainbed_spelling_gives_the_same_run_ids() -> None:
    def ids(algorithm: str, dataset: str, finetune: str) -> tuple[str, str]:
        cfg = build_config(
            base={
                "data": {"name": dataset},
                "pretrain": {"algorithm": algorithm},
                "prune": {"finetune_algorithm": finetune},
                "target": "0",
            }
        )
        return cfg.run_id(), cfg.pretrain_id()

    assert ids("ERM", "RotatedDigits", "CORAL") == ids("erm", "rotated_digits", "coral")
    assert ids("ERM", "RotatedDigits", "CORAL") != ids("coral", "rotated_digits", "coral")
    runs = expand_grid({"device": "cpu"}, [{"pretrain.algorithm": ["ERM", "erm", "Erm"], "target": "0"}])
    assert len(runs) == 1  # one run, however it is spelt


def test_test_env_is_an_index_in_domain_order() -> None:
    data = load_dataset("rotated_digits")
    assert [target_of_test_env(data, i) for i in range(6)] == data.domain_names == [
        "0", "15", "30", "45", "60", "75"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"--test-env -1 is out of range: .* indices 0\.\.5"):
        target_of_test_env(data, -1)
    cfg = build_config(base={"target": "15"})
    same, loaded = apply_test_env(cfg, None)
    assert same is cfg and loaded is None
    moved, loaded = apply_test_env(cfg, 2)  # the config file's target gives way to the flag
    assert moved.target == "30" and loaded is not None and loaded.domain_names == data.domain_names
    assert apply_test_env(cfg, 2, target="30")[0].target == "30"  # both given and agreeing
    with pytest.raises(ConfigError, match=r"--target 15 and --test-env 2 .*disagree"):
        apply_test_env(cfg, 2, target="15")
