"""The sweep file: its schema, preset names and bases, grid expansion into validated runs, units.

A sweep file (YAML/TOML/JSON) has these sections::

    base_preset: demo                     # optional: start from that preset's base (presets/demo.yaml)
    base:  {data: {...}, model: {...}, pretrain: {...}, prune: {...}}   # a partial RunConfig
    grid:                                 # one mapping, or a list of mappings (their union)
      target: all                         # every domain of the dataset
      seed: [0, 1, 2]
      prune.criterion: [taylor, ior]
      prune.keep_ratio: [0.5, 0.3]
    sweep: {workers: auto, db: results.sqlite, dir: null}

``base_preset`` names a preset of ``experiments/presets/``; its ``base`` (its own ``base_preset``
resolved first) lies under this file's ``base``, which wins key by key (nested mappings are merged).
So the demo's budgets are written once, in ``presets/demo.yaml``, and every preset that uses them
says ``base_preset: demo``.

Each grid mapping is a Cartesian product over its keys (dotted paths into RunConfig; a scalar is a
one-value list). Every combination is resolved into a validated RunConfig; its id (``run_id()``) is
the hash of the whole resolved config, so it depends neither on key order nor on how the value was
given. Normalisations keep equivalent runs single: a criterion parameter that the grid varies
(``prune.criterion_params.alpha: [1, 2]``, or the older ``prune.alpha``) applies to the grid's
criteria that take it and is left out for the others (Taylor runs are not split by IoR's alpha), and
``prune.finetune_algorithm: same`` means the pretraining algorithm.

``hparams_seed: [0, 1, 2]`` is DomainBed's random hyper-parameter search as a grid axis: seed 0 keeps
the defaults; seed n > 0 draws the pretraining hyper-parameters (lr, weight decay, batch size and the
algorithm's own) from DomainBed's distributions for the dataset's kind
(``dgprune.algorithms.random_hparams``, docs/algorithms.md). Values the file sets explicitly (in
``base``, a ``base_preset`` or the grid) win over the draws. The drawn values are part of the run's
config, so they are in its id and its ``run.json``.

Runs that share a pretrained model (same ``pretrain_id()``) form one *unit*: a worker claims the
unit, pretrains once (or reuses the finished pretraining), then runs every pruning of it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dgprune.algorithms import pretrain_section, random_hparams
from dgprune.data import MultiDomainDataset, dataset_kind
from dgprune.errors import ConfigError
from dgprune.experiments.config import (
    SET_OPTION,
    RunConfig,
    apply_set_overrides,
    build_config,
    check_sections,
    format_validation_error,
    read_mapping,
    set_override_keys,
)
from dgprune.experiments.pipeline import load_experiment_dataset
from dgprune.experiments.store import RunSpec
from dgprune.pruning.criteria import REGISTRY, criterion_param_names
from dgprune.training.settings import PruneSettings

PRESETS_DIR = Path(__file__).parent.parent / "presets"
SAME_AS_PRETRAIN = "same"
DEFAULT_CRITERION: str = PruneSettings.model_fields["criterion"].default
DEFAULT_STALE_AFTER_S = 120.0
HPARAMS_SEED_KEY = "hparams_seed"  # a grid axis, not a config key: DomainBed's random search


class SweepOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int | Literal["auto"] = Field("auto", description="worker processes (auto: fits the machine)")
    threads: int | Literal["auto"] = Field(
        "auto", description="torch threads per worker (auto: cores // workers); fix it to compare numbers"
    )
    db: str = Field("results.sqlite", description="SQLite file, relative to the sweep directory")
    dir: str | None = Field(None, description="sweep directory, relative to the config file")
    heartbeat_s: float = Field(10.0, gt=0, description="seconds between a worker's liveness updates")
    stale_after_s: float = Field(
        DEFAULT_STALE_AFTER_S,
        gt=0,
        description="a running unit whose heartbeat is older than this is taken back (its worker is "
        "presumed dead; a dead process on this host is noticed at once)",
    )

    @model_validator(mode="after")
    def _stale_after_beats(self) -> SweepOptions:
        # Shorter, and a live worker's unit (one late beat) would be taken back and run twice at once.
        if self.stale_after_s <= 2 * self.heartbeat_s:
            raise ValueError(
                f"stale_after_s ({self.stale_after_s:g}) must be more than twice heartbeat_s "
                f"({self.heartbeat_s:g})"
            )
        return self

    @property
    def poll_s(self) -> float:
        return poll_interval(self.heartbeat_s, self.stale_after_s)


def poll_interval(heartbeat_s: float, stale_after_s: float) -> float:
    """How often an idle worker looks again for work and for units of dead workers."""
    return min(heartbeat_s, stale_after_s / 4, 5.0)


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_preset: str | None = Field(None, description="a preset whose base lies under this file's base")
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, Any] | list[dict[str, Any]] = Field(default_factory=dict)
    sweep: SweepOptions = SweepOptions()

    @property
    def grids(self) -> list[dict[str, Any]]:
        return self.grid if isinstance(self.grid, list) else [self.grid]


@dataclass
class Unit:
    """One pretrained model and every pruning run of it: the job a worker claims."""

    unit_id: str
    pretrain_config: RunConfig  # any run of the unit: its prune section does not matter here
    runs: list[RunConfig]

    def specs(self) -> list[RunSpec]:
        first = self.pretrain_config
        dense_config = first.model_dump(mode="json", exclude={"prune"})
        specs = [RunSpec(self.unit_id, self.unit_id, "dense", dense_config, run_labels(first, dense=True))]
        specs += [
            RunSpec(c.run_id(), self.unit_id, "pruned", c.model_dump(mode="json"), run_labels(c))
            for c in self.runs
        ]
        return specs


@dataclass
class Sweep:
    name: str
    directory: Path
    base: dict[str, Any]
    grids: list[dict[str, Any]]
    options: SweepOptions
    device: str | None = None  # overrides every config's device (not part of the ids)
    _configs: list[RunConfig] | None = field(default=None, repr=False)

    @property
    def db_path(self) -> Path:
        return self.directory / self.options.db

    def configs(self) -> list[RunConfig]:
        if self._configs is None:
            self._configs = expand_grid(self.base, self.grids)
        return self._configs

    def units(self) -> list[Unit]:
        return group_units(self.configs())

    def run_ids(self) -> list[str]:
        """Every row id of the sweep: the dense model of each unit, then its pruning runs."""
        return [spec.run_id for unit in self.units() for spec in unit.specs()]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_sweep_path(config: str) -> Path:
    """A sweep file path, or the name of a preset (e.g. ``paper_digits``)."""
    path = Path(config)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{config}.yaml"
    if preset.is_file():
        return preset
    names = ", ".join(preset_names())
    raise ConfigError(f"sweep config not found: {config} (not a file, nor a preset: {names})")


def read_sweep_file(path: Path) -> SweepFile:
    """A validated sweep file whose ``base`` includes its ``base_preset``'s (resolved, recursively)."""
    return _read_sweep_file(path, ())


