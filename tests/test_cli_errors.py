"""Exit statuses and one-line errors of the installed `dgprune` script (issue 10, points 3-5).

0 done, 1 a run failed, 2 a usage or config error, 130 Ctrl-C; every error is one `error:` line
naming the file or option, never a traceback.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import save_file

from dgprune import cli
from dgprune.errors import ConfigError, RunFailedError, WeightsError
from dgprune.experiments.config import build_config
from dgprune.experiments.sweep import load_sweep
from dgprune.models import build_model
from dgprune.pruning.surgery import (
    STRUCTURE_FILE,
    WEIGHTS_FILE,
    load_compressed,
    remove_channels,
    save_compressed,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SHAPE = (1, 8, 8)  # the embedded rotated digits


def assert_one_error_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- point 4: usage errors, --version, dependencies -------------------------------------------


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"dgprune {importlib.metadata.version('dgprune')}\n"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["pretrain", "--out", "x", "--bogus"], ["--bogus", "--steps", "dgprune pretrain --help"]),
        (["prune", "--out", "x"], ["--pretrained"]),
        (["pretrain", "--out", "x", "--steps", "abc"], ["--steps", "integer"]),
        (["frobnicate"], ["frobnicate", "pretrain", "sweep"]),
    ],
)
def test_usage_errors_are_one_line_with_status_2(args, fragments):
    assert_one_error_line(run_cli(*args), 2, *fragments)


def test_every_imported_package_is_a_declared_dependency():
    """`import click` with click only there by accident of typer's version broke every usage error."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    declared = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for source in (ROOT / "src" / "dgprune").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "dgprune":
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not dists & declared:
                    undeclared[top] = source.relative_to(ROOT)
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


# -- point 4: damaged model directories ----------------------------------------------------------


def _model_dir(directory: Path, num_classes: int = 10) -> Path:
    spec = {"name": "mnist_cnn", "num_classes": num_classes, "in_channels": 1, "small_input": False}
    save_compressed(directory, build_model(**spec), {}, spec, DIGITS_SHAPE)
    return directory


def _edit_structure(directory: Path, **changes) -> None:
    path = directory / STRUCTURE_FILE
    structure = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "build" and isinstance(value, dict):  # change some build arguments
            structure["build"].update(value)
        else:
            structure[key] = value
    path.write_text(json.dumps(structure))


def _truncate_weights(d: Path) -> None:
    data = (d / WEIGHTS_FILE).read_bytes()
    (d / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _wrong_shapes(d: Path) -> None:
    spec = {"name": "mnist_cnn", "num_classes": 7, "in_channels": 1}
    save_file(build_model(**spec).state_dict(), str(d / WEIGHTS_FILE))


@pytest.mark.parametrize(
    "damage, file, fragments",
    [
        (lambda d: (d / WEIGHTS_FILE).unlink(), WEIGHTS_FILE, ["missing"]),
        (_truncate_weights, WEIGHTS_FILE, ["not a readable safetensors file"]),
        (lambda d: (d / STRUCTURE_FILE).write_text('{"build": '), STRUCTURE_FILE, ["not valid JSON"]),
        (lambda d: (d / STRUCTURE_FILE).write_text("[1, 2]"), STRUCTURE_FILE, ["expected a JSON object"]),
        (lambda d: _edit_structure(d, build="resnet18"), STRUCTURE_FILE, ["build", "expected an object"]),
        (
            lambda d: _edit_structure(d, build={"weights": "/somewhere/else.pt"}),
            STRUCTURE_FILE,
            ["unknown key(s) weights", "name, num_classes, in_channels, small_input"],
        ),
        (lambda d: _edit_structure(d, build={"num_classes": "10"}), STRUCTURE_FILE, ["build.num_classes"]),
        (lambda d: _edit_structure(d, build={"name": "vgg"}), STRUCTURE_FILE, ["unknown model 'vgg'"]),
        (
            lambda d: _edit_structure(d, pruned_channels={"conv2": [3, 128]}),
            STRUCTURE_FILE,
            ["conv2", "index 128 is out of range", "128 channels"],
        ),
        (
            lambda d: _edit_structure(d, pruned_channels={"conv2": [-1]}),
            STRUCTURE_FILE,
            ["conv2", "index -1 is out of range"],
        ),
        (lambda d: _edit_structure(d, pruned_channels={"fc": [0]}), STRUCTURE_FILE, ["'fc' is not a conv"]),
        (lambda d: _edit_structure(d, pruned_channels={"conv2": [1, 1]}), STRUCTURE_FILE, ["twice"]),
        (_wrong_shapes, WEIGHTS_FILE, ["fc.weight has shape (7, 128)", "(10, 128)"]),
    ],
)
def test_a_damaged_model_directory_raises_weights_error_naming_the_file(tmp_path, damage, file, fragments):
    directory = _model_dir(tmp_path / "model")
    damage(directory)
    with pytest.raises(WeightsError) as caught:
        load_compressed(directory, build_model)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(directory / file)), message
    for fragment in fragments:
        assert fragment in message, message


