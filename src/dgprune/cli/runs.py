"""The commands of single runs and saved models: pretrain, prune, evaluate, analyze, plot, export, config."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from dgprune.cli.exits import on_interrupt, stage_note
from dgprune.cli.options import (
    DataOptions,
    OptionGroup,
    OverwriteOpt,
    QuietOpt,
    RunOptions,
    TensorBoardOpt,
    model_dir_option,
    quiet_option,
    with_option_groups,
)
from dgprune.cli.output import console, describe_record, print_json, print_plain, print_table
from dgprune.cli.runtime import progress, tensorboard_run
from dgprune.data import MultiDomainDataset
from dgprune.errors import ConfigError
from dgprune.experiments.config import RunConfig, dump_config
from dgprune.experiments.deploy import (
    DEFAULT_CALIBRATION_IMAGES,
    export_int8,
    load_onnx_for,
    require_onnxruntime,
)
from dgprune.experiments.pipeline import (
    check_pretrained_match,
    load_model_dir,
    make_context,
    pretrained_settings,
    run_pretrain,
    run_prune,
)
from dgprune.experiments.records import ResultRecord, write_records
from dgprune.pruning.budget import parse_budget
from dgprune.pruning.criteria import CRITERIA
from dgprune.pruning.surgery import export_onnx, saved_input_shape
from dgprune.report.table1 import Table
from dgprune.training.evaluation import evaluate


@dataclasses.dataclass(frozen=True)
class StageOptions(OptionGroup):
    """How `pretrain` / `prune` treat their --out directory and show their progress."""

    overwrite: OverwriteOpt = False
    tensorboard: TensorBoardOpt = None
    quiet: QuietOpt = False

    def run(
        self,
        out: Path,
        config: RunConfig,
        dataset: MultiDomainDataset | None,
        stage: Callable[..., ResultRecord],
    ) -> None:
        """Run ``stage(ctx, progress=, overwrite=, tensorboard_dir=)`` (`run_pretrain` / `run_prune` with
        their directories bound) into ``out``; write and print its record."""
        tensorboard_dir = tensorboard_run(self.tensorboard, out)  # checked before the data are loaded
        ctx = make_context(config, dataset)
        # A pruning run that sees the target's images says so on every progress line.
        access = config.prune.target_access if getattr(stage, "func", None) is run_prune else "none"
        shown = progress(self.quiet, "" if access == "none" else f"[{access} target] ")
        record = stage(ctx, progress=shown, overwrite=self.overwrite, tensorboard_dir=tensorboard_dir)
        write_records(out / "results.json", [record])
        print_plain(describe_record(record))  # plain: "[unlabeled target]" is no markup


ModelDirOpt = model_dir_option("A dgprune model directory.")
AnalyzedModelDirOpt = model_dir_option("A dgprune model directory (dense or pruned).")
HistoryModelDirOpt = model_dir_option("A model directory with a history.jsonl.")
AnalyzeQuietOpt = quiet_option("Print only warnings and the file written (summary and table are in it).")


@with_option_groups
def pretrain(
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    run: RunOptions,
    data: DataOptions,
    model: Annotated[str | None, typer.Option(help="resnet18, resnet50 or mnist_cnn.")] = None,
    algorithm: Annotated[
        str | None, typer.Option(help="Pretraining algorithm: erm, coral, mixup, vrex, groupdro or irm.")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Initial weights file (e.g. ImageNet).")] = None,
    steps: Annotated[int | None, typer.Option(help="Pretraining steps.")] = None,
    *,
    stage: StageOptions,
) -> None:
    """Pretrain on the source domains with a DG algorithm; keep the best intra-domain val checkpoint."""
    on_interrupt(stage_note("pretraining", out))
    cfg, dataset = run.new_run(
        data,
        model__name=model,
        pretrain__algorithm=algorithm,
        model__weights=str(weights) if weights else None,
        pretrain__steps=steps,
    )
    stage.run(out, cfg, dataset, functools.partial(run_pretrain, out_dir=out))


@with_option_groups
def prune(
    pretrained: Annotated[Path, typer.Option(help="Model directory written by `dgprune pretrain`.")],
    out: Annotated[Path, typer.Option(help="Directory for the compressed model.")],
    run: RunOptions,
    data: DataOptions,
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
        typer.Option(help="Make every layer's final width a multiple of this (8: faster kernels)."),
    ] = None,
    round_mode: Annotated[
        str | None,
        typer.Option(
            help="How --round-to picks the widths: budget (default: total nearest the target, chosen by "
            "score mass) or per_layer (each layer rounded alone; see docs/benchmarks.md §4)."
        ),
    ] = None,
    max_layer_prune: Annotated[
        float | None,
        typer.Option(
            help="Most share of any one layer's channels pruned, e.g. 0.9 (default: no limit, as the "
            "paper; the global ranking can empty the widest layers: docs/method.md)."
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Fine-tuning steps in all.")] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            metavar="METRIC=RATIO",
            help="What the pruned model may cost, instead of --keep-ratio: latency=0.3, macs=0.5, params=0.4 "
            "or filters=0.3 (= --keep-ratio 0.3). Latency is measured with torch, 1 thread, batch 1 unless "
            "--set prune.budget.runtime=onnxruntime / .threads / .batch_size (docs/method.md, Budgets).",
        ),
    ] = None,
    target_access: Annotated[
        str | None,
        typer.Option(
            help="none (default: the plain DG protocol) or unlabeled: the target's images, never its "
            "labels, go to the criteria that need them (dss, target_entropy; docs/criteria.md)."
        ),
    ] = None,
    *,
    stage: StageOptions,
) -> None:
    """Prune + fine-tune a pretrained model, compress the selected checkpoint, evaluate it."""
    on_interrupt(stage_note("pruning", out))
    cfg, dataset = run.new_run(
        data,
        base=pretrained_settings(pretrained),
        prune__criterion=criterion,
        prune__keep_ratio=keep_ratio,
        prune__criterion_params=_criterion_params(criterion_param),
        prune__bn_mode=bn_mode,
        prune__scope=scope,
        prune__finetune_algorithm=finetune_algorithm,
        prune__round_to=round_to,
        prune__round_mode=round_mode,
        prune__max_layer_prune=max_layer_prune,
        prune__budget=parse_budget(budget) if budget is not None else None,
        prune__steps=steps,
        prune__target_access=target_access,
    )
    check_pretrained_match(cfg, pretrained)  # before the data are loaded (run_prune checks it too)
    stage.run(out, cfg, dataset, functools.partial(run_prune, pretrained_dir=pretrained, out_dir=out))


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


@with_option_groups
def evaluate_cmd(
    model_dir: ModelDirOpt,
    run: RunOptions,
    data: DataOptions,
    latency_batch: Annotated[
        int,
        typer.Option(min=1, help="Also time forward passes of this batch size (batch 1 is always timed)."),
    ] = 1,
    onnx: Annotated[
        Path | None,
        typer.Option(
            help="Evaluate this exported ONNX file (fp32 or int8, `dgprune export`) under ONNX Runtime on "
            "the CPU instead of the saved model; --model still gives the data, target and split."
        ),
    ] = None,
) -> None:
    """Intra-, cross- and per-domain accuracy of a saved (dense or compressed) model, its parameters,
    MACs (batch 1) and measured latency (median of 20 eval-mode forwards, in ms), as JSON. With --onnx,
    the same of the exported file as ONNX Runtime runs it (its size in bytes instead of params / MACs).

    Settings not given by flags or --config (target, data, seed) come from the model directory's
    run.json (or config.yaml).
    """
    from dgprune.experiments.sweep import measure_latency_ms
    from dgprune.pruning.surgery import model_cost

    cfg, dataset = run.saved_model(model_dir, data)
    ctx = make_context(cfg, dataset)
    model: torch.nn.Module
    if onnx is None:
        model, device, runtime = ctx.load_model_dir(model_dir), ctx.device, "torch"
        cost = model_cost(model, ctx.example_input)
        size: dict[str, Any] = {"params": cost.params, "macs": cost.macs}
    else:  # the shipped file itself, through the same evaluation code
        shape, classes = ctx.dataset.input_shape, ctx.dataset.num_classes
        model, device, runtime = load_onnx_for(onnx, shape, classes), torch.device("cpu"), "onnxruntime"
        size = {"onnx": str(onnx), "onnx_bytes": onnx.stat().st_size}
    acc = evaluate(model, ctx.split, device)
    # Times depend on the machine and its load: compare models measured in the same conditions.
    example = torch.zeros(1, *ctx.dataset.input_shape, device=device)
    latency = {
        f"batch_{b}": measure_latency_ms(model, example.expand(b, *example.shape[1:]))
        for b in sorted({1, latency_batch})
    }
    print_json(
        {
            "target_domain": acc.target_name,
            "intra_acc": acc.intra,
            "cross_acc": acc.cross,
            "worst_source_acc": acc.worst_source,
            "per_domain_acc": acc.per_domain,
            "per_domain_split": acc.per_domain_split,
            "domain_split_acc": acc.splits,
            **size,
            "latency_ms": latency,
            "latency_runtime": runtime,
            "latency_device": str(device),
            "latency_threads": torch.get_num_threads(),
        }
    )


@with_option_groups
def analyze_cmd(
    model_dir: AnalyzedModelDirOpt,
    run: RunOptions,
    data: DataOptions,
    channels: Annotated[
        int | None,
        typer.Option(help="Analyse a seeded sample of at most K channels (default: all <= 512, else 256)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per domain in the fixed batches.")] = 64,
    out: Annotated[Path, typer.Option(help="JSON file to write.")] = Path("analysis.json"),
    quiet: AnalyzeQuietOpt = False,
) -> None:
    """Does any source signal predict out-of-distribution importance? Measures, per channel, how much
    the target risk rises when it is removed (the target oracle) and compares every criterion and
    source-oracle signal with it (Spearman, lowest-k overlap). The target is used for analysis only.

    Settings not given by flags or --config come from the model directory's run.json.
    """
    from dgprune.experiments import analysis

    cfg, _ = run.saved_model(model_dir, data)
    report = analysis.analyze_model(model_dir, cfg, channels, batch_size)
    if quiet:
        for warning in report.warnings:
            print_plain(f"warning: {warning}")
    else:
        for line in analysis.summary_lines(report):
            print_plain(line)
        table = Table(list(analysis.TABLE_HEADER), analysis.table_rows(report.result))
        print_table(table, "Out-of-distribution importance: agreement with the target oracle")
    analysis.write_report(report, out)
    print_plain(f"analysis: {out}  ({report.wall_time_s:.0f} s)")


def plot_cmd(
    model_dir: HistoryModelDirOpt,
    out: Annotated[Path | None, typer.Option(help="PNG file to write (default: DIR/curves.png).")] = None,
) -> None:
    """Plot a run's training curves from its history.jsonl: loss (and per-domain risks), validation
    accuracy and filters alive against the step."""
    from dgprune.report.curves import plot_model_dir  # matplotlib: only for this command

    print_plain(f"wrote {plot_model_dir(model_dir, out)}")


@with_option_groups
def export_cmd(
    model_dir: ModelDirOpt,
    out: Annotated[Path, typer.Option(help="ONNX file to write.")],
    run: RunOptions,
    data: DataOptions,
    int8: Annotated[
        Path | None,
        typer.Option(
            help="Also write an int8 ONNX file here: ONNX Runtime static quantisation, calibrated on "
            "source-domain train images only (the data, target and seed of --model's run unless the "
            "run flags say otherwise)."
        ),
    ] = None,
    calibration_images: Annotated[
        int, typer.Option(min=1, help="With --int8: how many source train images calibrate it.")
    ] = DEFAULT_CALIBRATION_IMAGES,
) -> None:
    """Export a saved (dense or compressed) model to ONNX (dynamic batch size), and with --int8 an
    int8 copy of it (evaluate either with `dgprune evaluate --model DIR --onnx FILE`)."""
    if int8 is not None and int8.resolve() == out.resolve():
        raise ConfigError(f"--int8 {int8}: the same file as --out; give the int8 model its own name")
    if int8 is not None:  # checked before anything is written
        cfg, dataset = run.saved_model(model_dir, data)
        require_onnxruntime()
    model = load_model_dir(model_dir)
    example = torch.zeros(1, *saved_input_shape(model_dir))
    console.print(f"wrote {export_onnx(model, out, example)}")
    if int8 is not None:
        calibrated = export_int8(out, int8, cfg, calibration_images, dataset)
        print_plain(f"wrote {int8} (int8; calibrated on {calibrated.describe()})")


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


# In the order of `dgprune --help`.
COMMANDS: list[tuple[str, Callable[..., None]]] = [
    ("pretrain", pretrain),
    ("prune", prune),
    ("evaluate", evaluate_cmd),
    ("analyze", analyze_cmd),
    ("plot", plot_cmd),
    ("export", export_cmd),
    ("config", config_cmd),
]