def _read_sweep_file(path: Path, chain: tuple[str, ...]) -> SweepFile:
    try:
        spec = SweepFile.model_validate(read_mapping(path))
    except ValidationError as err:
        raise ConfigError(f"{path}: invalid sweep file:\n{format_validation_error(err)}") from None
    check_sections(spec.base, f"{path}: base")
    if spec.base_preset is not None:
        name = spec.base_preset
        preset = PRESETS_DIR / f"{name}.yaml"
        if not preset.is_file():
            raise ConfigError(
                f"{path}: base_preset: unknown preset {name!r}; valid: {', '.join(preset_names())}"
            )
        if name in chain:
            loop = " -> ".join([*chain, name])
            raise ConfigError(f"{path}: base_preset: {name!r} leads back to itself ({loop})")
        under = _read_sweep_file(preset, (*chain, name)).base
        spec.base = merge_tree(under, spec.base)
    return spec


def preset_file(name: str) -> SweepFile:
    """A preset's sweep file (base resolved), by name (e.g. ``demo``)."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(preset_names())}")
    return _read_sweep_file(path, (name,))


def merge_tree(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``under`` updated by ``over``, nested mappings merged key by key (``over`` wins, None included)."""
    merged = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_tree(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_sweep(
    config: str | Path, out: Path | None = None, device: str | None = None, sets: Sequence[str] | None = None
) -> Sweep:
    """Read and validate a sweep file (or preset name); expands nothing yet. ``sets``: ``--set KEY=VALUE``
    items that update the file's ``base``, which reaches the grid mappings that do not set the key
    themselves (a key that every grid mapping sets is an error: the grid would always win)."""
    path = resolve_sweep_path(str(config))
    spec = read_sweep_file(path)
    grids = spec.grids
    if sets:
        for key in set_override_keys(sets):
            # The base reaches only the grid mappings that do not set the key themselves; a key that
            # every mapping sets would change nothing, so it is refused rather than ignored.
            clashes = [clashing_key(grid, key) for grid in grids]
            if all(clashes):
                raise ConfigError(
                    f"{SET_OPTION} {key}: the grid of {path} sets {clashes[0]} for every run; "
                    "change it in the grid (or a copy of the file) instead"
                )
        spec.base = apply_set_overrides(spec.base, sets)
    if out is not None:
        directory = out
    elif spec.sweep.dir is not None:
        directory = path.parent / spec.sweep.dir
    elif path.parent == PRESETS_DIR:  # never write into the installed package
        directory = Path(f"{path.stem}-sweep")
    else:
        directory = path.parent / f"{path.stem}-sweep"
    return Sweep(path.stem, directory, spec.base, grids, spec.sweep, device)


def clashing_key(grid: dict[str, Any], key: str) -> str | None:
    """The grid key that overrides (or lies inside) the dotted ``key``, if the grid mapping has one."""
    inside = (g for g in sorted(grid) if g == key or g.startswith(key + ".") or key.startswith(g + "."))
    return next(inside, None)


# -- grid expansion ------------------------------------------------------------------------------


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.get(key)
        if child is not None and not isinstance(child, dict):  # `data: pacs` with `data.name`: say so
            raise ConfigError(f"grid key {dotted!r}: {key} is {child!r}, not a mapping")
        if child is None:
            child = node[key] = {}
        node = child
    node[leaf] = value


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(tree))


