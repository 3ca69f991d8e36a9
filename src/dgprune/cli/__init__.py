"""Command line: a thin layer over dgprune's library. Every command is one call into it.

The commands, by theme: `presets` (demo, table2), `runs` (pretrain, prune, evaluate, analyze, plot,
export, config), `sweeps` (sweep, status, report). What they share is defined once: `options`
(the options and option groups, e.g. the data options), `output` (console, tables, how a run is
described), `runtime` (progress display, TensorBoard) and `exits` (exit statuses, one-line errors,
Ctrl-C). See docs/architecture.md.
"""

from __future__ import annotations

from typing import Annotated

import typer

from dgprune import __version__
from dgprune.cli import presets, runs, sweeps
from dgprune.cli.exits import run_app
from dgprune.cli.runtime import stop_progress

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Domain-generalized filter pruning: Taylor-FO and IoR criteria, leave-one-domain-out evaluation.",
)


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
    ctx.call_on_close(stop_progress)  # progress bars end with the command, whatever way it ends


for _name, _command in (*presets.COMMANDS, *runs.COMMANDS, *sweeps.COMMANDS):
    app.command(_name)(_command)


def main() -> None:
    """Entry point (the `dgprune` script). Exit status: 0 done, 1 a run failed, 2 a usage or config
    error, 130 Ctrl-C.

    Every error a user can fix is one line starting with ``error:`` (no traceback).
    """
    run_app(app)


__all__ = ["app", "main"]
