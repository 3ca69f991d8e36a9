"""What the commands print, defined once: the console, tables, and how a run or a result is described."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from dgprune.experiments.records import ResultRecord, describe_run
from dgprune.report.table1 import Table

# Paper-style tables are wide: do not wrap them to 80 columns when output is not a terminal.
console = Console() if sys.stdout.isatty() else Console(width=240)

# Columns of names (left-aligned); every other column holds numbers (right-aligned).
LABEL_COLUMNS = frozenset({"Model", "Pretrain", "signal", "Target"})


def print_table(table: Table, title: str) -> None:
    """A table with box-drawing lines on a terminal; otherwise (a log, a pipe, CI) its title, then an
    aligned Markdown table in plain ASCII that greps, diffs and pastes into a document."""
    terminal = console.is_terminal
    rich_table = RichTable(
        title=title if terminal else None, box=box.SIMPLE_HEAVY if terminal else box.MARKDOWN
    )
    for column in table.header:
        rich_table.add_column(column, justify="left" if column in LABEL_COLUMNS else "right")
    for row in table.rows:
        rich_table.add_row(*(escape(cell) for cell in row))  # cells are text: "[unlabeled target]" too
    if terminal:
        console.print(rich_table)
        return
    with console.capture() as captured:
        console.print(rich_table)
    # The Markdown box draws its top and bottom edges as lines of spaces: leave them out.
    lines = [line.rstrip() for line in captured.get().splitlines() if line.strip()]
    print("\n".join([title, *lines]))


def print_plain(text: str) -> None:
    """A line printed as it is (no rich markup or highlighting: paths and names may hold brackets)."""
    console.print(text, markup=False, highlight=False)


def print_json(data: dict[str, Any]) -> None:
    """A command's --json output (or evaluate's): plain print, so nothing is wrapped or styled."""
    print(json.dumps(data, indent=1))


def grid_title(records: Sequence[ResultRecord]) -> str:
    """The title of a demo / table2 table."""
    first = records[0]
    return f"{first.model} on {first.dataset}: top-1 accuracy (%), seed {first.seed}"


def describe_record(record: ResultRecord) -> str:
    """The line that ends `dgprune pretrain` / `prune`: the model's accuracy, size and directory."""
    seen = "" if record.target_access == "none" else f" [{record.target_access} target]"
    adabn = "" if record.cross_acc_adabn is None else f" (AdaBN {100 * record.cross_acc_adabn:.2f}%)"
    return (
        f"target {record.target_domain}{seen}: intra {100 * record.intra_acc:.2f}%"
        f"  cross {100 * record.cross_acc:.2f}%{adabn}"
        f"  filters {record.filters_kept}/{record.filters_total}  params {record.params:,}"
        f"  MACs {record.macs:,}  -> {record.model_dir}"
    )


def describe_row(row: dict[str, Any]) -> str:
    """A run of a sweep by its settings, from its database row (`Store.rows`)."""
    return describe_run(
        target=row["target_domain"],
        seed=row["seed"],
        algorithm=row["algorithm"],
        criterion="none" if row["kind"] == "dense" else row["criterion"],
        criterion_params=row.get("criterion_params"),  # rows() fills it in, old databases too
        keep_ratio=row["keep_ratio"],
        finetune_algorithm=row.get("finetune_algorithm"),
        target_access=_target_access(row),
    )


def _target_access(row: dict[str, Any]) -> str:
    """prune.target_access of a sweep's run, from its stored config (absent in older ones: none)."""
    config = row.get("config")
    prune = config.get("prune") if isinstance(config, dict) else None
    return str(prune.get("target_access", "none")) if isinstance(prune, dict) else "none"


def last_line(text: str | None) -> str:
    """The last line of an error text (its traceback's message)."""
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "(no error text)"


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
