"""One result record per model evaluated; the demo writes a list of them to results.json."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dgprune import __version__
from dgprune.pruning.criteria import criterion_label


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "dgprune": __version__}
    for name in ("torch", "torchvision", "torch-pruning"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:  # e.g. run from a source tree without installing
            versions[name] = "unknown"
    return versions


@dataclass
class ResultRecord:
    dataset: str
    target_domain: str
    model: str
    algorithm: str
    criterion: str  # "none" for the dense (pretrained) model
    keep_ratio: float
    seed: int
    intra_acc: float
    cross_acc: float
    per_domain_acc: dict[str, float]
    worst_source_acc: float
    filters_total: int
    filters_kept: int
    params: int
    macs: int
    params_dense: int
    macs_dense: int
    run_id: str
    selected_step: int
    model_dir: str
    wall_time_s: float
    masked_vs_compressed_max_abs_diff: float | None = None
    variance_term_share: float | None = None  # see PruneOutcome.variance_term_share
    finetune_algorithm: str | None = None  # objective while pruning + fine-tuning (None: dense model)
    skipped_images: int = 0  # unreadable images skipped with --skip-bad-images
    # The criterion's validated parameters, defaults included ({} for the dense model and for criteria
    # without parameters); name a run with pruning.criteria.criterion_label(criterion, criterion_params).
    criterion_params: dict[str, Any] = field(default_factory=dict)
    # Steps the stage ran: prune.steps, or more when pruning needed more to reach the target (a warning
    # says so); None in records of older versions.
    steps_run: int | None = None
    versions: dict[str, str] = field(default_factory=library_versions)
    # Which split each number of per_domain_acc comes from: "val" (a source's val split) or "target"
    # (the whole target domain); a record of an older dgprune gets it from target_domain (same meaning).
    per_domain_split: dict[str, str] = field(default_factory=dict)
    # Every domain's accuracy per split, as history.jsonl's "acc" (training.evaluation.Evaluator):
    # sources "train" (a fixed sample of the train split) and "val", the target "target" (whole),
    # "target_val" and "target_test" (its two parts); older records: per_domain_acc's numbers only.
    domain_split_acc: dict[str, dict[str, float]] = field(default_factory=dict)
    # What of the target the run saw (prune.target_access): "none" (the DG protocol; the dense model and
    # records of older versions) or "unlabeled" (its images, never its labels, went to the criterion).
    target_access: str = "none"
    # Cross-domain accuracy after AdaBN (BatchNorm statistics re-estimated on the target's images, Li et
    # al. 2016; training/adabn.py), measured for the runs under prune.target_access unlabeled of
    # BatchNorm models; None otherwise.
    cross_acc_adabn: float | None = None
    dense_cross_acc_adabn: float | None = None  # the same for the dense model it was pruned from
    # Model selection as DomainBed reports it (training/oracle_selection.py): the target's test half at
    # the checkpoint selected on source validation, and at the one a test-domain oracle would select
    # (best target_val half: reads target labels, an upper bound for reporting only); None for a
    # one-image target and records of older versions.
    cross_test_acc: float | None = None
    oracle_cross_test_acc: float | None = None
    oracle_step: int | None = None
    # prune.budget (docs/method.md, Budgets): its metric ("filters" for keep_ratio runs, the dense model
    # and older records), the ratio asked for (keep_ratio then holds it too), the ratio the schedule
    # predicted for the final widths, and the ratio measured on the compressed model (params and conv /
    # linear MACs counted, latency timed in the budget's conditions); None for filters.
    budget_metric: str = "filters"
    budget_target: float | None = None
    budget_predicted: float | None = None
    budget_measured: float | None = None

    @property
    def label(self) -> str:
        """The criterion's label, marked when the run saw the target's images (criterion_label) and,
        for a params / MACs / latency budget, with its metric: keep_ratio then holds that budget's
        ratio, which tables must not show as a share of filters beside filter-budget runs."""
        label = criterion_label(self.criterion, self.criterion_params, target_access=self.target_access)
        return label if self.budget_metric == "filters" else f"{label} [{self.budget_metric} budget]"

    def __post_init__(self) -> None:
        if not isinstance(self.per_domain_acc, dict):  # a damaged row: its readers name it, not this
            return
        if not self.per_domain_split:
            self.per_domain_split = {
                name: "target" if name == self.target_domain else "val" for name in self.per_domain_acc
            }
        if not self.domain_split_acc:
            self.domain_split_acc = {
                name: {self.per_domain_split.get(name, "val"): acc}
                for name, acc in self.per_domain_acc.items()
            }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> ResultRecord:
        """A record as ``to_dict`` wrote it, also by an older dgprune (its ``alpha`` was IoR's only
        parameter, None for every other criterion)."""
        values = dict(row)
        alpha = values.pop("alpha", None)
        values["criterion_params"] = legacy_criterion_params(alpha, values.get("criterion_params"))
        return cls(**values)


def legacy_criterion_params(alpha: float | None, params: dict[str, Any] | None) -> dict[str, Any]:
    """``criterion_params`` of a record or row that may predate it (then only ``alpha`` was kept)."""
    if params is not None:
        return dict(params)
    return {} if alpha is None else {"alpha": alpha}


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON via a temporary file and a rename: a kill never leaves a broken file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))  # NaN is not JSON: fail, never write it
    tmp.replace(path)


def write_records(path: Path, records: list[ResultRecord]) -> None:
    write_json_atomic(path, [r.to_dict() for r in records])


def read_records(path: Path) -> list[ResultRecord]:
    return [ResultRecord.from_dict(row) for row in json.loads(path.read_text())]


def describe_run(
    *,
    target: str,
    seed: int,
    algorithm: str,
    criterion: str,
    criterion_params: dict[str, Any] | None,
    keep_ratio: float | None,
    finetune_algorithm: str | None,
    target_access: str = "none",
) -> str:
    """A run by its settings, as the sweep's lines show it: ``target 0 seed 1 erm taylor keep 0.5``
    (``dense`` for the pretrained model; `` ft coral`` when fine-tuned with another objective;
    ``[unlabeled target]`` after the criterion when the run saw the target's images)."""
    label = criterion_label(criterion, criterion_params, target_access=target_access)
    what = "dense" if criterion == "none" else f"{label} keep {keep_ratio:g}"
    if finetune_algorithm not in (None, "erm"):
        what += f" ft {finetune_algorithm}"
    return f"target {target} seed {seed} {algorithm} {what}"