_dataset_cache: dict[str, MultiDomainDataset] = {}


def dataset_of(config: RunConfig) -> MultiDomainDataset:
    """The config's dataset, loaded once per process for every run (and unit) that uses the same data."""
    key = json.dumps(config.data.model_dump(mode="json"), sort_keys=True)
    if key not in _dataset_cache:
        _dataset_cache[key] = load_experiment_dataset(config)
    return _dataset_cache[key]


_PARAMS_KEY = "prune.criterion_params"


def _criterion_param(key: str) -> str | None:
    """The criterion parameter a grid key sets: ``prune.criterion_params.X``, or the older ``prune.alpha``."""
    if key == "prune.alpha":
        return "alpha"
    return key.removeprefix(_PARAMS_KEY + ".") if key.startswith(_PARAMS_KEY + ".") else None


def _foreign_param(param: str, criterion: Any, grid_criteria: list[str]) -> bool:
    """A parameter the grid varies for some of its criteria, but not one of ``criterion``'s."""
    if criterion not in REGISTRY or param in criterion_param_names(criterion):
        return False
    return any(param in criterion_param_names(c) for c in grid_criteria)


def expand_grid(base: dict[str, Any], grids: list[dict[str, Any]]) -> list[RunConfig]:
    """Every run of the grids (union of Cartesian products), validated and deduplicated by id.

    The order is canonical (seed, data, model, algorithm, target, keep ratio, criterion, ...), so it
    does not depend on the order of keys or values in the file.
    """
    by_id: dict[str, RunConfig] = {}
    for number, grid in enumerate(grids):
        keys = sorted(grid)
        values = [v if isinstance(v, list) else [v] for v in (grid[k] for k in keys)]
        for key, options in zip(keys, values, strict=True):
            if not options:
                raise ConfigError(f"grid {number}: {key!r} has an empty list of values")
        listed = values[keys.index("prune.criterion")] if "prune.criterion" in keys else []
        grid_criteria = [c for c in listed if c in REGISTRY]
        for combo in itertools.product(*values):
            tree = _deep_copy(base)
            targets: list[str] | None = None
            for key, value in zip(keys, combo, strict=True):
                if key == "target":
                    targets = None if value == "all" else [str(value)]
                    continue
                if key == HPARAMS_SEED_KEY:
                    continue
                if key != _PARAMS_KEY and _criterion_param(key) is None:
                    _set_dotted(tree, key, value)
            criterion = (tree.get("prune") or {}).get("criterion", DEFAULT_CRITERION)
            for key, value in zip(keys, combo, strict=True):  # criterion parameters, once it is known
                if key == _PARAMS_KEY and isinstance(value, dict):
                    value = {
                        k: v for k, v in value.items() if not _foreign_param(k, criterion, grid_criteria)
                    }
                elif (param := _criterion_param(key)) is None or _foreign_param(
                    param, criterion, grid_criteria
                ):
                    continue
                _set_dotted(tree, key, value)
            if tree.get("target") is not None:
                tree["target"] = str(tree["target"])
            prune = tree.get("prune") or {}
            if prune.get("finetune_algorithm") == SAME_AS_PRETRAIN:
                prune["finetune_algorithm"] = (tree.get("pretrain") or {}).get("algorithm", "erm")
            config = build_config(base=tree)
            if HPARAMS_SEED_KEY in keys:
                seed = combo[keys.index(HPARAMS_SEED_KEY)]
                config = _with_random_hparams(tree, config, seed, f"grid {number}")
            if targets is None and config.target is None:  # `target: all` (or no target at all)
                targets = dataset_of(config).domain_names
            for target in targets or [config.target]:
                resolved = build_config(base=config.model_dump(), overrides={"target": target})
                dataset = dataset_of(resolved)
                if target not in dataset.domain_names:
                    raise ConfigError(
                        f"grid {number}: unknown target domain {target!r} of {dataset.name}; "
                        f"valid: {', '.join(dataset.domain_names)}"
                    )
                by_id.setdefault(resolved.run_id(), resolved)
    return sorted(by_id.values(), key=_canonical_key)


