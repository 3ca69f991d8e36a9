"""The stages of one run: pretrain -> prune + fine-tune -> compress -> evaluate (docs/architecture.md).

Each stage reads and writes a model directory (safetensors + structure.json + metrics.json), so a
finished stage is never recomputed and an interrupted sequence of stages resumes where it stopped.
A directory's results and checkpoint are reused only by the run that wrote them (run.json and the
checkpoint hold its identity): another run is refused with the settings that differ, unless asked
to overwrite them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from torch import nn

from dgprune.data import (
    RESULT_NEUTRAL_OPTIONS,
    LodoSplit,
    MultiDomainDataset,
    load_dataset,
    make_lodo_split,
    probe_batch,
)
from dgprune.errors import ConfigError
from dgprune.experiments.config import RunConfig, build_config, dump_config, load_yaml
from dgprune.experiments.records import ResultRecord, write_json_atomic
from dgprune.models import build_model
from dgprune.pruning.budget import BudgetSettings, measured_ratio
from dgprune.pruning.groups import find_channel_groups
from dgprune.pruning.measure import model_cost
from dgprune.pruning.surgery import (
    STRUCTURE_FILE,
    WEIGHTS_FILE,
    compress,
    load_compressed,
    save_compressed,
)
from dgprune.training.adabn import adabn_cross_accuracy
from dgprune.training.checkpoint import CHECKPOINT_FILE, Checkpointer
from dgprune.training.evaluation import evaluate
from dgprune.training.history import HISTORY_FILE, StageLog
from dgprune.training.identity import Identity, differences, mismatch_error, same_run
from dgprune.training.oracle_selection import TestHalfAccuracies, test_half_accuracies
from dgprune.training.pretrain import pretrain
from dgprune.training.progress import ProgressCallback
from dgprune.training.prune_finetune import prune_and_finetune

METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"  # the identity of the run whose metrics.json lies beside it
RESULTS_FILE = "results.json"  # the record as the pretrain/prune commands write it
CONFIG_FILE = "config.yaml"  # the stage's resolved settings (without the device), usable as --config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; valid: cpu, cuda, auto")
    return torch.device(name)


@dataclass
class RunContext:
    """Everything derived from a config that the stages share."""

    config: RunConfig
    dataset: MultiDomainDataset
    split: LodoSplit
    device: torch.device

    @property
    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, *self.dataset.input_shape, device=self.device)

    def build_spec(self) -> dict:
        m = self.config.model
        return {
            "name": m.name,
            "num_classes": self.dataset.num_classes,
            "in_channels": self.dataset.input_shape[0],
            "small_input": m.small_input,
        }

    def new_model(self) -> nn.Module:
        """The dense architecture, with the configured initial weights (e.g. ImageNet) if any.

        The random initialisation is drawn from the run's seed alone, so a run gives the same
        numbers whatever ran before it in the same process.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            model = build_model(**self.build_spec(), weights=self.config.model.weights)
        return model.to(self.device)

    def load_model_dir(self, directory: Path) -> nn.Module:
        return load_model_dir(directory, torch.zeros(1, *self.dataset.input_shape)).to(self.device)


