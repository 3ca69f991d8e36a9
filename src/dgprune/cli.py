"""Command line: a thin layer over dgprune's library. Every command is one call into it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from dgprune import __version__
from dgprune.cli_sweep import register as register_sweep_commands
from dgprune.errors import ConfigError, DgpruneError
from dgprune.experiments.config import RunConfig, build_config, dump_config
from dgprune.experiments.demo import DEMO_CRITERIA, DEMO_KEEP_RATIOS, TABLE2_ALGORITHMS, run_demo, run_table2
from dgprune.experiments.pipeline import (
    apply_test_env,
    load_model_dir,
    make_context,
    model_dir_config,
    run_pretrain,
    run_prune,
)
from dgprune.experiments.records import write_records
from dgprune.pruning.criteria import CRITERIA
from dgprune.pruning.surgery import STRUCTURE_FILE, export_onnx
from dgprune.report.table1 import Table, table1
from dgprune.report.table2 import table2 as table2_report
from dgprune.training.checkpoint import CHECKPOINT_FILE
from dgprune.training.evaluation import evaluate
from dgprune.training.history import require_tensorboard
from dgprune.training.progress import ProgressCallback, ProgressFrontEnd, progress_front_end

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Domain-generalized filter pruning: Taylor-FO and IoR criteria, leave-one-domain-out evaluation.",
)
# Paper-style tables are wide: do not wrap them to 80 columns when output is not a terminal.
console = Console() if sys.stdout.isatty() else Console(width=240)


def _print_version(value: bool) -> None:
    if value:
        print(f"dgprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Domain-generalized filter pruning: Taylor-FO and IoR criteria, leave-one-domain-out evaluation."""
    ctx.call_on_close(_stop_progress)  # progress bars end with the command, whatever way it ends


# What `main` prints after "interrupted:" on Ctrl-C; a command that can resume sets it when it starts.
_interrupt_note: list[Callable[[], str]] = [
    lambda: "stopped; finished work is kept, run the same command again to go on"
]


def _on_interrupt(note: Callable[[], str]) -> None:
    _interrupt_note[0] = note


def _stage_note(stage: str, out: Path) -> Callable[[], str]:
    """Where an interrupted pretrain/prune stage left its checkpoint."""

    def note() -> str:
        path = out / CHECKPOINT_FILE
        if path.is_file():
            return f"{stage} stopped; checkpoint {path}; run the same command again to resume from it"
        return f"{stage} stopped before its first checkpoint ({path}); the same command starts it again"

    return note


def _grid_note(out: Path) -> Callable[[], str]:
    """Finished models of a demo/table2 grid stay in ``out``; the running stage's checkpoint too."""

    def note() -> str:
        found = sorted(out.rglob(CHECKPOINT_FILE), key=lambda p: p.stat().st_mtime) if out.is_dir() else []
        where = f"checkpoint {found[-1]}" if found else "no checkpoint of the running stage yet"
        return f"finished models are kept in {out}, {where}; run the same command again to resume"

    return note


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML/TOML file of settings (see `dgprune config`).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Any setting of `dgprune config` by its dotted key, the value read as YAML; repeat for "
        "several: e.g. --set prune.lr=0.01 --set pretrain.hparams.mmd_gamma=1. Validated as the config "
        "file; wins over --config, loses to the dedicated flags.",
    ),
]
TargetOpt = Annotated[str | None, typer.Option(help="Unseen target domain; the others are the sources.")]
TestEnvOpt = Annotated[
    int | None,
    typer.Option(
        "--test-env",
        help="The target by its index in the dataset's domain order (DomainBed's --test_envs), "
        "instead of --target.",
    ),
]
SeedOpt = Annotated[int | None, typer.Option(help="Training seed (split, batches, init).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda or auto (cuda when present).")]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="No progress (bars on a terminal, else a line every 25 steps and evaluation)."
    ),
]
TensorBoardOpt = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        metavar="DIR",
        help="Also log the training curves (loss, per-domain risks, val accuracy, filters alive) as "
        "TensorBoard scalars under DIR, one run per model directory. Needs the tensorboard extra.",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace the results, checkpoint and model of another run in --out (by default --out is "
        "reused only by the same run, and another run is refused).",
    ),
]
DataOpt = Annotated[
    str | None, typer.Option("--data", help="Dataset: rotated_digits, rotated_mnist, pacs, folder:/path, ...")
]
DataRootOpt = Annotated[Path | None, typer.Option(help="Folder holding the dataset (see docs/datasets.md).")]
ImageSizeOpt = Annotated[int | None, typer.Option(help="Working image size of image datasets (paper: 224).")]
DownloadOpt = Annotated[bool, typer.Option("--download", help="MNIST-type only: download missing files.")]
SkipBadOpt = Annotated[
    bool, typer.Option("--skip-bad-images", help="Skip unreadable images with a warning instead of failing.")
]


