"""Command line: a thin layer over dgprune's library. Every command is one call into it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from dgprune.cli_sweep import register as register_sweep_commands
from dgprune.errors import DgpruneError
from dgprune.experiments.config import RunConfig, build_config, dump_config
from dgprune.experiments.demo import DEMO_CRITERIA, DEMO_KEEP_RATIOS, TABLE2_ALGORITHMS, run_demo, run_table2
from dgprune.experiments.pipeline import load_model_dir, make_context, run_pretrain, run_prune
from dgprune.experiments.records import write_records
from dgprune.pruning.surgery import STRUCTURE_FILE, export_onnx
from dgprune.report.table1 import Table, table1
from dgprune.report.table2 import table2 as table2_report
from dgprune.training.evaluation import evaluate
from dgprune.training.progress import LinePrinter

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Domain-generalized filter pruning: Taylor-FO and IoR criteria, leave-one-domain-out evaluation.",
)
# Paper-style tables are wide: do not wrap them to 80 columns when output is not a terminal.
console = Console() if sys.stdout.isatty() else Console(width=240)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML/TOML file of settings (see `dgprune config`).")
]
TargetOpt = Annotated[str | None, typer.Option(help="Unseen target domain; the others are the sources.")]
SeedOpt = Annotated[int | None, typer.Option(help="Training seed (split, batches, init).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda or auto (cuda when present).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")]
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


def _progress(quiet: bool, prefix: str = ""):
    return None if quiet else LinePrinter(prefix)


def _print_table(table: Table, title: str) -> None:
    rich_table = RichTable(title=title, box=box.SIMPLE_HEAVY)
    for column in table.header:
        rich_table.add_column(column, justify="left" if column == "Model" else "right")
    for row in table.rows:
        rich_table.add_row(*row)
    console.print(rich_table)


def _config(path: Path | None, **overrides: Any) -> RunConfig:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            nested.setdefault(section, {})[field] = value
        else:
            nested[section] = value
    return build_config(path, nested)


TargetsOpt = Annotated[
    str | None, typer.Option(help="Comma-separated target domains (default: every domain).")
]
PresetSeedOpt = Annotated[int, typer.Option(help="Training seed.")]
PresetDeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
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
    seed: PresetSeedOpt = 0,
    device: PresetDeviceOpt = "auto",
    pretrain_steps: PretrainStepsOpt = None,
    prune_steps: PruneStepsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the default experiment (paper Table 1, in small) on the embedded rotated digits.

    Pretrains MNIST_CNN once per target domain, prunes it with Taylor-FO and with IoR to keep 50%
    and 30% of its filters, compresses the selected models and prints the table. Re-running with
    the same --out resumes: finished models are not recomputed.
    """
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
    )
    first = records[0]
    _write_table(out, table1(records), f"{first.model} on {first.dataset}: top-1 accuracy (%), seed {seed}")


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
    seed: PresetSeedOpt = 0,
    device: PresetDeviceOpt = "auto",
    pretrain_steps: PretrainStepsOpt = None,
    prune_steps: PruneStepsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Reproduce the layout of the paper's Table 2 on the embedded rotated digits.

    Pretrains with each algorithm (ERM, CORAL, Mixup), prunes to --keep-ratio with ERM fine-tuning
    (as the paper) and with the algorithm's own objective (the paper's Q3 conjecture), and prints
    dense / pruned / Δ rows per algorithm. Resumable like `demo`.
    """
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
    )
    first = records[0]
    _write_table(
        out, table2_report(records), f"{first.model} on {first.dataset}: top-1 accuracy (%), seed {seed}"
    )


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    config: ConfigOpt = None,
    target: TargetOpt = None,
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
    quiet: QuietOpt = False,
) -> None:
    """Pretrain on the source domains with a DG algorithm; keep the best intra-domain val checkpoint."""
    cfg = _config(
        config,
        target=target,
        seed=seed,
        device=device,
        data=_data_overrides(data, data_root, image_size, download, skip_bad_images),
        model__name=model,
        pretrain__algorithm=algorithm,
        model__weights=str(weights) if weights else None,
        pretrain__steps=steps,
    )
    record = run_pretrain(make_context(cfg), out, _progress(quiet))
    write_records(out / "results.json", [record])
    _print_record(record)


@app.command()
def prune(
    pretrained: Annotated[Path, typer.Option(help="Model directory written by `dgprune pretrain`.")],
    out: Annotated[Path, typer.Option(help="Directory for the compressed model.")],
    config: ConfigOpt = None,
    target: TargetOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    image_size: ImageSizeOpt = None,
    download: DownloadOpt = False,
    skip_bad_images: SkipBadOpt = False,
    criterion: Annotated[
        str | None, typer.Option(help="taylor, ior, random, l1, bn_scale or oracle (Eq. 1; small models).")
    ] = None,
    keep_ratio: Annotated[
        float | None, typer.Option(help="Share of prunable filters kept, in (0, 1].")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="Weight of IoR's variance term.")] = None,
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
    quiet: QuietOpt = False,
) -> None:
    """Prune + fine-tune a pretrained model, compress the selected checkpoint, evaluate it."""
    cfg = _config(
        config,
        target=target,
        seed=seed,
        device=device,
        data=_data_overrides(data, data_root, image_size, download, skip_bad_images),
        prune__criterion=criterion,
        prune__keep_ratio=keep_ratio,
        prune__alpha=alpha,
        prune__scope=scope,
        prune__finetune_algorithm=finetune_algorithm,
        prune__round_to=round_to,
        prune__steps=steps,
    )
    record = run_prune(make_context(cfg), pretrained, out, _progress(quiet))
    write_records(out / "results.json", [record])
    _print_record(record)


@app.command("evaluate")
def evaluate_cmd(
    model_dir: Annotated[Path, typer.Option("--model", help="A dgprune model directory.")],
    config: ConfigOpt = None,
    target: TargetOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    image_size: ImageSizeOpt = None,
    download: DownloadOpt = False,
    skip_bad_images: SkipBadOpt = False,
) -> None:
    """Intra-, cross- and per-domain accuracy of a saved (dense or compressed) model, as JSON."""
    cfg = _config(
        config,
        target=target,
        seed=seed,
        device=device,
        data=_data_overrides(data, data_root, image_size, download, skip_bad_images),
    )
    ctx = make_context(cfg)
    acc = evaluate(ctx.load_model_dir(model_dir), ctx.split, ctx.device)
    print(
        json.dumps(
            {
                "target_domain": acc.target_name,
                "intra_acc": acc.intra,
                "cross_acc": acc.cross,
                "worst_source_acc": acc.worst_source,
                "per_domain_acc": acc.per_domain,
            },
            indent=1,
        )
    )


@app.command("export")
def export_cmd(
    model_dir: Annotated[Path, typer.Option("--model", help="A dgprune model directory.")],
    out: Annotated[Path, typer.Option(help="ONNX file to write.")],
) -> None:
    """Export a saved (dense or compressed) model to ONNX (dynamic batch size)."""
    model = load_model_dir(model_dir)
    shape = json.loads((model_dir / STRUCTURE_FILE).read_text())["input_shape"]
    console.print(f"wrote {export_onnx(model, out, torch.zeros(1, *shape))}")


@app.command("config")
def config_cmd(
    out: Annotated[Path | None, typer.Option(help="Write here instead of printing.")] = None,
) -> None:
    """Print (or write) every setting with its default, as YAML: a starting point for --config."""
    text = dump_config(RunConfig())
    if out:
        out.write_text(text)
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
    """Entry point: user errors print one line (no traceback) and exit with status 2."""
    try:
        app(standalone_mode=False)
    except DgpruneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as done:
        sys.exit(getattr(done, "exit_code", getattr(done, "code", 0)))
    except Exception as err:  # click's usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
