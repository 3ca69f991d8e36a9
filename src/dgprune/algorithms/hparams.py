"""Default hyper-parameters of the training algorithms: DomainBed's registry (``hparams_registry.py``).

DomainBed distinguishes its small-image datasets (RotatedMNIST, ColoredMNIST: ``"mnist"`` here) from
the others (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet: ``"image"``); only lr and batch size
differ between the two.
"""

from __future__ import annotations

from typing import Any, Literal

from dgprune.errors import ConfigError

DataKind = Literal["image", "mnist"]

# Keys every algorithm accepts.
_COMMON: dict[str, dict[str, Any]] = {
    "image": {"lr": 5e-5, "weight_decay": 0.0, "batch_size": 32, "seed": 0},
    "mnist": {"lr": 1e-3, "weight_decay": 0.0, "batch_size": 64, "seed": 0},
}

# Each algorithm's own keys (same for both data kinds in DomainBed).
_OWN: dict[str, dict[str, Any]] = {
    "erm": {},
    "coral": {"mmd_gamma": 1.0},
    "mixup": {"mixup_alpha": 0.2, "mixup_fixed_lambda": None},
    "vrex": {"vrex_lambda": 10.0, "vrex_penalty_anneal_iters": 500},
    "groupdro": {"groupdro_eta": 0.01},
    "irm": {"irm_lambda": 100.0, "irm_penalty_anneal_iters": 500},
}

HPARAM_DOCS: dict[str, str] = {
    "lr": "learning rate of the algorithm's Adam optimiser (pretraining)",
    "weight_decay": "Adam's L2 weight decay",
    "batch_size": "mini-batch size per source domain (read by the caller that draws the batches)",
    "seed": "seed of the algorithm's own random draws (only Mixup draws any: pairing and lambda)",
    "mmd_gamma": "CORAL: weight of the mean + covariance alignment penalty",
    "mixup_alpha": "Mixup: lambda ~ Beta(alpha, alpha)",
    "mixup_fixed_lambda": "Mixup: use this lambda instead of drawing one (tests, ablations); None = draw",
    "vrex_lambda": "VREx: weight of the risk-variance penalty once annealing is over",
    "vrex_penalty_anneal_iters": "VREx: steps with penalty weight 1 before vrex_lambda (Adam is reset then)",
    "groupdro_eta": "GroupDRO: step size of the exponentiated-gradient update of the domain weights q",
    "irm_lambda": "IRM: weight of the invariance penalty once annealing is over",
    "irm_penalty_anneal_iters": "IRM: steps with penalty weight 1 before irm_lambda (Adam is reset then)",
}


def default_hparams(algorithm: str, data_kind: DataKind = "image") -> dict[str, Any]:
    """DomainBed's default hyper-parameters of ``algorithm`` for ``data_kind`` (a fresh dict)."""
    if algorithm not in _OWN:
        raise ConfigError(f"unknown algorithm {algorithm!r}; valid: {', '.join(_OWN)}")
    if data_kind not in _COMMON:
        raise ConfigError(f"unknown data kind {data_kind!r}; valid: {', '.join(_COMMON)}")
    return {**_COMMON[data_kind], **_OWN[algorithm]}


def merge_hparams(
    algorithm: str, overrides: dict[str, Any] | None, data_kind: DataKind = "image"
) -> dict[str, Any]:
    """Defaults updated with ``overrides``; a key the algorithm does not know is a ConfigError (a typo
    must not silently train with the default)."""
    hparams = default_hparams(algorithm, data_kind)
    if overrides is None:
        return hparams
    unknown = sorted(set(overrides) - set(hparams))
    if unknown:
        raise ConfigError(
            f"unknown hyper-parameter {unknown[0]!r} for algorithm {algorithm!r}; "
            f"valid: {', '.join(sorted(hparams))}"
        )
    hparams.update(overrides)
    return hparams