def test_a_valid_pruned_model_directory_still_loads_its_weights(tmp_path):
    spec = {"name": "mnist_cnn", "num_classes": 10, "in_channels": 1, "small_input": False}
    model = build_model(**spec)
    pruned = {"conv2": [0, 5, 127], "conv3": [1]}
    remove_channels(model, pruned, torch.zeros(1, *DIGITS_SHAPE))
    save_compressed(tmp_path, model, pruned, spec, DIGITS_SHAPE)
    reloaded, _ = load_compressed(tmp_path, build_model)
    assert reloaded.conv2.out_channels == 125 and reloaded.conv3.out_channels == 127
    expected, got = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_cli_on_a_damaged_model_directory_is_one_line(tmp_path):
    directory = _model_dir(tmp_path / "model")
    _truncate_weights(directory)
    result = run_cli("export", "--model", str(directory), "--out", str(tmp_path / "m.onnx"))
    assert_one_error_line(result, 2, str(directory / WEIGHTS_FILE), "not a readable safetensors file")


def test_cli_on_a_missing_model_directory_is_one_line(tmp_path):
    result = run_cli("export", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.onnx"))
    assert_one_error_line(result, 2, str(tmp_path / "nothing"), "no such model directory")


def test_config_out_a_directory_is_one_line(tmp_path):
    assert_one_error_line(run_cli("config", "--out", str(tmp_path)), 2, str(tmp_path), "Is a directory")


# -- point 4: the results database ---------------------------------------------------------------


def _sweep_file(directory: Path, **base) -> Path:
    path = directory / "s.yaml"
    spec = {
        "base": {"model": {"name": "mnist_cnn"}, "device": "cpu", **base},
        "grid": {"target": "0", "prune.criterion": "taylor"},
        "sweep": {"db": "results.sqlite"},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_on_a_directory_as_database_is_one_line(tmp_path):
    out = tmp_path / "sweep"
    (out / "results.sqlite").mkdir(parents=True)
    result = run_cli("sweep", str(_sweep_file(tmp_path)), "--out", str(out), "--workers", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        f"error: results database {out / 'results.sqlite'}: cannot open: it is a directory"
    ]


def test_report_on_a_file_that_is_not_a_database_is_one_line(tmp_path):
    db = tmp_path / "results.sqlite"
    db.write_bytes(b"this is not a database, " * 100)
    assert_one_error_line(run_cli("report", "--db", str(db)), 2, f"results database {db}", "not a database")


def test_a_read_only_database_is_one_line(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    db = out / "results.sqlite"
    sqlite3.connect(db).close()
    script = (
        "import sys\n"
        "from dgprune.cli import main\n"
        "import sqlite3\n"
        "real = sqlite3.connect\n"  # root ignores file modes: open the database read-only instead
        "sqlite3.connect = lambda path, **kw: real(f'file:{path}?mode=ro', uri=True, **kw)\n"
        f"sys.argv = ['dgprune', 'status', {str(_sweep_file(tmp_path))!r}, '--out', {str(out)!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert_one_error_line(result, 2, f"results database {db}", "readonly")


# -- point 3: exit statuses ----------------------------------------------------------------------


def test_sweep_exits_1_when_a_run_failed(tmp_path):
    bad_weights = tmp_path / "weights.safetensors"
    bad_weights.write_bytes(b"\x00" * 64)  # a file that is not safetensors: the run fails when it starts
    config = _sweep_file(
        tmp_path,
        model={"name": "mnist_cnn", "weights": str(bad_weights)},
        pretrain={"steps": 2, "eval_every": 1, "batch_size": 4},
        prune={"steps": 2, "interval": 1, "batch_size": 4, "eval_every": 1},
    )
    result = run_cli("sweep", str(config), "--out", str(tmp_path / "sw"), "--workers", "1", "-q", timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "failed 2" in result.stdout  # the dense model and its pruning run


@pytest.mark.parametrize(
    "raised, code, line",
    [
        (RunFailedError("pretrain diverged at step 7"), 1, "error: pretrain diverged at step 7"),
        (ConfigError("run.yaml: bad"), 2, "error: run.yaml: bad"),
        (
            PermissionError(13, "Permission denied", "/out/model.safetensors"),
            1,
            "error: /out/model.safetensors: ",
        ),
        (KeyboardInterrupt(), 130, "interrupted: "),
    ],
)
def test_main_maps_errors_to_one_line_and_an_exit_status(monkeypatch, capsys, raised, code, line):
    def command(**kwargs):
        raise raised

    monkeypatch.setattr(cli, "app", command)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == code
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(line), err


def test_ctrl_c_exits_130_and_says_where_the_checkpoint_is(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"pretrain": {"steps": 2000, "eval_every": 5, "batch_size": 8}}))
    out = tmp_path / "pre"
    script = Path(sys.executable).parent / "dgprune"
    args = [str(script), "pretrain", "--config", str(config), "--target", "0", "--device", "cpu"]
    process = subprocess.Popen(
        [*args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as in a terminal: a shell running tests in the background may have SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(240, process.kill)
    watchdog.start()
    try:
        first = process.stderr.readline()  # the first progress line: training is under way
        assert "pretrain step" in first, first
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=120)
    finally:
        watchdog.cancel()
    assert process.returncode == 130, first + rest
    assert "Traceback" not in rest
    lines = [line for line in rest.splitlines() if "pretrain step" not in line]
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), rest
    assert str(out / "checkpoint.pt") in lines[0]
    assert "run the same command" in lines[0] or "same command starts it again" in lines[0]


# -- point 5: config sections of the wrong type --------------------------------------------------


@pytest.mark.parametrize(
    "section, value, expected",
    [
        ("data", "pacs", "data: expected a mapping such as {name: pacs}, got the string 'pacs'"),
        (
            "model",
            "resnet18",
            "model: expected a mapping such as {name: resnet18}, got the string 'resnet18'",
        ),
        (
            "prune",
            0.5,
            "prune: expected a mapping such as {criterion: taylor, keep_ratio: 0.5}, got the number",
        ),
        (
            "pretrain",
            ["erm"],
            "pretrain: expected a mapping such as {algorithm: erm, steps: 5000}, got a list",
        ),
        ("data", {"name": "pacs", "options": "/data"}, "data.options: expected a mapping"),
    ],
)
def test_a_section_of_the_wrong_type_is_an_error(tmp_path, section, value, expected):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({section: value}))
    with pytest.raises(ConfigError) as caught:
        build_config(path, {"data": {"name": None, "options": {}}})  # as the CLI calls it
    assert str(caught.value).startswith(f"{path}: {expected}"), caught.value


def test_cli_rejects_a_string_for_the_data_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: pacs\n")
    result = run_cli("pretrain", "--config", str(path), "--target", "0", "--out", str(tmp_path / "pre"))
    assert_one_error_line(result, 2, f"{path}: data: expected a mapping such as {{name: pacs}}")
    assert not (tmp_path / "pre").exists()


def test_a_sweep_base_section_of_the_wrong_type_is_an_error(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": {"model": "resnet18"}, "grid": {"model.small_input": [True]}}))
    with pytest.raises(
        ConfigError, match=r"s\.yaml: base: model: expected a mapping such as \{name: resnet18\}"
    ):
        load_sweep(path)