def load_model_dir(directory: str | os.PathLike[str], example_input: torch.Tensor | None = None) -> nn.Module:
    """A model saved by a dgprune stage (dense or compressed), with a clear error if it is not one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such model directory")
    if not (directory / STRUCTURE_FILE).is_file():
        raise ConfigError(f"{directory}: not a dgprune model directory (no {STRUCTURE_FILE})")
    model, _ = load_compressed(directory, build_model, example_input)
    return model


def load_experiment_dataset(config: RunConfig) -> MultiDomainDataset:
    return load_dataset(config.data.name, seed=config.data.data_seed, **config.data.options)


def target_of_test_env(dataset: MultiDomainDataset, index: int) -> str:
    """DomainBed's ``--test_envs`` index: the name of the ``index``-th domain in the dataset's order."""
    names = dataset.domain_names
    if not 0 <= index < len(names):
        listing = ", ".join(f"{i}: {name}" for i, name in enumerate(names))
        raise ConfigError(
            f"--test-env {index} is out of range: dataset {dataset.name!r} has {len(names)} domains, "
            f"indices 0..{len(names) - 1} ({listing})"
        )
    return names[index]


def apply_test_env(
    config: RunConfig, test_env: int | None, target: str | None = None
) -> tuple[RunConfig, MultiDomainDataset | None]:
    """The config whose target is the ``test_env``-th domain (``--test-env``), and the dataset loaded to
    find it (None when ``test_env`` is None: the config is returned as it is). ``target``: a domain also
    named by ``--target``; a ConfigError unless it is the same domain."""
    if test_env is None:
        return config, None
    dataset = load_experiment_dataset(config)
    name = target_of_test_env(dataset, test_env)
    if target is not None and target != name:
        raise ConfigError(
            f"--target {target} and --test-env {test_env} (domain {name!r} of {dataset.name!r}) disagree; "
            "give one of them"
        )
    return config.model_copy(update={"target": name}), dataset


def make_context(config: RunConfig, dataset: MultiDomainDataset | None = None) -> RunContext:
    if config.target is None:
        raise ConfigError("no target domain given (set `target` in the config or pass --target)")
    dataset = dataset or load_experiment_dataset(config)
    split = make_lodo_split(dataset, config.target, config.data.val_fraction, config.seed)
    return RunContext(config, dataset, split, resolve_device(config.device))


def _record(
    ctx: RunContext,
    model: nn.Module,
    directory: Path,
    criterion: str,
    keep_ratio: float,
    filters: tuple[int, int],
    dense_cost,
    selected_step: int,
    started: float,
    diff: float | None = None,
    variance_share: float | None = None,
    steps_run: int | None = None,
    adabn: tuple[float | None, float | None] = (None, None),
    halves: TestHalfAccuracies | None = None,
) -> ResultRecord:
    """``adabn``: (pruned, dense) cross-domain accuracy after AdaBN (training/adabn.py), measured by
    ``run_prune`` under ``prune.target_access: unlabeled``."""
    acc = evaluate(model, ctx.split, ctx.device)
    cost = model_cost(model, ctx.example_input)
    cfg = ctx.config
    return ResultRecord(
        dataset=ctx.dataset.name,
        target_domain=ctx.split.target.name,
        model=cfg.model.name,
        algorithm=cfg.pretrain.algorithm,
        criterion=criterion,
        criterion_params={} if criterion == "none" else dict(cfg.prune.criterion_params),
        keep_ratio=keep_ratio,
        seed=cfg.seed,
        intra_acc=acc.intra,
        cross_acc=acc.cross,
        per_domain_acc=acc.per_domain,
        per_domain_split=acc.per_domain_split,
        domain_split_acc=acc.splits,
        worst_source_acc=acc.worst_source,
        filters_total=filters[0],
        filters_kept=filters[1],
        params=cost.params,
        macs=cost.macs,
        params_dense=dense_cost.params,
        macs_dense=dense_cost.macs,
        run_id=cfg.pretrain_id() if criterion == "none" else cfg.run_id(),
        selected_step=selected_step,
        model_dir=str(directory),
        wall_time_s=time.monotonic() - started,
        masked_vs_compressed_max_abs_diff=diff,
        variance_term_share=variance_share,
        finetune_algorithm=None if criterion == "none" else cfg.prune.finetune_algorithm,
        skipped_images=len(ctx.dataset.skipped_files),
        steps_run=steps_run,
        target_access="none" if criterion == "none" else cfg.prune.target_access,
        cross_acc_adabn=adabn[0],
        dense_cross_acc_adabn=adabn[1],
        cross_test_acc=halves.selected if halves else None,
        oracle_cross_test_acc=halves.oracle if halves else None,
        oracle_step=halves.oracle_step if halves else None,
    )


def pretrain_identity(config: RunConfig) -> Identity:
    """What makes a pretrained model: every setting but the pruning ones (and the device)."""
    return {
        "stage": "pretrain",
        "run_id": config.pretrain_id(),
        "config": config.model_dump(mode="json", exclude={"device", "prune"}),
    }


def prune_identity(config: RunConfig, pretrained_dir: Path) -> Identity:
    """A pruning run: all its settings and the pretrained model it starts from."""
    return {
        "stage": "prune",
        "run_id": config.run_id(),
        "pretrained": pretrained_model_id(pretrained_dir),
        "config": config.model_dump(mode="json", exclude={"device"}),
    }


# What a model directory's stored settings give a command that reads the model (evaluate, analyze): the
# data, split and model; other settings of older versions need not validate today.
_MODEL_DIR_KEYS = ("data", "target", "seed", "model")
_MODEL_DIR_PRUNE_KEYS = ("scope", "bn_mode")


def stored_settings(model_dir: Path) -> dict[str, Any]:
    """The settings a model directory records: from run.json (a finished stage), else config.yaml (a
    stage that has started), else at least the target of metrics.json (directories of older
    versions); {} when it records none."""
    settings: Any = None
    if (model_dir / RUN_FILE).is_file():
        stored = _read_json(model_dir / RUN_FILE)
        settings = stored.get("config") if isinstance(stored, dict) else None
    elif (model_dir / CONFIG_FILE).is_file():
        try:
            settings = load_yaml((model_dir / CONFIG_FILE).read_text(), str(model_dir / CONFIG_FILE))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"{model_dir / CONFIG_FILE}: unreadable ({err})") from None
    elif (model_dir / METRICS_FILE).is_file():
        stored = _read_json(model_dir / METRICS_FILE)
        target = stored.get("target_domain") if isinstance(stored, dict) else None
        return {"target": target} if target is not None else {}
    return settings if isinstance(settings, dict) else {}


def model_dir_settings(model_dir: Path) -> dict[str, Any]:
    """The settings a model directory records about its data, target, seed and model (and the
    pruning scope and BatchNorm mode), see :func:`stored_settings`."""
    settings = stored_settings(model_dir)
    base = {k: settings[k] for k in _MODEL_DIR_KEYS if k in settings}
    prune = settings.get("prune") if isinstance(settings.get("prune"), dict) else {}
    base["prune"] = {k: prune[k] for k in _MODEL_DIR_PRUNE_KEYS if k in prune}
    return base


def pretrained_settings(pretrained_dir: Path) -> dict[str, Any]:
    """What a pruning run inherits from the model it prunes: every recorded setting but the pruning
    ones and the device (the settings its ``pretrain_id`` hashes): data and its options, target,
    seed, model, pretraining."""
    settings = stored_settings(pretrained_dir)
    return {k: v for k, v in settings.items() if k not in ("prune", "device")}


def check_pretrained_match(config: RunConfig, pretrained_dir: Path) -> None:
    """ConfigError unless ``config`` describes the model in ``pretrained_dir``: the same data (up to
    options that do not change results, such as its root), target, seed, model and pretraining, as
    recorded there, and the architecture of its structure.json. So a pruned model's record, config.yaml
    and tables never describe another model than the one pruned."""
    stored = pretrained_settings(pretrained_dir)
    found: list[str] = []
    if stored:
        try:
            recorded = RunConfig.model_validate({**stored, "prune": config.prune.model_dump()})
        except (ValidationError, ConfigError):
            recorded = None  # settings of an older version: only the architecture can be checked
        if recorded is not None:
            found = differences(
                {"config": _inherited_identity(recorded)},
                {"config": _inherited_identity(config)},
                labels=("pretrained", "this run"),
            )
    # structure.json names the architecture even where no settings are recorded
    build = _read_structure(pretrained_dir).get("build", {})
    saved = {k: build[k] for k in ("name", "small_input") if k in build}
    now = {k: getattr(config.model, k) for k in saved}
    named = {line.partition(":")[0] for line in found}
    for line in differences(
        {"config": {"model": saved}}, {"config": {"model": now}}, labels=("pretrained", "this run")
    ):
        if line.partition(":")[0] not in named:
            found.append(line)
    if found:
        raise ConfigError(
            f"--pretrained {pretrained_dir} was trained with other settings than this run ("
            + "; ".join(found)
            + "); drop the flags or --set items that change them (prune takes them from the pretrained "
            "model), or prune a model pretrained with these settings"
        )


def _inherited_identity(config: RunConfig) -> dict[str, Any]:
    """The settings a pruning run must share with its pretrained model, as the pretrain id sees them."""
    payload = config.model_dump(mode="json", exclude={"device", "prune"})
    options = payload["data"]["options"]
    payload["data"]["options"] = {k: v for k, v in options.items() if k not in RESULT_NEUTRAL_OPTIONS}
    return payload



def model_dir_config(
    model_dir: Path,
    config_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: Sequence[str] | None = None,
) -> RunConfig:
    """The config of a command that reads a saved model: flags (``overrides``) <- ``--set`` items <-
    ``--config`` file <- the directory's own settings (:func:`model_dir_settings`) <- defaults; so
    ``--model DIR`` alone evaluates on the data, target and split the model was trained with."""
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: no such model directory")
    if not (model_dir / STRUCTURE_FILE).is_file():
        raise ConfigError(f"--model {model_dir}: not a dgprune model directory (no {STRUCTURE_FILE})")
    return build_config(config_path, overrides, base=model_dir_settings(model_dir), sets=sets)


def pretrained_model_id(directory: Path) -> str:
    """The run id of a model directory's metrics.json, else a hash of its weights file."""
    metrics_path = directory / METRICS_FILE
    if metrics_path.is_file():
        return _read_record(metrics_path).run_id
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ConfigError(f"{directory}: not a dgprune model directory (no {WEIGHTS_FILE})")
    digest = hashlib.sha256()
    with weights_path.open("rb") as weights:
        while chunk := weights.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:12]}"