def _with_random_hparams(tree: dict[str, Any], config: RunConfig, seed: Any, where: str) -> RunConfig:
    """``config`` with DomainBed's random draw ``seed`` for its pretraining (0: unchanged); the
    pretraining settings that ``tree`` (the file's explicit settings) gives win over the draws."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(
            f"{where}: {HPARAMS_SEED_KEY} must be integers >= 0 (0: the defaults), got {seed!r}"
        )
    if seed == 0:
        return config
    explicit = tree.get("pretrain") or {}
    fixed = {k: v for k, v in explicit.items() if k in ("lr", "weight_decay", "batch_size")}
    fixed.update(explicit.get("hparams") or {})
    drawn = random_hparams(config.pretrain.algorithm, dataset_kind(config.data.name), seed, fixed=fixed)
    drawn_tree = merge_tree(config.model_dump(), {"pretrain": pretrain_section(drawn)})
    return build_config(base=drawn_tree)


def _canonical_key(c: RunConfig) -> tuple:
    domains = dataset_of(c).domain_names
    return (
        c.seed,
        json.dumps(c.data.model_dump(mode="json"), sort_keys=True),
        json.dumps(c.model.model_dump(mode="json"), sort_keys=True),
        c.pretrain.algorithm,
        json.dumps(c.pretrain.model_dump(mode="json"), sort_keys=True),
        domains.index(c.target) if c.target in domains else len(domains),
        -c.prune.keep_ratio,
        c.prune.criterion,
        c.prune.finetune_algorithm,
        tuple(sorted(c.prune.criterion_params.items())),
        c.run_id(),
    )


def group_units(configs: list[RunConfig]) -> list[Unit]:
    """Runs grouped by pretrained model, in the order of their first run."""
    units: dict[str, Unit] = {}
    for config in configs:
        unit_id = config.pretrain_id()
        if unit_id not in units:
            units[unit_id] = Unit(unit_id, config, [])
        units[unit_id].runs.append(config)
    return list(units.values())


def run_labels(config: RunConfig, dense: bool = False) -> dict[str, Any]:
    """The columns of a run's database row that say what it is (``dense``: its unit's dense model)."""
    return {
        "dataset": config.data.name,
        "target_domain": config.target,
        "model": config.model.name,
        "algorithm": config.pretrain.algorithm,
        "finetune_algorithm": None if dense else config.prune.finetune_algorithm,
        "criterion": "none" if dense else config.prune.criterion,
        "criterion_params": {} if dense else dict(config.prune.criterion_params),
        "keep_ratio": 1.0 if dense else config.prune.keep_ratio,
        "seed": config.seed,
    }
