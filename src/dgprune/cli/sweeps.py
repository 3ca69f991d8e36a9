"""`dgprune sweep`, `dgprune status` and `dgprune report`: thin commands over experiments.sweep and report."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from dgprune.cli.options import quiet_option, set_option
from dgprune.cli.output import console, describe_row, duration, last_line, print_json, print_table
from dgprune.errors import ConfigError
from dgprune.experiments.sweep import Sweep, SweepStatus, load_sweep, run_sweep, sweep_status
from dgprune.report.database import read_report_inputs
from dgprune.report.export import FORMATS, parse_formats, write_report

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
SweepSetOpt = set_option(
    "Update the sweep file's `base` by a dotted key, the value read as YAML (e.g. --set "
    "prune.lr=0.01); repeat for several. The runs' ids change with it: give the same --set to "
    "`status` and `report`."
)


def json_option(help: str) -> Any:
    """``--json``: print data instead of lines and tables (the help says what)."""
    return Annotated[bool, typer.Option("--json", help=help)]


SweepQuietOpt = quiet_option("No line per finished run.")
StatusJsonOpt = json_option("Print the status as JSON (counts, ETA, running and failed runs).")
ReportJsonOpt = json_option(
    "Print the report as JSON instead of tables: every table (header and rows), the win "
    "count, the paired comparisons and the files written."
)


def sweep(
    config: SweepArg,
    out: OutOpt = None,
    set_values: SweepSetOpt = None,
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
    quiet: SweepQuietOpt = False,
) -> None:
    """Run (or resume) every run of a sweep; finished runs are skipped.

    Pretraining is shared by all the runs that prune the same pretrained model. Killed at any
    moment, the same command resumes and ends with every run in the database exactly once.
    """
    spec = load_sweep(config, out, device, set_values)
    total = len(spec.run_ids())
    console.print(f"sweep {spec.name}: {total} runs in {spec.directory} (database {spec.db_path})")
    # On a terminal a bar of runs done (the workers' own lines would break it); else a line per run.
    bar = not quiet and console.is_terminal
    with SweepProgress(spec, console) if bar else contextlib.nullcontext():
        outcome = run_sweep(spec, workers, ray, retry_failed, quiet or bar)
    counts = outcome.counts
    console.print(
        f"done {counts['done']}/{total}, failed {counts['failed']}, pending {counts['pending']} "
        f"in {duration(outcome.wall_s)}"
        + (f", still running {counts['running']}" if counts["running"] else "")
    )
    if outcome.rerun:
        console.print(f"ran again {len(outcome.rerun)} finished run(s) whose model directory was missing")
    for row in outcome.failed[:10]:
        console.print(f"  failed {row['run_id']}: {last_line(row['error'])}")
    if counts["failed"]:
        console.print("see `dgprune status` for the errors; the same `dgprune sweep` command retries them")
        raise typer.Exit(1)
    if counts["pending"] or counts["running"]:  # every worker died: not a finished sweep
        console.print("the sweep stopped before every run finished; the same command resumes it")
        raise typer.Exit(1)


def status(
    config: SweepArg,
    out: OutOpt = None,
    set_values: SweepSetOpt = None,
    errors: Annotated[
        bool, typer.Option("--errors", help="Print the full error text of failed runs.")
    ] = False,
    as_json: StatusJsonOpt = False,
) -> None:
    """Show done / running / failed / pending runs of a sweep, with an ETA."""
    spec = load_sweep(config, out, sets=set_values)
    state = sweep_status(spec)
    if as_json:
        print_json(status_dict(spec, state))
        return
    c = state.counts
    console.print(f"sweep {spec.name}: {state.total} runs ({spec.db_path})")
    stale = f"  stale {c['stale']}" if c["stale"] else ""
    console.print(
        f"  done {c['done']}  running {c['running']}{stale}  failed {c['failed']}  pending {c['pending']}"
    )
    now = time.time()
    for row in state.running:
        since = f", for {duration(now - row['started_at'])}" if row.get("started_at") else ""
        console.print(f"  running {row['run_id']}: {describe_row(row)}{since}", markup=False)
    for row in state.stale:
        console.print(f"  stale {row['run_id']}: {describe_row(row)}: {row['stale_reason']}", markup=False)
    if state.stale:
        console.print("  stale runs are taken back and run again by the next `dgprune sweep` of this file")
    for row in state.failed:
        text = row["error"] if errors else last_line(row["error"])
        console.print(f"  failed {row['run_id']}: {describe_row(row)}: {text}", markup=False)
    remaining = c["pending"] + c["running"] + c["stale"]
    if remaining == 0:
        console.print("  finished" if not c["failed"] else "  finished, with failures")
    elif state.eta_s is None:
        console.print("  ETA: unknown until a run of each kind (pretraining, pruning) has finished")
    else:
        console.print(f"  ETA: {duration(state.eta_s)} at {state.parallel} worker(s)")


def report(
    config: Annotated[
        str | None,
        typer.Argument(help="Sweep file or preset name (omit with --db to report a whole database)."),
    ] = None,
    out: OutOpt = None,
    set_values: SweepSetOpt = None,
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
    as_json: ReportJsonOpt = False,
) -> None:
    """Tables (paper's Table 1 and Table 2 layouts), IoR-vs-Taylor wins and plots of a sweep.

    Cells are mean ± standard error over seeds; the win count compares IoR with Taylor on
    cross-domain accuracy per model × keep ratio × target. Markdown, CSV and LaTeX; PNG plots.
    """
    if config is None and db is None:
        raise ConfigError("give a sweep file (or preset name), or --db PATH")
    spec = load_sweep(config, out, sets=set_values) if config is not None else None
    db_path = db or spec.db_path  # type: ignore[union-attr]
    inputs = read_report_inputs(db_path, spec)
    target = report_dir or (spec.directory / "report" if spec is not None else db_path.parent / "report")
    chosen = parse_formats(formats)
    result = write_report(inputs.records, target, inputs.widths, chosen, plots, inputs.configs)
    failed = [
        {"run_id": row["run_id"], "run": describe_row(row), "error": row["error"]} for row in inputs.failed
    ]
    if as_json:
        print_json(
            {"report_dir": str(target), "runs": len(inputs.records), "failed": failed, **result.to_dict()}
        )
        return
    for section in result.sections:
        print_table(section.table, section.title)
    if result.wins is not None and result.wins.comparisons:
        console.print(result.wins.summary())
    if result.draw_selection.slots:
        console.print(f"hyper-parameter search: {result.draw_selection.summary()}")
    tables = len(result.files) - 1  # besides runs.csv
    console.print(
        f"wrote {tables} table file(s), {len(result.plots)} plot(s) and runs.csv (every run, one row each) "
        f"to {target}"
    )
    if failed:  # in no table: say so, or a table of survivors passes for the whole sweep
        console.print(f"{len(failed)} run(s) failed and are in no table (`dgprune status --errors`: why):")
        for row in failed[:10]:
            console.print(f"  failed {row['run_id']}: {row['run']}: {last_line(row['error'])}", markup=False)
        if len(failed) > 10:
            console.print(f"  and {len(failed) - 10} more")


def status_dict(spec: Sweep, state: SweepStatus, now: float | None = None) -> dict[str, Any]:
    """`dgprune status --json`: what the status lines say, as data."""
    now = time.time() if now is None else now
    remaining = state.counts["pending"] + state.counts["running"] + state.counts["stale"]
    return {
        "sweep": spec.name,
        "database": str(spec.db_path),
        "total": state.total,
        "counts": state.counts,
        "finished": remaining == 0,
        "eta_s": state.eta_s,
        "parallel": state.parallel,
        "running": [
            {
                "run_id": row["run_id"],
                "run": describe_row(row),
                "running_s": now - row["started_at"] if row.get("started_at") else None,
            }
            for row in state.running
        ],
        "stale": [
            {"run_id": row["run_id"], "run": describe_row(row), "reason": row["stale_reason"]}
            for row in state.stale
        ],
        "failed": [
            {"run_id": row["run_id"], "run": describe_row(row), "error": row["error"]} for row in state.failed
        ],
    }


class SweepProgress:
    """A bar of the sweep's runs finished (done or failed) with counts and the ETA of `dgprune
    status`, refreshed from the database every ``every_s`` seconds by a thread (workers in other
    processes or on Ray report there too); a failed run leaves a line above the bar."""

    def __init__(
        self,
        spec: Sweep,
        console: Console,
        every_s: float = 2.0,
        status: Callable[[Sweep], SweepStatus] = sweep_status,
    ) -> None:
        self.spec, self.console, self.every_s, self._status = spec, console, every_s, status
        self.progress = Progress(
            TextColumn(f"sweep {spec.name}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
        self.task = self.progress.add_task("runs", total=None, info="")
        self._reported: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SweepProgress:
        self.progress.start()
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self.poll()  # the final counts
        self.progress.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(Exception):  # e.g. the database busy: the next poll retries
                self.poll()

    def poll(self) -> None:
        state = self._status(self.spec)
        c = state.counts
        for row in state.failed:
            if row["run_id"] not in self._reported:
                self._reported.add(row["run_id"])
                self.progress.console.print(
                    f"failed {row['run_id']}: {describe_row(row)}: {last_line(row['error'])}",
                    markup=False,
                    highlight=False,
                )
        if c["pending"] + c["running"] + c["stale"] == 0:
            eta = "finished"
        elif state.eta_s is None:
            eta = "ETA after the first run of each kind"
        else:
            eta = f"ETA {duration(state.eta_s)} at {state.parallel} worker(s)"
        stale = f" | stale {c['stale']}" if c["stale"] else ""
        info = f"done {c['done']} | failed {c['failed']} | running {c['running']}{stale} | {eta}"
        self.progress.update(self.task, total=state.total, completed=c["done"] + c["failed"], info=info)
        self.progress.refresh()


# In the order of `dgprune --help`.
COMMANDS: list[tuple[str, Callable[..., None]]] = [("sweep", sweep), ("status", status), ("report", report)]