def run_pretrain(
    ctx: RunContext,
    out_dir: Path,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    tensorboard_dir: Path | None = None,
) -> ResultRecord:
    """Pretrain (or reuse a finished pretraining in ``out_dir``) and evaluate the selected checkpoint.

    ``out_dir`` is reused only by the same pretraining (ConfigError naming the differing settings
    otherwise); ``overwrite`` first deletes the stage's results, checkpoint and model there.
    Beside the model: config.yaml (the settings, without the pruning ones) and history.jsonl (the
    curves, see training.history); with ``tensorboard_dir``, the curves as TensorBoard scalars too.
    """
    identity = pretrain_identity(ctx.config)
    if (done := _prepare_stage(out_dir, identity, overwrite)) is not None:
        return done
    started = time.monotonic()
    _write_config(out_dir, ctx.config, exclude={"device", "prune"})
    model = ctx.new_model()
    with StageLog(out_dir, progress, tensorboard_dir) as log:
        outcome = pretrain(
            model,
            ctx.split,
            ctx.config.pretrain,
            ctx.config.seed,
            ctx.device,
            log,
            checkpoint_dir=out_dir,
            checkpoint_identity=identity,
        )
    save_compressed(out_dir, model, {}, ctx.build_spec(), ctx.dataset.input_shape)
    total = sum(g.size for g in find_channel_groups(model, ctx.example_input, ctx.config.prune.scope))
    cost = model_cost(model, ctx.example_input)
    record = _record(
        ctx,
        model,
        out_dir,
        "none",
        1.0,
        (total, total),
        cost,
        outcome.best_step,
        started,
        steps_run=ctx.config.pretrain.steps,
        halves=test_half_accuracies(outcome.history, outcome.best_step),
    )
    _finish(out_dir, record, identity)
    return record