def _data_overrides(
    data: str | None, root: Path | None, image_size: int | None, download: bool, skip_bad: bool
) -> dict[str, Any]:
    """Only the flags actually given, so a config file's values stand otherwise."""
    options = {
        "root": str(root) if root else None,
        "image_size": image_size,
        "download": True if download else None,
        "skip_bad_images": True if skip_bad else None,
    }
    return {"name": data, "options": {k: v for k, v in options.items() if v is not None}}


# The command's progress display (bars on a terminal, plain lines otherwise), started at its first stage.
_front_end: list[ProgressFrontEnd] = []


def _progress(quiet: bool, prefix: str = "") -> ProgressCallback | None:
    if quiet:
        return None
    if not _front_end:
        _front_end.append(progress_front_end().__enter__())
    return _front_end[0].callback(prefix)


def _stop_progress() -> None:
    while _front_end:
        _front_end.pop().__exit__(None, None, None)


def _tensorboard(folder: Path | None) -> Path | None:
    """--tensorboard: checked before any work (the package is an optional extra)."""
    if folder is not None:
        require_tensorboard()
    return folder


def _tensorboard_run(folder: Path | None, out: Path) -> Path | None:
    """A pretrain/prune command's TensorBoard run: named after its --out directory."""
    return _tensorboard(folder) / out.resolve().name if folder is not None else None


def _saved_model_config(
    model_dir: Path,
    config: Path | None,
    set_values: list[str] | None,
    target: str | None,
    test_env: int | None,
    seed: int | None,
    device: str | None,
    data_flags: dict[str, Any],
):
    """The data, target and split a saved model was trained with, unless flags, --set or --config
    say otherwise (``evaluate`` and ``analyze``); also the dataset when --test-env loaded it."""
    flags = {"target": target, "seed": seed, "device": device, "data": data_flags}
    cfg = model_dir_config(model_dir, config, flags, set_values)
    return apply_test_env(cfg, test_env, target)


def _print_table(table: Table, title: str) -> None:
    rich_table = RichTable(title=title, box=box.SIMPLE_HEAVY)
    for column in table.header:
        rich_table.add_column(column, justify="left" if column == "Model" else "right")
    for row in table.rows:
        rich_table.add_row(*row)
    console.print(rich_table)


