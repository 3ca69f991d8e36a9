"""Python API and command-line edges (issue 19, point 6): loading a saved model from a str path as the
README shows, the weights file's mode, `export`'s one line, plain tables off a terminal, and -q on
every command that prints progress. DomainImportance.update's argument checks: test_tp_integration.py."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import typer
import yaml
from conftest import run_cli

from dgprune.errors import WeightsError
from dgprune.experiments.records import read_records
from dgprune.experiments.store import RunResult, RunSpec, Store
from dgprune.models import build_model
from dgprune.pruning.surgery import load_compressed

TINY = {
    "device": "cpu",
    "pretrain": {"steps": 5, "batch_size": 16, "eval_every": 5},
    "prune": {"steps": 10, "batch_size": 16, "interval": 2, "max_per_step": 100, "eval_every": 5},
}
UMASK = 0o027  # not the usual 022: the files must follow the umask, whatever it is
BOX_CHARACTERS = re.compile("[\u2500-\u259f]")  # box drawing and block elements


def ok(result) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A pretrained model of target 75 (quiet) and a pruned one (with progress), written under UMASK."""
    root = tmp_path_factory.mktemp("api_edges")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    previous = os.umask(UMASK)  # inherited by the commands
    try:
        result = run_cli("pretrain", "-c", "tiny.yaml", "--target", "75", "--out", "pre", "-q", cwd=root)
        ok(result)
        (root / "pretrain.out").write_text(json.dumps([result.stdout, result.stderr]))
        result = run_cli(
            "prune", "--config", "tiny.yaml", "--pretrained", "pre", "--out", "pruned", "--target", "75",
            "--keep-ratio", "0.5", "--criterion", "taylor", cwd=root,
        )  # fmt: skip
        ok(result)
        (root / "prune.out").write_text(json.dumps([result.stdout, result.stderr]))
    finally:
        os.umask(previous)
    return root


def test_quiet_pretrain_prints_its_result_line_only(work):
    stdout, stderr = json.loads((work / "pretrain.out").read_text())
    assert stderr == ""
    [line] = stdout.splitlines()
    assert line.startswith("target 75: intra ") and line.endswith("-> pre")
    _, stderr = json.loads((work / "prune.out").read_text())
    assert re.search(r"prune step 1/10 \|", stderr)  # without -q the same kind of command shows progress


def test_weights_file_has_the_mode_of_its_sibling_files(work):
    expected = 0o666 & ~UMASK
    for name in ("pre", "pruned"):
        modes = {
            file.name: stat.S_IMODE(file.stat().st_mode)
            for file in (work / name).iterdir()
            if file.is_file() and file.suffix in {".safetensors", ".json", ".yaml", ".jsonl"}
        }
        assert "model.safetensors" in modes and "structure.json" in modes
        assert modes == dict.fromkeys(modes, expected), (name, {k: oct(v) for k, v in modes.items()})


def test_readme_snippet_loads_the_pruned_model_and_predicts_as_evaluate(work, monkeypatch, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    [code] = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "load_compressed" in b]
    assert len(code.strip().splitlines()) <= 15
    monkeypatch.chdir(work)  # the snippet names the directory "pruned", as a str
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    # In float64: a float32 mean of ~300 images is off by up to ~1e-8, more than the tolerance below.
    accuracy = float((namespace["predicted"] == namespace["target"].labels).double().mean())
    assert re.fullmatch(r"accuracy on domain 75: \d+\.\d\d%\n", printed)
    assert not namespace["model"].training

    # Independently: the command line's evaluation of the same directory (target 75 is its cross domain).
    result = run_cli("evaluate", "--model", "pruned", cwd=work)
    ok(result)
    measured = json.loads(result.stdout)
    assert measured["target_domain"] == "75"
    assert accuracy == pytest.approx(measured["cross_acc"], abs=1e-9)
    record = json.loads((work / "pruned" / "metrics.json").read_text())
    assert accuracy == pytest.approx(record["cross_acc"], abs=1e-9)


