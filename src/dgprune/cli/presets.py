"""`dgprune demo` and `dgprune table2`: the preset grids on the embedded rotated digits."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dgprune.cli.exits import grid_note, on_interrupt
from dgprune.cli.options import (
    OptionGroup,
    QuietOpt,
    SetOpt,
    TensorBoardOpt,
    config_option,
    with_option_groups,
)
from dgprune.cli.output import console, grid_title, print_table
from dgprune.cli.runtime import checked_tensorboard, progress
from dgprune.experiments.demo import DEMO_CRITERIA, DEMO_KEEP_RATIOS, TABLE2_ALGORITHMS, run_demo, run_table2
from dgprune.report.table1 import Table, table1
from dgprune.report.table2 import table2 as table2_report

TargetsOpt = Annotated[
    str | None, typer.Option(help="Comma-separated target domains (default: every domain).")
]
OutOpt = Annotated[Path, typer.Option(help="Directory for results.json, table.md and the models.")]
PresetSeedOpt = Annotated[int | None, typer.Option(help="Training seed (default: the config's, else 0).")]
PresetDeviceOpt = Annotated[
    str | None, typer.Option(help="cpu, cuda or auto (default: the config's, else auto).")
]
PretrainStepsOpt = Annotated[int | None, typer.Option(help="Override the preset's pretraining steps.")]
PruneStepsOpt = Annotated[int | None, typer.Option(help="Override the preset's fine-tuning steps.")]
PresetConfigOpt = config_option(
    "YAML/TOML file of settings on top of the preset's (the grid's targets, algorithms, "
    "criteria and keep ratios come from this command's options)."
)


@dataclasses.dataclass(frozen=True)
class PresetOptions(OptionGroup):
    """The options both presets take after their grid's own: seed, device, budgets, settings, display."""

    seed: PresetSeedOpt = None
    device: PresetDeviceOpt = None
    pretrain_steps: PretrainStepsOpt = None
    prune_steps: PruneStepsOpt = None
    config: PresetConfigOpt = None
    set_values: SetOpt = None
    tensorboard: TensorBoardOpt = None
    quiet: QuietOpt = False

    def grid_args(self) -> dict[str, Any]:
        """The keyword arguments of `run_demo` / `run_table2` that these options give."""
        overrides: dict[str, Any] = {}
        if self.pretrain_steps:
            overrides["pretrain"] = {
                "steps": self.pretrain_steps,
                "eval_every": max(1, self.pretrain_steps // 4),
            }
        if self.prune_steps:
            overrides["prune"] = {"steps": self.prune_steps}
        return {
            "seed": self.seed,
            "device": self.device,
            "overrides": overrides,
            "progress_for": lambda label: progress(self.quiet, label),
            "tensorboard": checked_tensorboard(self.tensorboard),
            "config_path": self.config,
            "sets": self.set_values,
        }


def _target_list(targets: str | None) -> list[str] | None:
    return [t.strip() for t in targets.split(",")] if targets else None


def _write_table(out: Path, table: Table, title: str) -> None:
    (out / "table.md").write_text(table.to_markdown() + "\n")
    print_table(table, title)
    console.print(f"results: {out / 'results.json'}  table: {out / 'table.md'}")


@with_option_groups
def demo(
    out: OutOpt = Path("demo-out"),
    targets: TargetsOpt = None,
    *,
    preset: PresetOptions,
) -> None:
    """Run the default experiment (paper Table 1, in small) on the embedded rotated digits.

    Pretrains MNIST_CNN once per target domain, prunes it with Taylor-FO and with IoR to keep 50%
    and 30% of its filters, compresses the selected models and prints the table. Re-running with
    the same --out resumes: finished models are not recomputed.
    """
    on_interrupt(grid_note(out))
    records = run_demo(
        out,
        _target_list(targets),
        keep_ratios=DEMO_KEEP_RATIOS,
        criteria=DEMO_CRITERIA,
        **preset.grid_args(),
    )
    _write_table(out, table1(records), grid_title(records))


@with_option_groups
def table2(
    out: OutOpt = Path("table2-out"),
    targets: TargetsOpt = None,
    algorithms: Annotated[str, typer.Option(help="Comma-separated pretraining algorithms.")] = ",".join(
        TABLE2_ALGORITHMS
    ),
    keep_ratio: Annotated[float, typer.Option(help="Share of filters kept (paper: 0.5).")] = 0.5,
    criterion: Annotated[str, typer.Option(help="Pruning criterion (paper: taylor).")] = "taylor",
    *,
    preset: PresetOptions,
) -> None:
    """Reproduce the layout of the paper's Table 2 on the embedded rotated digits.

    Pretrains with each algorithm (ERM, CORAL, Mixup), prunes to --keep-ratio with ERM fine-tuning
    (as the paper) and with the algorithm's own objective (the paper's Q3 conjecture), and prints
    dense / pruned / Δ rows per algorithm. Resumable like `demo`.
    """
    on_interrupt(grid_note(out))
    records = run_table2(
        out,
        _target_list(targets),
        algorithms=tuple(a.strip() for a in algorithms.split(",")),
        keep_ratio=keep_ratio,
        criterion=criterion,
        **preset.grid_args(),
    )
    _write_table(out, table2_report(records), grid_title(records))


# In the order of `dgprune --help`.
COMMANDS: list[tuple[str, Callable[..., None]]] = [("demo", demo), ("table2", table2)]