def _criterion_params(items: list[str] | None) -> dict[str, Any] | None:
    """``--criterion-param KEY=VALUE`` flags as a mapping (numbers and booleans read as JSON, else text)."""
    if not items:
        return None
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--criterion-param expects KEY=VALUE (e.g. alpha=2), got {item!r}")
        try:
            params[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            params[key.strip()] = text
    return params


def _config(path: Path | None, sets: list[str] | None = None, **overrides: Any) -> RunConfig:
    """Defaults <- ``path`` <- ``--set`` items <- the flags in ``overrides`` (``section__field=value``)."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            nested.setdefault(section, {})[field] = value
        else:
            nested[section] = value
    return build_config(path, nested, sets=sets)


TargetsOpt = Annotated[
    str | None, typer.Option(help="Comma-separated target domains (default: every domain).")
]
PresetSeedOpt = Annotated[int | None, typer.Option(help="Training seed (default: the config's, else 0).")]
PresetDeviceOpt = Annotated[
    str | None, typer.Option(help="cpu, cuda or auto (default: the config's, else auto).")
]
PresetConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML/TOML file of settings on top of the preset's (the grid's targets, algorithms, "
        "criteria and keep ratios come from this command's options).",
    ),
]
PretrainStepsOpt = Annotated[int | None, typer.Option(help="Override the preset's pretraining steps.")]
PruneStepsOpt = Annotated[int | None, typer.Option(help="Override the preset's fine-tuning steps.")]


def _preset_args(targets: str | None, pretrain_steps: int | None, prune_steps: int | None):
    overrides: dict[str, Any] = {}
    if pretrain_steps:
        overrides["pretrain"] = {"steps": pretrain_steps, "eval_every": max(1, pretrain_steps // 4)}
    if prune_steps:
        overrides["prune"] = {"steps": prune_steps}
    target_list = [t.strip() for t in targets.split(",")] if targets else None
    return target_list, overrides


def _write_table(out: Path, table: Table, title: str) -> None:
    (out / "table.md").write_text(table.to_markdown() + "\n")
    _print_table(table, title)
    console.print(f"results: {out / 'results.json'}  table: {out / 'table.md'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for results.json, table.md and the models.")] = Path(
        "demo-out"
    ),
    targets: TargetsOpt = None,
    seed: PresetSeedOpt = None,
    device: PresetDeviceOpt = None,
    pretrain_steps: PretrainStepsOpt = None,
    prune_steps: PruneStepsOpt = None,
    config: PresetConfigOpt = None,
    set_values: SetOpt = None,
    tensorboard: TensorBoardOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the default experiment (paper Table 1, in small) on the embedded rotated digits.

    Pretrains MNIST_CNN once per target domain, prunes it with Taylor-FO and with IoR to keep 50%
    and 30% of its filters, compresses the selected models and prints the table. Re-running with
    the same --out resumes: finished models are not recomputed.
    """
    _on_interrupt(_grid_note(out))
    target_list, overrides = _preset_args(targets, pretrain_steps, prune_steps)
    records = run_demo(
        out,
        target_list,
        DEMO_KEEP_RATIOS,
        DEMO_CRITERIA,
        seed,
        device,
        overrides,
        progress_for=lambda label: _progress(quiet, label),
        tensorboard=_tensorboard(tensorboard),
        config_path=config,
        sets=set_values,
    )
    first = records[0]
    _write_table(
        out, table1(records), f"{first.model} on {first.dataset}: top-1 accuracy (%), seed {first.seed}"
    )


@app.command()
def table2(
    out: Annotated[Path, typer.Option(help="Directory for results.json, table.md and the models.")] = Path(
        "table2-out"
    ),
    targets: TargetsOpt = None,
    algorithms: Annotated[str, typer.Option(help="Comma-separated pretraining algorithms.")] = ",".join(
        TABLE2_ALGORITHMS
    ),
    keep_ratio: Annotated[float, typer.Option(help="Share of filters kept (paper: 0.5).")] = 0.5,
    criterion: Annotated[str, typer.Option(help="Pruning criterion (paper: taylor).")] = "taylor",
    seed: PresetSeedOpt = None,
    device: PresetDeviceOpt = None,
    pretrain_steps: PretrainStepsOpt = None,
    prune_steps: PruneStepsOpt = None,
    config: PresetConfigOpt = None,
    set_values: SetOpt = None,
    tensorboard: TensorBoardOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Reproduce the layout of the paper's Table 2 on the embedded rotated digits.

    Pretrains with each algorithm (ERM, CORAL, Mixup), prunes to --keep-ratio with ERM fine-tuning
    (as the paper) and with the algorithm's own objective (the paper's Q3 conjecture), and prints
    dense / pruned / Δ rows per algorithm. Resumable like `demo`.
    """
    _on_interrupt(_grid_note(out))
    target_list, overrides = _preset_args(targets, pretrain_steps, prune_steps)
    algorithm_list = tuple(a.strip() for a in algorithms.split(","))
    records = run_table2(
        out,
        target_list,
        algorithm_list,
        keep_ratio,
        criterion,
        seed,
        device,
        overrides,
        progress_for=lambda label: _progress(quiet, label),
        tensorboard=_tensorboard(tensorboard),
        config_path=config,
        sets=set_values,
    )
    first = records[0]
    title = f"{first.model} on {first.dataset}: top-1 accuracy (%), seed {first.seed}"
    _write_table(out, table2_report(records), title)


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    config: ConfigOpt = None,
    set_values: SetOpt = None,
    target: TargetOpt = None,
    test_env: TestEnvOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    image_size: ImageSizeOpt = None,
    download: DownloadOpt = False,
    skip_bad_images: SkipBadOpt = False,
    model: Annotated[str | None, typer.Option(help="resnet18, resnet50 or mnist_cnn.")] = None,
    algorithm: Annotated[
        str | None, typer.Option(help="Pretraining algorithm: erm, coral, mixup, vrex, groupdro or irm.")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Initial weights file (e.g. ImageNet).")] = None,
    steps: Annotated[int | None, typer.Option(help="Pretraining steps.")] = None,
    overwrite: OverwriteOpt = False,
    tensorboard: TensorBoardOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain on the source domains with a DG algorithm; keep the best intra-domain val checkpoint."""
    _on_interrupt(_stage_note("pretraining", out))
    cfg = _config(
        config,
        set_values,
        target=target,
        seed=seed,
        device=device,
        data=_data_overrides(data, data_root, image_size, download, skip_bad_images),
        model__name=model,
        pretrain__algorithm=algorithm,
        model__weights=str(weights) if weights else None,
        pretrain__steps=steps,
    )
    cfg, dataset = apply_test_env(cfg, test_env, target)
    tensorboard_dir = _tensorboard_run(tensorboard, out)
    ctx = make_context(cfg, dataset)
    record = run_pretrain(ctx, out, _progress(quiet), overwrite=overwrite, tensorboard_dir=tensorboard_dir)
    write_records(out / "results.json", [record])
    _print_record(record)


@app.command()
def prune(
    pretrained: Annotated[Path, typer.Option(help="Model directory written by `dgprune pretrain`.")],
    out: Annotated[Path, typer.Option(help="Directory for the compressed model.")],
    config: ConfigOpt = None,
    set_values: SetOpt = None,
    target: TargetOpt = None,
    test_env: TestEnvOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    image_size: ImageSizeOpt = None,
    download: DownloadOpt = False,
    skip_bad_images: SkipBadOpt = False,
    criterion: Annotated[
        str | None,
        typer.Option(help=f"One of {', '.join(CRITERIA)} (see docs/criteria.md; oracle: small models)."),
    ] = None,
    keep_ratio: Annotated[
        float | None, typer.Option(help="Share of prunable filters kept, in (0, 1].")
    ] = None,
    criterion_param: Annotated[
        list[str] | None,
        typer.Option(
            "--criterion-param",
            metavar="KEY=VALUE",
            help="A parameter of the criterion as KEY=VALUE; repeat the flag for several: e.g. alpha=2 "
            "(IoR's weight), or alpha_mode=share and share=0.5 (see docs/criteria.md).",
        ),
    ] = None,
    bn_mode: Annotated[
        str | None,
        typer.Option(help="per_domain (default: BatchNorm per source) or mixed (one batch of all sources)."),
    ] = None,
    scope: Annotated[
        str | None, typer.Option(help="all (also residual-coupled channels) or internal.")
    ] = None,
    finetune_algorithm: Annotated[
        str | None,
        typer.Option(help="Objective while pruning + fine-tuning (default erm, as the paper)."),
    ] = None,
    round_to: Annotated[
        int | None,
        typer.Option(help="Round every layer's final width to a multiple of this (8: faster kernels)."),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Fine-tuning steps in all.")] = None,
    overwrite: OverwriteOpt = False,
    tensorboard: TensorBoardOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Prune + fine-tune a pretrained model, compress the selected checkpoint, evaluate it."""
    _on_interrupt(_stage_note("pruning", out))
    cfg = _config(
        config,
        set_values,
        target=target,
        seed=seed,
        device=device,
        data=_data_overrides(data, data_root, image_size, download, skip_bad_images),
        prune__criterion=criterion,
        prune__keep_ratio=keep_ratio,
        prune__criterion_params=_criterion_params(criterion_param),
        prune__bn_mode=bn_mode,
        prune__scope=scope,
        prune__finetune_algorithm=finetune_algorithm,
        prune__round_to=round_to,
        prune__steps=steps,
    )
    cfg, dataset = apply_test_env(cfg, test_env, target)
    tensorboard_dir = _tensorboard_run(tensorboard, out)
    ctx = make_context(cfg, dataset)
    record = run_prune(
        ctx, pretrained, out, _progress(quiet), overwrite=overwrite, tensorboard_dir=tensorboard_dir
    )
    write_records(out / "results.json", [record])
    _print_record(record)


@app.command("evaluate")
def evaluate_cmd(
    model_dir: Annotated[Path, typer.Option("--model", help="A dgprune model directory.")],
    config: ConfigOpt = None,
    set_values: SetOpt = None,
    target: TargetOpt = None,
    test_env: TestEnvOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    image_size: ImageSizeOpt = None,
    download: DownloadOpt = False,
    skip_bad_images: SkipBadOpt = False,
    latency_batch: Annotated[
        int,
        typer.Option(min=1, help="Also time forward passes of this batch size (batch 1 is always timed)."),
    ] = 1,
) -> None:
    """Intra-, cross- and per-domain accuracy of a saved (dense or compressed) model, its parameters,
    MACs (batch 1) and measured latency (median of 20 eval-mode forwards, in ms), as JSON.

    Settings not given by flags or --config (target, data, seed) come from the model directory's
    run.json (or config.yaml).
    """
    from dgprune.experiments.sweep import measure_latency_ms
    from dgprune.pruning.surgery import model_cost

    data_flags = _data_overrides(data, data_root, image_size, download, skip_bad_images)
    cfg, dataset = _saved_model_config(
        model_dir, config, set_values, target, test_env, seed, device, data_flags
    )
    ctx = make_context(cfg, dataset)
    model = ctx.load_model_dir(model_dir)
    acc = evaluate(model, ctx.split, ctx.device)
    cost = model_cost(model, ctx.example_input)
    # Times depend on the machine and its load: compare models measured in the same conditions.
    example = ctx.example_input
    latency = {
        f"batch_{b}": measure_latency_ms(model, example.expand(b, *example.shape[1:]))
        for b in sorted({1, latency_batch})
    }
    print(
        json.dumps(
            {
                "target_domain": acc.target_name,
                "intra_acc": acc.intra,
                "cross_acc": acc.cross,
                "worst_source_acc": acc.worst_source,
                "per_domain_acc": acc.per_domain,
                "params": cost.params,
                "macs": cost.macs,
                "latency_ms": latency,
                "latency_device": str(ctx.device),
                "latency_threads": torch.get_num_threads(),
            },
            indent=1,
        )
    )


@app.command("analyze")
def analyze_cmd(
    model_dir: Annotated[Path, typer.Option("--model", help="A dgprune model directory (dense or pruned).")],
    config: ConfigOpt = None,
    set_values: SetOpt = None,
    target: TargetOpt = None,
    test_env: TestEnvOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    image_size: ImageSizeOpt = None,
    download: DownloadOpt = False,
    skip_bad_images: SkipBadOpt = False,
    channels: Annotated[
        int | None,
        typer.Option(help="Analyse a seeded sample of at most K channels (default: all <= 512, else 256)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per domain in the fixed batches.")] = 64,
    out: Annotated[Path, typer.Option(help="JSON file to write.")] = Path("analysis.json"),
) -> None:
    """Does any source signal predict out-of-distribution importance? Measures, per channel, how much
    the target risk rises when it is removed (the target oracle) and compares every criterion and
    source-oracle signal with it (Spearman, lowest-k overlap). The target is used for analysis only.

    Settings not given by flags or --config come from the model directory's run.json.
    """
    from dgprune.experiments import analysis

    data_flags = _data_overrides(data, data_root, image_size, download, skip_bad_images)
    cfg, _ = _saved_model_config(model_dir, config, set_values, target, test_env, seed, device, data_flags)
    report = analysis.analyze_model(model_dir, cfg, channels, batch_size)
    for line in analysis.summary_lines(report):
        console.print(line, markup=False, highlight=False)
    title = "Out-of-distribution importance: agreement with the target oracle"
    rich_table = RichTable(title=title, box=box.SIMPLE_HEAVY)
    for column in analysis.TABLE_HEADER:
        rich_table.add_column(column, justify="left" if column == "signal" else "right")
    for row in analysis.table_rows(report.result):
        rich_table.add_row(*row)
    console.print(rich_table)
    analysis.write_report(report, out)
    console.print(f"analysis: {out}  ({report.wall_time_s:.0f} s)", markup=False, highlight=False)


@app.command("plot")
def plot_cmd(
    model_dir: Annotated[Path, typer.Option("--model", help="A model directory with a history.jsonl.")],
    out: Annotated[Path | None, typer.Option(help="PNG file to write (default: DIR/curves.png).")] = None,
) -> None:
    """Plot a run's training curves from its history.jsonl: loss (and per-domain risks), validation
    accuracy and filters alive against the step."""
    from dgprune.report.curves import plot_model_dir  # matplotlib: only for this command

    console.print(f"wrote {plot_model_dir(model_dir, out)}", markup=False, highlight=False)


@app.command("export")
def export_cmd(
    model_dir: Annotated[Path, typer.Option("--model", help="A dgprune model directory.")],
    out: Annotated[Path, typer.Option(help="ONNX file to write.")],
) -> None:
    """Export a saved (dense or compressed) model to ONNX (dynamic batch size)."""
    model = load_model_dir(model_dir)
    shape = json.loads((model_dir / STRUCTURE_FILE).read_text())["input_shape"]
    if not shape:
        raise ConfigError(f"{model_dir / STRUCTURE_FILE}: no input_shape recorded: cannot trace the model")
    console.print(f"wrote {export_onnx(model, out, torch.zeros(1, *shape))}")


@app.command("config")
def config_cmd(
    out: Annotated[Path | None, typer.Option(help="Write here instead of printing.")] = None,
) -> None:
    """Print (or write) every setting with its default, as YAML: a starting point for --config."""
    text = dump_config(RunConfig())
    if out:
        try:
            out.write_text(text)
        except OSError as err:
            raise ConfigError(f"--out {out}: cannot write the config there: {err.strerror}") from None
    else:
        print(text, end="")


def _print_record(record) -> None:
    console.print(
        f"target {record.target_domain}: intra {100 * record.intra_acc:.2f}%"
        f"  cross {100 * record.cross_acc:.2f}%"
        f"  filters {record.filters_kept}/{record.filters_total}  params {record.params:,}"
        f"  MACs {record.macs:,}  -> {record.model_dir}"
    )


register_sweep_commands(app)


def main() -> None:
    """Entry point. Exit status: 0 done, 1 a run failed, 2 a usage or config error, 130 Ctrl-C.

    Every error a user can fix is one line starting with ``error:`` (no traceback).
    """
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:
        code = 130
    except DgpruneError as err:
        _fail(str(err), getattr(err, "exit_code", 2))
    except typer.Exit as done:  # raised through by some typer versions; returned by others
        code = done.exit_code
    except typer.Abort as abort:  # older typer (click's main) turns Ctrl-C into Abort
        if isinstance(abort.__cause__ or abort.__context__, KeyboardInterrupt):
            code = 130
        else:
            _fail("aborted (end of input)", 1)
    except OSError as err:  # e.g. disk full or permission denied while a run writes its files
        where = f"{err.filename}: " if err.filename else ""
        _fail(f"{where}{err.strerror or err}", 1)
    except Exception as err:
        if not isinstance(err, _click_exception_types()):
            raise  # a bug: keep the traceback
        _usage_error(err)
    if code == 130:
        print(f"interrupted: {_interrupt_note[0]()}", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _click_exception_types() -> tuple[type, ...]:
    """The ClickException class of the installed typer, without importing click.

    Recent typer vendors click (``typer._click``), older typer uses click itself: either way it is
    a base of ``typer.BadParameter``.
    """
    return tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_error(err: Exception) -> None:
    """click's usage message (usage, hint and error on several lines) as one ``error:`` line."""
    ctx = getattr(err, "ctx", None)
    exit_code = int(getattr(err, "exit_code", 2))
    if type(err).__name__ == "NoArgsIsHelpError":  # `dgprune` alone: the help, not an error line
        text = err.format_message()  # type: ignore[attr-defined]  (empty where typer printed it already)
        if text.strip():
            print(text)
        sys.exit(exit_code)
    message = " ".join(err.format_message().split())  # type: ignore[attr-defined]
    if ctx is not None:
        command = ctx.command_path
        if type(err).__name__ == "NoSuchOption":  # click's guesses alone can mislead (--bogus: --out?)
            options = sorted({o for p in ctx.command.get_params(ctx) for o in p.opts if o.startswith("--")})
            guesses = sorted(getattr(err, "possibilities", None) or [])
            message = str(err.message)  # type: ignore[attr-defined]  (without click's guesses)
            message += f"; did you mean {' or '.join(guesses)}?" if guesses else ""
            message += f"; valid options: {', '.join(options)}"
        elif message.startswith("No such command"):
            message += f" Valid commands: {', '.join(ctx.command.list_commands(ctx))}."
        message += f" (see '{command} --help')"
    _fail(message, exit_code)