def test_load_compressed_takes_a_str_or_a_path_alike(work):
    by_str, structure = load_compressed(str(work / "pruned"), build_model)
    by_path, same_structure = load_compressed(work / "pruned", build_model)
    assert structure == same_structure
    x = torch.randn(4, *structure["input_shape"])
    with torch.no_grad():
        assert torch.equal(by_str.eval()(x), by_path.eval()(x))
    with pytest.raises(WeightsError, match=r"nowhere/structure\.json: missing"):
        load_compressed(str(work / "nowhere"), build_model)


def test_export_prints_one_line(work, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
    result = run_cli("export", "--model", str(work / "pruned"), "--out", str(tmp_path / "m.onnx"))
    ok(result)
    assert result.stdout == f"wrote {tmp_path / 'm.onnx'}\n"
    assert result.stderr == ""  # none of torch.onnx's "[torch.onnx] ..." progress lines
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_report_tables_are_plain_ascii_markdown_off_a_terminal(work, tmp_path):
    """The commands' tables (rich) in a log or a pipe: a title line, then an aligned Markdown table,
    no box-drawing characters. `report` of a database holding the two runs the fixture made."""
    records = [read_records(work / name / "results.json")[0] for name in ("pre", "pruned")]
    with Store(tmp_path / "db.sqlite") as store:
        store.register((r.run_id, [RunSpec(r.run_id, r.run_id, kind, {}, {})]) for r, kind in
                       zip(records, ("dense", "pruned"), strict=True))  # fmt: skip
        for r in records:
            store.record_done(r.run_id, RunResult(r))
    result = run_cli(
        "report", "--db", str(tmp_path / "db.sqlite"), "--report-dir", str(tmp_path / "r"), "--no-plots",
        "--format", "md",
    )  # fmt: skip
    ok(result)
    assert not BOX_CHARACTERS.search(result.stdout), result.stdout
    lines = result.stdout.splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"\|[-|]+\|", line)]
    assert rules, result.stdout
    for i in rules:
        title, header, rule = lines[i - 2 : i + 1]
        assert title and not title.startswith("|")  # the title on a line of its own, flush left
        assert header.startswith("| ") and header.endswith(" |") and len(header) == len(rule)
        rows = [line for line in lines[i + 1 :] if line.startswith("|")][:1]
        assert rows and len(rows[0]) == len(rule)  # aligned columns
    assert all(line == line.rstrip() for line in lines)


# analyze trains learned_masks' logits for their 300 default steps; this test is not about them.
FEW_MASK_STEPS = ("--set", "prune.criterion=learned_masks", "--set", "prune.criterion_params.mask_steps=5")


def test_analyze_takes_quiet_and_then_prints_warnings_and_the_file_only(work):
    """--target 0, a domain the model trained on: the warning stays, the summary and table go."""
    result = run_cli(
        "analyze", "--model", "pre", "--target", "0", "--channels", "4", "--batch-size", "8", "--out",
        "q.json", "-q", *FEW_MASK_STEPS, cwd=work,
    )  # fmt: skip
    ok(result)
    assert re.fullmatch(
        r"warning: the model was trained with target '75' held out; target '0' was one of its training "
        r"domains\nanalysis: q\.json  \(\d+ s\)\n",
        result.stdout,
    ), result.stdout
    written = json.loads((work / "q.json").read_text())
    assert written["model_dir"] == "pre" and written["warnings"]  # the analysis itself, written in full


# The commands that print progress while they work, and those that print only their result.
PROGRESS_COMMANDS = {"demo", "table2", "pretrain", "prune", "analyze", "sweep"}
RESULT_COMMANDS = {"evaluate", "plot", "export", "config", "status", "report"}


def test_every_command_that_prints_progress_takes_quiet():
    from dgprune.cli import app

    command_group = typer.main.get_command(app)
    assert set(command_group.commands) == PROGRESS_COMMANDS | RESULT_COMMANDS  # a new command: classify it
    for name in PROGRESS_COMMANDS:
        options = {o for p in command_group.commands[name].params for o in p.opts}
        assert {"-q", "--quiet"} <= options, name
