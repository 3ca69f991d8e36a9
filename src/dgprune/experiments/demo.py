"""The ``demo`` and ``table2`` commands: the presets ``presets/demo.yaml`` and ``presets/table2.yaml``
run by the sweep machinery (``experiments/sweep``) in this process, with the command's options on top.

- the **demo** — the paper's Table 1 protocol in small: for every target domain, pretrain once with
  ERM, then prune with Taylor-FO and IoR to keep 50% and 30% of the filters;
- **table2** — the paper's Table 2 protocol: pretrain with ERM, CORAL and Mixup, prune to keep 50%
  (Taylor, as the paper) with ERM fine-tuning, and also with the pretraining algorithm's own objective.

The output directory is a sweep directory (``results.sqlite``, ``pretrained/<id>/``, ``runs/<id>/``,
see docs/experiments.md) plus ``results.json``, the records in the table's order. A rerun resumes
from the database: finished models are read back, an interrupted stage continues from its checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dgprune.errors import RunFailedError
from dgprune.experiments.config import RunConfig, build_config
from dgprune.experiments.records import ResultRecord, write_records
from dgprune.experiments.sweep import (
    SAME_AS_PRETRAIN,
    StageHooks,
    Sweep,
    SweepFile,
    dataset_of,
    preset_file,
    run_sweep,
    sweep_records,
)
from dgprune.training.progress import ProgressCallback

DEMO_PRESET = "demo"
TABLE2_PRESET = "table2"
RESULTS_FILE = "results.json"

_DEMO = preset_file(DEMO_PRESET)
_TABLE2 = preset_file(TABLE2_PRESET)
# The demo's budgets (data, model, pretraining and pruning settings): the base of presets/demo.yaml.
DEMO_SETTINGS: dict[str, Any] = _DEMO.base


def _axis(spec: SweepFile, key: str) -> tuple:
    value = spec.grids[0][key]
    return tuple(value) if isinstance(value, list) else (value,)


DEMO_KEEP_RATIOS: tuple[float, ...] = _axis(_DEMO, "prune.keep_ratio")
DEMO_CRITERIA: tuple[str, ...] = _axis(_DEMO, "prune.criterion")
TABLE2_ALGORITHMS: tuple[str, ...] = _axis(_TABLE2, "pretrain.algorithm")

ProgressFactory = Callable[[str], ProgressCallback | None]

# The axes of a preset's grid, outermost first: the order of the records (and of the table's rows).
_ORDER = ("target", "pretrain.algorithm", "prune.keep_ratio", "prune.criterion", "prune.finetune_algorithm")


def demo_base_config(
    seed: int | None,
    device: str | None,
    overrides: dict[str, Any] | None,
    config_path: Path | None,
    sets: Sequence[str] | None,
    preset: str = DEMO_PRESET,
) -> RunConfig:
    """The preset's base <- config file <- ``--set`` items <- ``overrides``, seed and device (None: not
    given). The grid's own axes (targets, algorithms, criteria, keep ratios) are set per run on top."""
    overrides = {**(overrides or {}), "seed": seed, "device": device}
    return build_config(config_path, overrides, base=preset_file(preset).base, sets=sets)


def run_demo(
    out_dir: Path,
    targets: list[str] | None = None,
    keep_ratios: tuple[float, ...] = DEMO_KEEP_RATIOS,
    criteria: tuple[str, ...] = DEMO_CRITERIA,
    seed: int | None = None,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress_for: ProgressFactory = lambda label: None,
    config_path: Path | None = None,
    sets: Sequence[str] | None = None,
    tensorboard: Path | None = None,
) -> list[ResultRecord]:
    """Run (or resume) the demo grid into the sweep directory ``out_dir``; writes ``out_dir/results.json``.

    ``seed``/``device`` None: the config file's or ``--set``'s, else 0 and auto."""
    base = demo_base_config(seed, device, overrides, config_path, sets)
    axes = {"prune.keep_ratio": list(keep_ratios), "prune.criterion": list(criteria)}
    return run_preset(DEMO_PRESET, out_dir, base, targets, axes, progress_for, tensorboard)


def run_table2(
    out_dir: Path,
    targets: list[str] | None = None,
    algorithms: tuple[str, ...] = TABLE2_ALGORITHMS,
    keep_ratio: float = 0.5,
    criterion: str = "taylor",
    seed: int | None = None,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress_for: ProgressFactory = lambda label: None,
    config_path: Path | None = None,
    sets: Sequence[str] | None = None,
    tensorboard: Path | None = None,
) -> list[ResultRecord]:
    """Pretrain with each algorithm; prune with ERM fine-tuning and with the algorithm's own objective."""
    base = demo_base_config(seed, device, overrides, config_path, sets, TABLE2_PRESET)
    axes = {
        "pretrain.algorithm": list(algorithms),
        "prune.keep_ratio": [keep_ratio],
        "prune.criterion": [criterion],
    }
    return run_preset(TABLE2_PRESET, out_dir, base, targets, axes, progress_for, tensorboard)