def run_prune(
    ctx: RunContext,
    pretrained_dir: Path,
    out_dir: Path,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    tensorboard_dir: Path | None = None,
) -> ResultRecord:
    """Prune + fine-tune the pretrained model, compress the selected checkpoint, evaluate it.

    ``out_dir`` is reused only by the same run from the same pretrained model; ``overwrite`` first
    deletes the stage's results, checkpoint and model there. config.yaml, history.jsonl and
    TensorBoard as in :func:`run_pretrain`.
    """
    if out_dir.resolve() == pretrained_dir.resolve():
        raise ConfigError(f"--out {out_dir} is the pretrained model's directory; choose another --out")
    check_pretrained_match(ctx.config, pretrained_dir)
    identity = prune_identity(ctx.config, pretrained_dir)
    if (done := _prepare_stage(out_dir, identity, overwrite)) is not None:
        return done
    started = time.monotonic()
    _write_config(out_dir, ctx.config, exclude={"device"})
    model = ctx.load_model_dir(pretrained_dir)
    dense_cost = model_cost(model, ctx.example_input)
    settings = ctx.config.prune
    with StageLog(out_dir, progress, tensorboard_dir) as log:
        outcome = prune_and_finetune(
            model,
            ctx.split,
            settings,
            ctx.config.seed,
            ctx.device,
            ctx.example_input,
            log,
            checkpoint_dir=out_dir,
            checkpoint_identity=identity,
        )
    probe = probe_batch(ctx.split.val, 64).to(ctx.device)
    model.eval()
    with torch.no_grad():
        masked_logits = model(probe)
    pruned = compress(model, outcome.gates, ctx.example_input)
    with torch.no_grad():
        diff = float((model(probe) - masked_logits).abs().max())
    structure = _read_structure(pretrained_dir)
    save_compressed(out_dir, model, pruned, structure["build"], ctx.dataset.input_shape)
    filters = (outcome.filters_total, outcome.filters_kept)
    adabn: tuple[float | None, float | None] = (None, None)
    if settings.target_access == "unlabeled":  # the transductive baseline, beside the transductive run
        dense = ctx.load_model_dir(pretrained_dir)
        adabn = (
            adabn_cross_accuracy(model, ctx.split.target, ctx.device),
            adabn_cross_accuracy(dense, ctx.split.target, ctx.device),
        )
    record = _record(
        ctx,
        model,
        out_dir,
        settings.criterion,
        settings.keep_ratio,
        filters,
        dense_cost,
        outcome.best_step,
        started,
        diff,
        outcome.variance_term_share,
        steps_run=outcome.steps_run,
        adabn=adabn,
        halves=test_half_accuracies(outcome.history, outcome.best_step),
    )
    if settings.budget is not None:
        dense = ctx.load_model_dir(pretrained_dir)
        record = with_budget(
            record, settings.budget, outcome.budget_predicted, dense, model, ctx.example_input
        )
    if outcome.steps_run != settings.steps:  # the settings file says what ran, and stays a valid --config
        _write_config(out_dir, ctx.config, exclude={"device"}, note=_extended_note(settings.steps, outcome))
    _finish(out_dir, record, identity)
    return record


