"""A report Table as Markdown, CSV or LaTeX (booktabs)."""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgprune.errors import ConfigError
from dgprune.experiments.records import ResultRecord
from dgprune.report.adabn import adabn_table
from dgprune.report.cells import Stat
from dgprune.report.flat import RUNS_FILE, write_runs_csv
from dgprune.report.loso import loso_selection_table, loso_table
from dgprune.report.paired import PairedComparison, dense_comparisons, paired_comparisons, paired_table
from dgprune.report.per_source import per_source_table
from dgprune.report.selection import DrawSelection, select_draws_by_validation
from dgprune.report.table1 import Table, table1
from dgprune.report.table2 import table2
from dgprune.report.wins import WinCount, count_wins

FORMATS = ("md", "csv", "tex")


def parse_formats(text: str) -> tuple[str, ...]:
    """Comma-separated table formats (``md,csv``), each one of FORMATS."""
    chosen = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown format(s) {', '.join(unknown)}; valid: {', '.join(FORMATS)}")
    return chosen


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "α": r"$\alpha$", "−": "-"}


def to_markdown(table: Table) -> str:
    return table.to_markdown() + "\n"


def _csv_number(value: float) -> str:
    return f"{value:.10g}" if math.isfinite(value) else ""


def to_csv(table: Table) -> str:
    """One header line, one line per row. A table with numbers (``Table.values``) gives numbers: a
    column of means ± standard errors becomes three, ``<column>`` (the mean), ``<column> se`` (empty
    for one run) and ``<column> n`` (the runs averaged); other numbers as they are (percent where the
    table shows a percentage), labels as shown. A table without them: the cells as shown."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if table.values is None:
        writer.writerow(table.header)
        writer.writerows(table.rows)
        return buffer.getvalue()
    stat_columns = {j for row in table.values for j, v in enumerate(row) if isinstance(v, Stat)}
    header = []
    for j, name in enumerate(table.header):
        header += [name, f"{name} se", f"{name} n"] if j in stat_columns else [name]
    writer.writerow(header)
    for shown, numbers in zip(table.rows, table.values, strict=True):
        row: list[str | int] = []
        for j, (text, value) in enumerate(zip(shown, numbers, strict=True)):
            if j in stat_columns:
                stat = value if isinstance(value, Stat) else None
                row += ["", "", 0] if stat is None else [_csv_number(stat.mean), _csv_number(stat.se), stat.n]
            elif value is None:
                row.append(text)
            else:
                row.append(_csv_number(float(value)))
        writer.writerow(row)
    return buffer.getvalue()


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    for symbol, latex in _LATEX_SYMBOLS.items():
        out = out.replace(symbol, latex)
    return out


def to_latex(table: Table, caption: str | None = None, label: str | None = None) -> str:
    """A ``table`` environment with a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    align = "l" + "r" * (len(table.header) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\small"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [rf"\begin{{tabular}}{{{align}}}", r"\toprule"]
    lines.append(" & ".join(latex_escape(h) for h in table.header) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(latex_escape(cell) for cell in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def render(table: Table, fmt: str, caption: str | None = None) -> str:
    if fmt == "md":
        return to_markdown(table)
    if fmt == "csv":
        return to_csv(table)
    if fmt == "tex":
        return to_latex(table, caption)
    raise ValueError(f"unknown table format {fmt!r}; valid: {', '.join(FORMATS)}")


def write_table(
    table: Table, stem: Path, formats: tuple[str, ...] = FORMATS, caption: str | None = None
) -> list[Path]:
    """Write ``stem.md``, ``stem.csv``, ``stem.tex`` (those asked for); returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        path.write_text(render(table, fmt, caption))
        paths.append(path)
    return paths


# -- the whole report of a sweep -------------------------------------------------------------------


@dataclass
class ReportSection:
    title: str
    table: Table
    stem: str  # file name without extension


@dataclass
class SweepReport:
    sections: list[ReportSection] = field(default_factory=list)
    wins: WinCount | None = None
    plots: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    # Every criterion against Taylor-FO, paired by seed and target: cross-domain (always), and
    # intra-domain too when the report has the criteria-study section.
    paired: list[PairedComparison] = field(default_factory=list)
    # Hyper-parameter draws chosen by training-domain validation (report/selection.py).
    draw_selection: DrawSelection = field(default_factory=DrawSelection)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (`dgprune report --json`): tables as header + rows of the cells
        shown, the win count, the paired comparisons as numbers (NaN as null) and the files written."""
        wins = None
        if self.wins is not None and self.wins.comparisons:
            table = self.wins.table()
            wins = {"summary": self.wins.summary(), "header": table.header, "rows": table.rows}
        return {
            "sections": [
                {"title": s.title, "stem": s.stem, "header": s.table.header, "rows": s.table.rows}
                for s in self.sections
            ],
            "wins": wins,
            "paired": [_paired_dict(c) for c in self.paired],
            "files": [str(p) for p in self.files],
            "plots": [str(p) for p in self.plots],
            "hparam_draws": {
                "slots": self.draw_selection.slots,
                "draws": self.draw_selection.draws,
                "kept": self.draw_selection.kept,
            },
        }

    def to_markdown(self) -> str:
        parts = []
        for section in self.sections:
            parts += [f"### {section.title}", "", section.table.to_markdown(), ""]
        if self.wins is not None and self.wins.comparisons:
            parts += [f"**{self.wins.summary()}**", ""]
        if self.draw_selection.slots:
            parts += [f"Hyper-parameter search: {self.draw_selection.summary()}.", ""]
        return "\n".join(parts)


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _paired_dict(c: PairedComparison) -> dict[str, Any]:
    dataset, model, algorithm, finetune, keep_ratio = c.setting
    low, high = c.interval
    return {
        "dataset": dataset,
        "model": model,
        "algorithm": algorithm,
        "finetune_algorithm": finetune,
        "keep_ratio": keep_ratio,
        "challenger": c.challenger,
        "baseline": c.baseline,
        "metric": c.metric,
        "n": c.n,
        "mean_difference_points": _number(c.mean),
        "ci95_points": [_number(low), _number(high)],
        "p_t": _number(c.p_t),
        "p_wilcoxon": _number(c.p_wilcoxon),
        "p_holm": _number(c.p_holm),
        "verdict": c.verdict,
        "differences_points": c.differences,
    }


def _study_sections(records: list[ResultRecord], report: SweepReport) -> list[ReportSection]:
    """A criteria study's other views: every criterion against the dense model, and against Taylor-FO
    under the two model-selection rules (DomainBed's training-domain validation vs test-domain
    oracle) on the target's test half."""
    sections = []
    cross = dense_comparisons(records, _label)
    if cross:
        intra = dense_comparisons(records, _label, metric="intra_acc")
        report.paired += cross + intra
        title = (
            "Every criterion against the dense model it pruned (pruned − dense, same seed and target): "
            "mean difference in points, 95% CI, Wilcoxon p (Holm over the criteria of a row group)"
        )
        sections.append(ReportSection(title, paired_table(cross, intra), "paired_vs_dense"))
    selected = paired_comparisons(records, _label, metric="cross_test_acc")
    oracle = paired_comparisons(records, _label, metric="oracle_cross_test_acc")
    if selected and oracle:
        report.paired += selected + oracle
        title = (
            "Every criterion against Taylor-FO on the target's test half, by model-selection rule: the "
            "checkpoint chosen on the sources' validation split (what dgprune ships) and the one a "
            "test-domain oracle would choose (best on the target's validation half: reads target labels, "
            "an upper bound for reporting only)"
        )
        names = ("cross test half, source-val selection", "cross test half, oracle selection")
        sections.append(
            ReportSection(title, paired_table(selected, oracle, names), "paired_vs_taylor_selection")
        )
    return sections


def _slug(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9.]+", "_", p).strip("_") for p in parts if p)


def _table1_groups(records: list[ResultRecord]) -> dict[tuple[str, str, str], list[ResultRecord]]:
    """Per dataset × model × pretraining algorithm: the dense model and its ERM-fine-tuned prunings,
    for the algorithms that were pruned in more than one way (or the only algorithm)."""
    groups: dict[tuple[str, str, str], list[ResultRecord]] = defaultdict(list)
    for r in records:
        if r.criterion == "none" or (r.finetune_algorithm or "erm") == "erm":
            groups[(r.dataset, r.model, r.algorithm)].append(r)
    algorithms_per_model: dict[tuple[str, str], int] = defaultdict(int)
    for dataset, model, _ in groups:
        algorithms_per_model[(dataset, model)] += 1
    chosen = {}
    for key, group in groups.items():
        variants = {(_label(r), r.keep_ratio) for r in group if r.criterion != "none"}
        if variants and (len(variants) > 1 or algorithms_per_model[key[:2]] == 1):
            chosen[key] = group
    return chosen


def _table2_groups(records: list[ResultRecord]) -> dict[tuple[str, str], list[ResultRecord]]:
    """Per dataset × model with several pretraining algorithms: the dense models and the prunings
    with the (criterion, keep ratio) that most algorithms share (ties: Taylor, then the larger ratio)."""
    by_model: dict[tuple[str, str], list[ResultRecord]] = defaultdict(list)
    for r in records:
        by_model[(r.dataset, r.model)].append(r)
    chosen = {}
    for key, group in by_model.items():
        algorithms = {r.algorithm for r in group}
        if len(algorithms) < 2:
            continue
        coverage: dict[tuple[str, float], set[str]] = defaultdict(set)
        for r in group:
            if r.criterion != "none":
                coverage[(r.criterion, r.keep_ratio)].add(r.algorithm)
        if not coverage:
            continue
        criterion, ratio = max(coverage, key=lambda k: (len(coverage[k]), k[0] == "taylor", k[1], k[0]))
        chosen[key] = [
            r
            for r in group
            if r.criterion == "none"
            or (r.criterion == criterion and r.keep_ratio == ratio and _label(r) == criterion)  # defaults
        ]
    return chosen


def _per_source_groups(records: list[ResultRecord]) -> dict[tuple[str, str, str], list[ResultRecord]]:
    """Per dataset × model × pretraining algorithm: every run (the records that name their source
    domains' val splits, i.e. all of them)."""
    groups: dict[tuple[str, str, str], list[ResultRecord]] = defaultdict(list)
    for r in records:
        if "val" in r.per_domain_split.values():
            groups[(r.dataset, r.model, r.algorithm)].append(r)
    return groups


TRANSDUCTIVE_MARK = "[unlabeled target]"  # criterion_label's mark of a run that saw the target's images


def _label(r: ResultRecord) -> str:
    return r.label  # marked [unlabeled target] when the run saw the target's images


def cell_key(r: ResultRecord) -> tuple:
    """What places a run in the tables: everything the layouts show, plus seed and target."""
    return (
        r.dataset,
        r.model,
        r.algorithm,
        r.finetune_algorithm,
        r.criterion,
        _label(r),
        r.keep_ratio,
        r.target_domain,
        r.seed,
    )


def check_one_run_per_cell(records: list[ResultRecord], configs: dict[str, dict] | None = None) -> None:
    """Refuse runs that the tables cannot tell apart (e.g. a sweep over ``prune.round_to`` or
    ``pretrain.lr``): averaging them into one cell would be silently wrong. ``configs`` (run id ->
    resolved config) lets the error name the settings in which they differ."""
    seen: dict[tuple, ResultRecord] = {}
    for record in records:
        other = seen.setdefault(cell_key(record), record)
        if other is record:
            continue
        keys = _differing_keys((configs or {}).get(other.run_id), (configs or {}).get(record.run_id))
        differ = ", ".join(keys) or "settings the tables do not show"
        raise ConfigError(
            f"runs {other.run_id} and {record.run_id} fall in the same table cell "
            f"(target {record.target_domain}, seed {record.seed}, {record.algorithm}, {record.criterion}, "
            f"keep {record.keep_ratio:g}) but differ in {differ}; "
            "a report shows one run per cell: report such variants from separate sweep files "
            "(`dgprune report FILE` reports only that file's runs)"
        )


def _differing_keys(a: dict | None, b: dict | None, prefix: str = "") -> list[str]:
    if a is None or b is None:
        return []
    keys = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += _differing_keys(left, right, f"{prefix}{key}.")
        elif left != right:
            keys.append(f"{prefix}{key}")
    return keys


def write_report(
    records: list[ResultRecord],
    out_dir: Path,
    widths: dict[str, list[list]] | None = None,
    formats: tuple[str, ...] = FORMATS,
    plots: bool = True,
    configs: dict[str, dict] | None = None,
) -> SweepReport:
    """Table 1 and Table 2 layouts (mean ± standard error over seeds), per-source-domain tables,
    IoR-vs-Taylor wins, plots, and every run as one row of numbers.

    Writes ``out_dir/<table>.{md,csv,tex}``, ``out_dir/wins.*``, ``out_dir/report.md``, PNGs and
    ``out_dir/runs.csv`` (every run of ``records``, report.flat; written first, also when the tables
    are refused). Where runs differ only in their pretraining hyper-parameters (a ``hparams_seed``
    search), each slot's best draw by source validation accuracy is kept (``select_draws_by_validation``);
    other runs that would share a cell are an error (``check_one_run_per_cell``).
    """
    every_run = records
    records, selection = select_draws_by_validation(records, configs)
    runs_csv = write_runs_csv(out_dir / RUNS_FILE, every_run, {r.run_id for r in records})
    try:
        check_one_run_per_cell(records, configs)
    except ConfigError as err:
        raise ConfigError(f"{err}; every run is in {runs_csv} all the same") from None
    from dgprune.report.plots import plot_accuracy_vs_filters, plot_layer_widths  # matplotlib: lazy

    report = SweepReport(draw_selection=selection)
    out_dir.mkdir(parents=True, exist_ok=True)
    for (dataset, model, algorithm), group in sorted(_table1_groups(records).items()):
        seeds = len({r.seed for r in group})
        title = (
            f"Table 1 layout: {model} on {dataset}, {algorithm.upper()} pretraining — top-1 accuracy (%), "
            f"mean ± standard error over {seeds} seed(s)"
        )
        stem = _slug("table1", dataset, model, algorithm)
        report.sections.append(ReportSection(title, table1(group), stem))
        if plots:
            plot_title = f"{model} on {dataset}, {algorithm.upper()} pretraining"
            report.plots.append(
                plot_accuracy_vs_filters(
                    group,
                    out_dir / f"{_slug('accuracy_vs_filters', dataset, model, algorithm)}.png",
                    plot_title,
                )
            )
            layer_plot = plot_layer_widths(
                group,
                widths or {},
                out_dir / f"{_slug('layer_widths', dataset, model, algorithm)}.png",
                plot_title,
            )
            if layer_plot is not None:
                report.plots.append(layer_plot)
    for (dataset, model), group in sorted(_table2_groups(records).items()):
        seeds = len({r.seed for r in group})
        pruned = next(r for r in group if r.criterion != "none")
        title = (
            f"Table 2 layout: {model} on {dataset}, {pruned.criterion} pruning to {pruned.keep_ratio:.0%} — "
            f"top-1 accuracy (%), Δ = pruned − dense (points), mean ± standard error over {seeds} seed(s)"
        )
        report.sections.append(ReportSection(title, table2(group), _slug("table2", dataset, model)))
    for (dataset, model, algorithm), group in sorted(_per_source_groups(records).items()):
        seeds = len({r.seed for r in group})
        title = (
            f"Per source domain: {model} on {dataset}, {algorithm.upper()} pretraining — accuracy (%) on "
            f"each source domain's val split, mean ± standard error over {seeds} seed(s)"
        )
        stem = _slug("per_source", dataset, model, algorithm)
        report.sections.append(ReportSection(title, per_source_table(group), stem))
    if (transductive := adabn_table(records)) is not None:
        title = (
            "Runs that saw the target's images (prune.target_access unlabeled) beside AdaBN: cross-domain "
            "accuracy (%) as pruned, after AdaBN, and the dense model's after AdaBN; mean ± standard error "
            "over the (seed, target) runs"
        )
        report.sections.append(ReportSection(title, transductive, "adabn"))
    if (loso := loso_table(records)) is not None:
        title = (
            "Leave-one-source-out validation: with the true target left out of the data, each other domain "
            "in turn is the pseudo-target; each candidate's accuracy on it (%), mean ± standard error over "
            "the (seed, pseudo-target) runs, and the candidate it chooses (no true-target label read); "
            "beside it, for reporting only, each candidate's accuracy on the true target in the full "
            "benchmark's runs"
        )
        report.sections.append(ReportSection(title, loso, "loso_choice"))
    if (selection := loso_selection_table(records)) is not None:
        title = (
            "Choosing the method by leave-one-source-out validation, against always taking one candidate "
            "and against the best candidate per target (an oracle that reads the target's labels): "
            "cross-domain accuracy (%) on the true targets, mean ± standard error over the targets"
        )
        report.sections.append(ReportSection(title, selection, "loso_selection"))
    report.wins = count_wins(records)
    cross = paired_comparisons(records, _label)
    report.paired = list(cross)
    if any(c.challenger != "ior" for c in cross):  # more than the paper's pair: a criteria study
        intra = paired_comparisons(records, _label, metric="intra_acc")
        report.paired += intra
        title = (
            "Every criterion against Taylor-FO, paired by seed and target domain: mean difference in "
            "points, 95% CI, Wilcoxon signed-rank p (Holm-adjusted over the criteria of a row group); "
            "'better'/'worse' = the CI excludes 0"
        )
        if any(TRANSDUCTIVE_MARK in c.challenger for c in cross):
            title += (
                f"; rows marked {TRANSDUCTIVE_MARK} saw the target's images (prune.target_access unlabeled), "
                "their Taylor-FO baseline did not: a transductive method against a source-only one"
            )
        report.sections.append(ReportSection(title, paired_table(cross, intra), "paired_vs_taylor"))
        report.sections += _study_sections(records, report)
    for section in report.sections:
        report.files += write_table(section.table, out_dir / section.stem, formats, section.title)
    if report.wins.comparisons:
        report.files += write_table(report.wins.table(), out_dir / "wins", formats, report.wins.summary())
    summary = out_dir / "report.md"
    summary.write_text(report.to_markdown())
    report.files += [summary, runs_csv]
    return report