def run_preset(
    preset: str,
    out_dir: Path,
    base: RunConfig,
    targets: list[str] | None,
    axes: dict[str, list[Any]],
    progress_for: ProgressFactory = lambda label: None,
    tensorboard: Path | None = None,
) -> list[ResultRecord]:
    """The preset's grid, with ``axes`` (grid key -> values) and ``targets`` (None: the preset's) in
    place of its own, on ``base``, run by ``run_sweep`` in this process with one worker and this
    process's torch threads. Returns the records in grid order (target, algorithm, keep ratio,
    criterion, fine-tuning objective: each in the order of its values, the dense model first)."""
    spec = preset_file(preset)
    tree = base.model_dump(mode="json")
    grid = {**spec.grids[0], **{key: _canonical(tree, key, values) for key, values in axes.items()}}
    if targets is not None:
        grid["target"] = [str(t) for t in targets]
        for target in grid["target"]:
            dataset_of(base).domain(target)  # an unknown name: DataError naming the valid ones
    options = spec.sweep.model_copy(update={"workers": 1, "threads": torch.get_num_threads()})
    sweep = Sweep(preset, out_dir, tree, [grid], options)
    configs = sweep.configs()  # every config is validated (unknown target...) before any work
    axis_values = {key: _as_list(grid.get(key)) for key in _ORDER}
    axis_values["target"] = _domains_in_order(grid, configs)

    def rank(config: RunConfig) -> tuple[int, ...]:
        return tuple(_position(config, key, axis_values[key]) for key in _ORDER)

    def label(config: RunConfig, dense: bool) -> str:
        head = f"{config.target} {config.pretrain.algorithm}"
        return head if dense else f"{head} {variant_name(config)}"

    def tensorboard_for(config: RunConfig, dense: bool) -> Path | None:
        if tensorboard is None:
            return None
        return (
            tensorboard
            / f"target-{config.target}"
            / config.pretrain.algorithm
            / ("pretrained" if dense else variant_name(config))
        )

    hooks = StageHooks(lambda config, dense: progress_for(f"[{label(config, dense)}] "), tensorboard_for)
    outcome = run_sweep(sweep, quiet=True, hooks=hooks)
    by_id = {r.run_id: r for r in sweep_records(sweep, sweep.db_path)}
    if outcome.failed or len(by_id) < len(sweep.run_ids()):
        first = outcome.failed[0] if outcome.failed else {"run_id": "?", "error": "not finished"}
        reason = (first["error"] or "").strip().splitlines() or ["(no error text)"]
        raise RunFailedError(
            f"{len(sweep.run_ids()) - len(by_id)} run(s) of the {preset} did not finish, e.g. "
            f"{first['run_id']}: {reason[-1]}; the same command runs them again"
        )
    ordered: list[str] = []
    for config in sorted(configs, key=rank):
        for run_id in (config.pretrain_id(), config.run_id()):
            if run_id not in ordered:
                ordered.append(run_id)
    records = [by_id[run_id] for run_id in ordered]
    write_records(out_dir / RESULTS_FILE, records)
    return records


def variant_name(config: RunConfig) -> str:
    """A pruning run of a preset by what its grid varies, e.g. ``taylor-keep0.5`` or
    ``taylor-keep0.5-ft-coral`` (fine-tuned with CORAL's objective)."""
    prune = config.prune
    name = f"{prune.criterion}-keep{prune.keep_ratio:g}"
    if prune.target_access != "none":  # it saw the target's images: never shown as a source-only run
        name += f"-{prune.target_access}-target"
    return name if prune.finetune_algorithm == "erm" else f"{name}-ft-{prune.finetune_algorithm}"


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _canonical(tree: dict[str, Any], key: str, values: list[Any]) -> list[Any]:
    """The values as a validated config spells them (``ERM`` -> ``erm``), so that they order the runs."""
    section, field = key.split(".")
    spelled = []
    for value in values:
        config = build_config(base=tree, overrides={section: {field: value}})
        spelled.append(getattr(getattr(config, section), field))
    return spelled


def _domains_in_order(grid: dict[str, Any], configs: list[RunConfig]) -> list[str]:
    """The grid's targets in the given order (``all``: the dataset's order, which ``configs`` keep)."""
    listed = _as_list(grid.get("target"))
    if listed and listed != ["all"]:
        return [str(t) for t in listed]
    return list(dict.fromkeys(c.target for c in configs))


def _position(config: RunConfig, key: str, values: list[Any]) -> int:
    if key == "target":
        value: Any = config.target
    else:
        section, field = key.split(".")
        value = getattr(getattr(config, section), field)
    if value not in values and key == "prune.finetune_algorithm" and value == config.pretrain.algorithm:
        value = SAME_AS_PRETRAIN
    return values.index(value) if value in values else len(values)