def with_budget(
    record: ResultRecord,
    budget: BudgetSettings,
    predicted: float | None,
    dense: nn.Module,
    compressed: nn.Module,
    example_input: torch.Tensor,
) -> ResultRecord:
    """``record`` with its budget: the metric, the ratio asked for (also as keep_ratio, the size the
    run was asked for), the schedule's prediction and the ratio measured on the models."""
    return replace(
        record,
        keep_ratio=budget.ratio,
        budget_metric=budget.metric,
        budget_target=budget.ratio,
        budget_predicted=predicted,
        budget_measured=measured_ratio(budget, dense.cpu(), compressed.cpu(), example_input.cpu()),
    )


def _prepare_stage(out_dir: Path, identity: Identity, overwrite: bool) -> ResultRecord | None:
    """Before any work: the finished record of this very run in ``out_dir``, if there is one;
    otherwise make sure the directory can be written (a checkpoint's identity is checked on load)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory; choose another --out")
    if overwrite:
        _clear_stage(out_dir)
    if (done := _reusable_record(out_dir, identity)) is not None:
        return done
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".dgprune-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"--out {out_dir} is not writable ({err.strerror or err}); choose another --out"
        ) from None
    return None


def _reusable_record(out_dir: Path, identity: Identity) -> ResultRecord | None:
    metrics_path = out_dir / METRICS_FILE
    if not metrics_path.is_file():
        return None
    record = _read_record(metrics_path)
    run_path = out_dir / RUN_FILE
    if run_path.is_file():
        stored = _read_json(run_path)
        if not isinstance(stored, dict) or not same_run(stored, identity):
            raise mismatch_error(str(out_dir), stored if isinstance(stored, dict) else {}, identity)
    elif record.run_id != identity["run_id"]:  # written before run.json existed: only the id to go by
        raise ConfigError(
            f"{out_dir} holds another run (run id {record.run_id}, now {identity['run_id']}; written by "
            "an older dgprune, its settings are unknown); rerun with --overwrite to replace it, "
            "or use another --out"
        )
    return record


def _clear_stage(out_dir: Path) -> None:
    """--overwrite: delete what a stage writes (and the command's results.json), nothing else."""
    if not out_dir.is_dir():
        return
    names = [METRICS_FILE, RUN_FILE, CHECKPOINT_FILE, WEIGHTS_FILE, STRUCTURE_FILE, CONFIG_FILE, HISTORY_FILE]
    if (out_dir / METRICS_FILE).is_file():  # a stage directory: its results.json is that stage's record
        names.append(RESULTS_FILE)
    try:
        for name in names:
            for path in (out_dir / name, out_dir / f"{name}.tmp", (out_dir / name).with_suffix(".tmp")):
                path.unlink(missing_ok=True)
    except OSError as err:
        raise ConfigError(f"--overwrite: cannot delete {err.filename}: {err.strerror}") from None


def _write_config(out_dir: Path, config: RunConfig, exclude: set[str], note: str = "") -> None:
    tmp = out_dir / f"{CONFIG_FILE}.tmp"
    tmp.write_text(note + dump_config(config, exclude=exclude))
    tmp.replace(out_dir / CONFIG_FILE)


def _extended_note(requested: int, outcome: Any) -> str:
    """config.yaml's first lines when pruning ran more steps than prune.steps (the id keeps the setting)."""
    return (
        f"# prune.steps {requested} was too few to reach the target filters: {outcome.steps_run} steps ran\n"
        f"# (steps_run in metrics.json); this file as --config reproduces this run\n"
    )


def _finish(out_dir: Path, record: ResultRecord, identity: Identity) -> None:
    """Mark the stage done (run.json, then metrics.json) and drop its mid-stage checkpoint."""
    write_json_atomic(out_dir / RUN_FILE, identity)
    write_json_atomic(out_dir / METRICS_FILE, record.to_dict())  # the done-marker must be whole
    Checkpointer(out_dir).clear()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); delete it or rerun with --overwrite") from None


def _read_record(path: Path) -> ResultRecord:
    payload = _read_json(path)
    try:
        return ResultRecord.from_dict(payload)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: not a dgprune results file ({err}); rerun with --overwrite") from None


def _read_structure(directory: Path) -> dict:
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such model directory")
    if not (directory / STRUCTURE_FILE).is_file():
        raise ConfigError(f"{directory}: not a dgprune model directory (no {STRUCTURE_FILE})")
    structure = _read_json(directory / STRUCTURE_FILE)
    if not isinstance(structure, dict):
        raise ConfigError(f"{directory / STRUCTURE_FILE}: not a dgprune structure file (not a JSON object)")
    return structure
