"""How a command ends: exit statuses, one-line errors, and what Ctrl-C says.

Exit status: 0 done, 1 a run failed, 2 a usage or config error, 130 Ctrl-C. Every error a user can
fix is one line starting with ``error:`` (no traceback); any other exception is a bug and keeps it.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer

from dgprune.errors import DgpruneError
from dgprune.training.checkpoint import CHECKPOINT_FILE

# What `run_app` prints after "interrupted:" on Ctrl-C; a command that can resume sets it when it starts.
_interrupt_note: list[Callable[[], str]] = [
    lambda: "stopped; finished work is kept, run the same command again to go on"
]


def on_interrupt(note: Callable[[], str]) -> None:
    _interrupt_note[0] = note


def stage_note(stage: str, out: Path) -> Callable[[], str]:
    """Where an interrupted pretrain/prune stage left its checkpoint."""

    def note() -> str:
        path = out / CHECKPOINT_FILE
        if path.is_file():
            return f"{stage} stopped; checkpoint {path}; run the same command again to resume from it"
        return f"{stage} stopped before its first checkpoint ({path}); the same command starts it again"

    return note


def grid_note(out: Path) -> Callable[[], str]:
    """Finished models of a demo/table2 grid stay in ``out``; the running stage's checkpoint too."""

    def note() -> str:
        found = sorted(out.rglob(CHECKPOINT_FILE), key=lambda p: p.stat().st_mtime) if out.is_dir() else []
        where = f"checkpoint {found[-1]}" if found else "no checkpoint of the running stage yet"
        return f"finished models are kept in {out}, {where}; run the same command again to resume"

    return note


def run_app(app: Callable[..., Any]) -> NoReturn:
    """Run the command line ``app`` and exit with its status (see the module docstring)."""
    warnings.showwarning = _warning_line
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:
        code = 130
    except DgpruneError as err:
        fail(str(err), getattr(err, "exit_code", 2))
    except typer.Exit as done:  # raised through by some typer versions; returned by others
        code = done.exit_code
    except typer.Abort as abort:  # older typer (click's main) turns Ctrl-C into Abort
        if isinstance(abort.__cause__ or abort.__context__, KeyboardInterrupt):
            code = 130
        else:
            fail("aborted (end of input)", 1)
    except OSError as err:  # e.g. disk full or permission denied while a run writes its files
        where = f"{err.filename}: " if err.filename else ""
        fail(f"{where}{err.strerror or err}", 1)
    except Exception as err:
        if not isinstance(err, _click_exception_types()):
            raise  # a bug: keep the traceback
        _usage_error(err)
    if code == 130:
        print(f"interrupted: {_interrupt_note[0]()}", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """A library warning (a budget extended, a file skipped) as one ``warning:`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def fail(message: str, code: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _click_exception_types() -> tuple[type, ...]:
    """The ClickException class of the installed typer, without importing click.

    Recent typer vendors click (``typer._click``), older typer uses click itself: either way it is
    a base of ``typer.BadParameter``.
    """
    return tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_error(err: Exception) -> NoReturn:
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
    fail(message, exit_code)
