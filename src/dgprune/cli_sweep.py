"""`dgprune sweep`, `dgprune status` and `dgprune report`: thin commands over experiments.sweep and report."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from dgprune.errors import ConfigError
from dgprune.experiments.store import Store
from dgprune.experiments.sweep import load_sweep, run_sweep, sweep_records, sweep_status
from dgprune.pruning.criteria import criterion_label
from dgprune.report.export import FORMATS, write_report
from dgprune.report.table1 import Table

console = Console() if sys.stdout.isatty() else Console(width=240)

SweepArg = Annotated[
    str,
    typer.Argument(help="Sweep file (YAML/TOML/JSON) or the name of a preset, e.g. paper_digits."),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Sweep directory (models, checkpoints, database). Default: the file's `sweep.dir`, "
        "else <name>-sweep beside the file (in the current directory for a preset).",
    ),
]


def sweep(
    config: SweepArg,
    out: OutOpt = None,
    workers: Annotated[
        str | None,
        typer.Option(help="Local worker processes, or auto (default: the file's sweep.workers, else auto)."),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run on Ray instead: a cluster address, `auto` (the running cluster) or `local` "
            "(start one here). Needs `pip install ray`.",
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto; overrides the file.")] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed/--no-retry-failed", help="Run failed runs again.")
    ] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No line per finished run.")] = False,
) -> None:
    """Run (or resume) every run of a sweep; finished runs are skipped.

    Pretraining is shared by all the runs that prune the same pretrained model. Killed at any
    moment, the same command resumes and ends with every run in the database exactly once.
    """
    spec = load_sweep(config, out, device)
    total = len(spec.run_ids())
    console.print(f"sweep {spec.name}: {total} runs in {spec.directory} (database {spec.db_path})")
    outcome = run_sweep(spec, workers, ray, retry_failed, quiet)
    counts = outcome.counts
    console.print(
        f"done {counts['done']}/{total}, failed {counts['failed']}, pending {counts['pending']} "
        f"in {_duration(outcome.wall_s)}"
        + (f", still running {counts['running']}" if counts["running"] else "")
    )
    if outcome.rerun:
        console.print(f"ran again {len(outcome.rerun)} finished run(s) whose model directory was missing")
    for row in outcome.failed[:10]:
        console.print(f"  failed {row['run_id']}: {_last_line(row['error'])}")
    if counts["failed"]:
        console.print("see `dgprune status` for the errors; the same `dgprune sweep` command retries them")
        raise typer.Exit(1)
    if counts["pending"] or counts["running"]:  # every worker died: not a finished sweep
        console.print("the sweep stopped before every run finished; the same command resumes it")
        raise typer.Exit(1)


def status(
    config: SweepArg,
    out: OutOpt = None,
    errors: Annotated[
        bool, typer.Option("--errors", help="Print the full error text of failed runs.")
    ] = False,
) -> None:
    """Show done / running / failed / pending runs of a sweep, with an ETA."""
    spec = load_sweep(config, out)
    state = sweep_status(spec)
    c = state.counts
    console.print(f"sweep {spec.name}: {state.total} runs ({spec.db_path})")
    console.print(f"  done {c['done']}  running {c['running']}  failed {c['failed']}  pending {c['pending']}")
    now = time.time()
    for row in state.running:
        since = f", for {_duration(now - row['started_at'])}" if row.get("started_at") else ""
        console.print(f"  running {row['run_id']}: {_describe_row(row)}{since}")
    for row in state.failed:
        text = row["error"] if errors else _last_line(row["error"])
        console.print(f"  failed {row['run_id']}: {_describe_row(row)}: {text}")
    remaining = c["pending"] + c["running"]
    if remaining == 0:
        console.print("  finished" if not c["failed"] else "  finished, with failures")
    elif state.eta_s is None:
        console.print("  ETA: unknown until a run of each kind (pretraining, pruning) has finished")
    else:
        console.print(f"  ETA: {_duration(state.eta_s)} at {state.parallel} worker(s)")


def report(
    config: Annotated[
        str | None,
        typer.Argument(help="Sweep file or preset name (omit with --db to report a whole database)."),
    ] = None,
    out: OutOpt = None,
    db: Annotated[
        Path | None, typer.Option(help="A results database to report (every finished run).")
    ] = None,
    report_dir: Annotated[
        Path | None,
        typer.Option("--report-dir", help="Where to write tables and plots (default: <sweep>/report)."),
    ] = None,
    formats: Annotated[
        str, typer.Option("--format", help="Table formats: md, csv, tex (comma-separated).")
    ] = ",".join(FORMATS),
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots.")] = True,
) -> None:
    """Tables (paper's Table 1 and Table 2 layouts), IoR-vs-Taylor wins and plots of a sweep.

    Cells are mean ± standard error over seeds; the win count compares IoR with Taylor on
    cross-domain accuracy per model × keep ratio × target. Markdown, CSV and LaTeX; PNG plots.
    """
    if config is None and db is None:
        raise ConfigError("give a sweep file (or preset name), or --db PATH")
    spec = load_sweep(config, out) if config is not None else None
    db_path = db or spec.db_path  # type: ignore[union-attr]
    records = sweep_records(spec, db_path)
    if not records:
        raise ConfigError(f"{db_path}: no finished runs to report yet")
    with Store(db_path) as store:
        done = store.rows("done")
    widths = {r["run_id"]: r["layer_widths"] for r in done if r["layer_widths"]}
    configs = {r["run_id"]: r["config"] for r in done}
    target = report_dir or (spec.directory / "report" if spec is not None else db_path.parent / "report")
    chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown format(s) {', '.join(unknown)}; valid: {', '.join(FORMATS)}")
    result = write_report(records, target, widths, chosen, plots, configs)
    for section in result.sections:
        _print_table(section.table, section.title)
    if result.wins is not None and result.wins.comparisons:
        console.print(result.wins.summary())
    console.print(f"wrote {len(result.files)} table file(s) and {len(result.plots)} plot(s) to {target}")


def register(app: typer.Typer) -> None:
    """Add the sweep commands to dgprune's command line."""
    app.command()(sweep)
    app.command()(status)
    app.command()(report)


def _print_table(table: Table, title: str) -> None:
    rich_table = RichTable(title=title, box=box.SIMPLE_HEAVY)
    for column in table.header:
        rich_table.add_column(column, justify="left" if column in ("Model", "Pretrain") else "right")
    for row in table.rows:
        rich_table.add_row(*row)
    console.print(rich_table)


def _describe_row(row: dict) -> str:
    label = criterion_label(row["criterion"], row.get("criterion_params"))  # rows() fills it in, old DBs too
    what = "dense" if row["kind"] == "dense" else f"{label} keep {row['keep_ratio']:g}"
    if row.get("finetune_algorithm") not in (None, "erm"):
        what += f" ft {row['finetune_algorithm']}"
    return f"target {row['target_domain']} seed {row['seed']} {row['algorithm']} {what}"


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "(no error text)"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
