"""Options shared by several commands, each declared once, and option groups: a frozen dataclass of
Typer options that a command takes as one parameter (``data: DataOptions``) and `with_option_groups`
spells out as options of the command, in the place of that parameter."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_type_hints

import typer

from dgprune.data import MultiDomainDataset
from dgprune.experiments.config import RunConfig, build_config
from dgprune.experiments.pipeline import apply_test_env, model_dir_config


def config_option(help: str) -> Any:
    """``--config/-c``: a settings file (the help says how it combines with the command's options)."""
    return Annotated[Path | None, typer.Option("--config", "-c", help=help)]


def set_option(help: str) -> Any:
    """``--set KEY=VALUE``, repeatable (the help says which settings it updates)."""
    return Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help=help)]


def quiet_option(help: str) -> Any:
    return Annotated[bool, typer.Option("--quiet", "-q", help=help)]


ConfigOpt = config_option("YAML/TOML file of settings (see `dgprune config`).")
SetOpt = set_option(
    "Any setting of `dgprune config` by its dotted key, the value read as YAML; repeat for "
    "several: e.g. --set prune.lr=0.01 --set pretrain.hparams.mmd_gamma=1. Validated as the config "
    "file; wins over --config, loses to the dedicated flags."
)
QuietOpt = quiet_option("No progress (bars on a terminal, else a line every 25 steps and evaluation).")
TensorBoardOpt = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        metavar="DIR",
        help="Also log the training curves (loss, per-domain risks, val accuracy, filters alive) as "
        "TensorBoard scalars under DIR, one run per model directory. Needs the tensorboard extra.",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace the results, checkpoint and model of another run in --out (by default --out is "
        "reused only by the same run, and another run is refused).",
    ),
]


def model_dir_option(help: str) -> Any:
    """``--model DIR`` of the commands that read a model directory (the help says which kind)."""
    return Annotated[Path, typer.Option("--model", help=help)]


TargetOpt = Annotated[str | None, typer.Option(help="Unseen target domain; the others are the sources.")]


# -- option groups ---------------------------------------------------------------------------------


class OptionGroup:
    """Base of the option groups: frozen dataclasses whose fields are ``Annotated[..., typer.Option]``
    with a default."""


@dataclasses.dataclass(frozen=True)
class DataOptions(OptionGroup):
    """The dataset and the data.options flags of the commands that build or read a run."""

    data: Annotated[
        str | None,
        typer.Option("--data", help="Dataset: rotated_digits, rotated_mnist, pacs, folder:/path, ..."),
    ] = None
    data_root: Annotated[
        Path | None, typer.Option(help="Folder holding the dataset (see docs/datasets.md).")
    ] = None
    image_size: Annotated[
        int | None, typer.Option(help="Working image size of image datasets (paper: 224).")
    ] = None
    download: Annotated[bool, typer.Option("--download", help="MNIST-type only: download missing files.")] = (
        False
    )
    skip_bad_images: Annotated[
        bool,
        typer.Option("--skip-bad-images", help="Skip unreadable images with a warning instead of failing."),
    ] = False

    def overrides(self) -> dict[str, Any]:
        """The ``data`` section of the flags actually given, so a config file's values stand otherwise."""
        options = {
            "root": str(self.data_root) if self.data_root else None,
            "image_size": self.image_size,
            "download": True if self.download else None,
            "skip_bad_images": True if self.skip_bad_images else None,
        }
        return {"name": self.data, "options": {k: v for k, v in options.items() if v is not None}}


@dataclasses.dataclass(frozen=True)
class RunOptions(OptionGroup):
    """Where a run's settings come from (a config file, --set items) and the flags every run command
    takes; `new_run` / `saved_model` combine them with the data flags into the run's config."""

    config: ConfigOpt = None
    set_values: SetOpt = None
    target: TargetOpt = None
    test_env: Annotated[
        int | None,
        typer.Option(
            "--test-env",
            help="The target by its index in the dataset's domain order (DomainBed's --test_envs), "
            "instead of --target.",
        ),
    ] = None
    seed: Annotated[int | None, typer.Option(help="Training seed (split, batches, init).")] = None
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto (cuda when present).")] = None

    def new_run(
        self, data: DataOptions, base: dict[str, Any] | None = None, **flags: Any
    ) -> tuple[RunConfig, MultiDomainDataset | None]:
        """pretrain / prune: defaults <- ``base`` (prune: the pretrained model's settings) <- --config <-
        --set <- these flags and ``flags`` (``section__field=value``, None: not given); the target by
        --test-env too."""
        nested: dict[str, Any] = {
            "target": self.target,
            "seed": self.seed,
            "device": self.device,
            "data": data.overrides(),
        }
        for key, value in flags.items():
            section, _, field = key.partition("__")
            if field:
                nested.setdefault(section, {})[field] = value
            else:
                nested[section] = value
        cfg = build_config(self.config, nested, base=base, sets=self.set_values)
        return apply_test_env(cfg, self.test_env, self.target)

    def saved_model(self, model_dir: Path, data: DataOptions) -> tuple[RunConfig, MultiDomainDataset | None]:
        """evaluate / analyze: the data, target and split ``model_dir`` was trained with, unless flags,
        --set or --config say otherwise; also the dataset when --test-env loaded it."""
        flags = {"target": self.target, "seed": self.seed, "device": self.device, "data": data.overrides()}
        cfg = model_dir_config(model_dir, self.config, flags, self.set_values)
        return apply_test_env(cfg, self.test_env, self.target)


F = TypeVar("F", bound=Callable[..., Any])


def with_option_groups(command: F) -> F:
    """``command`` with each option-group parameter replaced by the group's options (Typer reads the
    signature, so they show in --help where the parameter stands); the values are gathered back into
    the group when the command runs."""
    hints = get_type_hints(command, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for param in inspect.signature(command).parameters.values():
        annotation = hints.get(param.name, param.annotation)
        if isinstance(annotation, type) and issubclass(annotation, OptionGroup):
            group_hints = get_type_hints(annotation, include_extras=True)
            fields = dataclasses.fields(annotation)  # type: ignore[arg-type]
            groups[param.name] = (annotation, [f.name for f in fields])
            params += [
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=group_hints[f.name]
                )
                for f in fields
            ]
        else:
            params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=annotation))
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise TypeError(f"{command.__name__}: an option group repeats a parameter name: {names}")

    @functools.wraps(command)
    def expanded(**kwargs: Any) -> Any:
        for name, (group, field_names) in groups.items():
            kwargs[name] = group(**{f: kwargs.pop(f) for f in field_names})
        return command(**kwargs)

    expanded.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    expanded.__annotations__ = {p.name: p.annotation for p in params}
    return expanded  # type: ignore[return-value]
