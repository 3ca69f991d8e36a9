"""A run's full, validated description (docs/architecture.md, "The flow of a run"); its id is a hash of it."""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dgprune.data import RESULT_NEUTRAL_OPTIONS, dataset_kind, dataset_name
from dgprune.errors import ConfigError, DataError
from dgprune.models import MODELS
from dgprune.pruning.criteria import criterion_param_defaults
from dgprune.training.settings import MAX_SEED, PretrainSettings, PruneSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Strict):
    name: str = Field("rotated_digits", description="dataset name (embedded default: rotated_digits)")
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of each source domain held out (paper 0.1)"
    )
    data_seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seed that fixes domain assignment, independent of the run seed"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="dataset options, e.g. root, image_size (see docs/datasets.md)"
    )

    @field_validator("name")
    @classmethod
    def _canonical_name(cls, value: str) -> str:
        """DomainBed's spelling (PACS, RotatedMNIST) -> dgprune's name, so run ids do not depend on it."""
        try:
            return dataset_name(value)
        except DataError as err:
            raise ValueError(str(err)) from None


class ModelSettings(_Strict):
    name: str = Field("mnist_cnn", description="resnet18, resnet50 or mnist_cnn")
    small_input: bool = Field(False, description="ResNet stem for <= 64 px images (3x3 conv, no max-pool)")
    weights: str | None = Field(None, description="local file of initial weights (state_dict or safetensors)")

    @field_validator("name")
    @classmethod
    def _canonical_name(cls, value: str) -> str:
        """A registered model (any spelling: ResNet18 -> resnet18, so run ids do not depend on it)."""
        try:
            return MODELS.resolve(value)
        except ConfigError as err:
            raise ValueError(str(err)) from None


class RunConfig(_Strict):
    data: DataSettings = DataSettings()
    target: str | None = Field(None, description="the unseen target domain (name)")
    model: ModelSettings = ModelSettings()
    pretrain: PretrainSettings = PretrainSettings()
    prune: PruneSettings = PruneSettings()
    seed: int = Field(0, ge=0, le=MAX_SEED, description="training seed (data split, batches, init)")
    device: Literal["cpu", "cuda", "auto"] = "auto"

    @field_validator("target", mode="before")
    @classmethod
    def _target_text(cls, value: Any) -> Any:
        """Domain names are text; ``target: 30`` in YAML (or ``--set target=30``) means the domain "30"."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _optimiser_defaults(self) -> RunConfig:
        """pretrain.lr / weight_decay / batch_size that were not given: the algorithm registry's defaults
        for the dataset's kind (docs/algorithms.md). They are stored resolved, so ids, config.yaml and
        run.json show the values used (MNIST-type data: the values, and ids, of before)."""
        self.pretrain = self.pretrain.with_defaults_for(dataset_kind(self.data.name))
        return self

    def run_id(self) -> str:
        """Stable id: hash of everything that changes results (not the device, paths or caching)."""
        return _digest(self._identity(exclude={"device"}))

    def pretrain_id(self) -> str:
        """Id of the pretrained model: what pruning settings do not change."""
        return _digest(self._identity(exclude={"device", "prune"}))

    def _identity(self, exclude: set[str]) -> dict[str, Any]:
        payload = self.model_dump(exclude=exclude)
        options = payload["data"]["options"]
        payload["data"]["options"] = {k: v for k, v in options.items() if k not in RESULT_NEUTRAL_OPTIONS}
        # Settings added after results were published are left out at their default, so that the
        # ids of those results stay valid.
        prune = payload.get("prune", {})
        for key, default in _LATER_PRUNE_DEFAULTS.items():
            if prune.get(key, default) == default:
                prune.pop(key, None)
        # round_mode came with the budget rule; runs rounded before it used per_layer and keep their ids.
        if prune.get("round_to", 1) == 1 or prune.get("round_mode") == "per_layer":
            prune.pop("round_mode", None)
        # The latency conditions mean nothing to a params or MACs budget (they are at their defaults there).
        if isinstance(prune.get("budget"), dict) and prune["budget"].get("metric") != "latency":
            prune["budget"] = {k: prune["budget"][k] for k in ("metric", "ratio")}
        # max_layer_prune 1 allows what no limit allows (the same runs): both keep the ids of before it.
        if prune.get("max_layer_prune") in (None, 1.0):
            prune.pop("max_layer_prune", None)
        if "criterion_params" in prune:
            # Ids were first computed with a top-level prune.alpha (1.0 unless set, for every criterion)
            # and no criterion_params: keep that form, so that existing results keep their ids.
            params = dict(prune.pop("criterion_params"))
            prune["alpha"] = params.pop("alpha", 1.0)
            defaults = criterion_param_defaults(self.prune.criterion)
            defaults.pop("alpha", None)
            if params != defaults:
                prune["criterion_params"] = params
        return payload


_LATER_PRUNE_DEFAULTS: dict[str, Any] = {
    "round_to": 1,
    "bn_mode": "per_domain",
    "target_access": "none",
    "budget": None,  # no budget: filters at keep_ratio (a filters budget is stored as keep_ratio)
}

# Bumped when a code change alters the results of an unchanged config, so that stale results on
# disk are not reused under the same id. 2: Mixup draws from the run seed (was a fixed 0).
RESULTS_VERSION = 2


def _digest(payload: dict[str, Any]) -> str:
    salted = {"results_version": RESULTS_VERSION, **payload}
    return hashlib.sha256(json.dumps(salted, sort_keys=True).encode()).hexdigest()[:12]


# Most values a YAML text may expand to, aliases counted as copies of what they name (docs/experiments.md,
# "Limits"): a config holds hundreds, and an alias bomb (9 levels of 9 aliases: 9**9 values) must be
# refused before it is built, not expanded by validation and printed back.
MAX_YAML_VALUES = 100_000


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` of ``text``, refusing a document that would expand to more than
    MAX_YAML_VALUES values or that refers to itself; yaml.YAMLError for invalid YAML."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source}: nested too deeply") from None
        if node is None:
            return None
        _check_expanded_size(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expanded_size(root: yaml.Node, source: str) -> None:
    """The composed graph shares the nodes aliases name: count them as copies (post-order, each
    node's size once), stopping as soon as the count passes the limit or a node contains itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_YAML_VALUES:
                raise ConfigError(
                    f"{source}: its aliases expand to more than {MAX_YAML_VALUES:,} values; refused "
                    "(an alias bomb?)"
                )
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ConfigError(f"{source}: an alias refers to a value that contains it (a recursive alias)")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))


def read_mapping(path: Path) -> dict[str, Any]:
    """A YAML/TOML/JSON file's top-level mapping ({} if empty); ConfigError if missing or invalid."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = load_yaml(text, str(path))
        else:
            raise ConfigError(
                f"{path}: unknown config format {path.suffix!r}; use .yaml, .yml, .toml or .json"
            )
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings, got {type(data).__name__}")
    return data


# The settings that are mappings, with an example of each for error messages.
_SECTION_EXAMPLES: dict[str, str] = {
    "data": "{name: pacs}",
    "model": "{name: resnet18}",
    "pretrain": "{algorithm: erm, steps: 5000}",
    "prune": "{criterion: taylor, keep_ratio: 0.5}",
}


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    return "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def check_sections(data: dict[str, Any], source: str) -> None:
    """A section given as a non-mapping (``data: pacs``) is an error, not silently the defaults."""
    for key, example in _SECTION_EXAMPLES.items():
        value = data.get(key)
        if value is None or isinstance(value, dict):
            continue
        if key in ("data", "model") and isinstance(value, str):
            example = f"{{name: {value}}}"
        raise ConfigError(f"{source}: {key}: expected a mapping such as {example}, got {_describe(value)}")
    options = data["data"].get("options") if isinstance(data.get("data"), dict) else None
    if options is not None and not isinstance(options, dict):
        raise ConfigError(
            f"{source}: data.options: expected a mapping such as {{root: /data/pacs, image_size: 224}}, "
            f"got {_describe(options)}"
        )


def _merge(base: dict[str, Any], overrides: dict[str, Any], keep_none: bool = False) -> dict[str, Any]:
    """Nested update of ``base`` by ``overrides``; a None in ``overrides`` means "not given" (flags),
    unless ``keep_none`` (``--set key=null`` sets None)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            child = merged.get(key) if isinstance(merged.get(key), dict) else {}
            merged[key] = _merge(child, value, keep_none)
        elif value is not None or keep_none:
            merged[key] = value
    return merged


SET_OPTION = "--set"


def parse_set_overrides(items: Sequence[str] | None, option: str = SET_OPTION) -> dict[str, Any]:
    """``KEY=VALUE`` items as a nested mapping: dotted keys (``prune.criterion_params.share=0.5``), values
    read as YAML (``0.01``, ``true``, ``null``, ``[0, 15]``, ``{mmd_gamma: 1}``; else text). A later item
    wins over an earlier one. Not validated here: ``build_config`` validates the result as a config file."""
    tree: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or any(not part.strip() for part in parts):
            raise ConfigError(
                f"{option} expects KEY=VALUE with a dotted key, e.g. {option} prune.lr=0.01, got {item!r}"
            )
        try:
            value = load_yaml(text, f"{option} {item!r}")
        except yaml.YAMLError as err:
            reason = getattr(err, "problem", None) or " ".join(str(err).split())
            raise ConfigError(f"{option} {item!r}: the value is not valid YAML ({reason})") from None
        node = tree
        for part in parts[:-1]:
            if not isinstance(node.get(part.strip()), dict):  # `a=1` then `a.b=2`: the later one wins
                node[part.strip()] = {}
            node = node[part.strip()]
        node[parts[-1].strip()] = value
    return tree


def apply_set_overrides(tree: dict[str, Any], sets: Sequence[str] | None) -> dict[str, Any]:
    """``tree`` (a partial config, e.g. a sweep file's ``base``) updated by ``--set`` items, unvalidated."""
    from_sets = parse_set_overrides(sets)
    check_sections(from_sets, SET_OPTION)
    return _merge(tree, from_sets, keep_none=True)


def set_override_keys(sets: Sequence[str] | None) -> list[str]:
    """The dotted keys that ``--set`` items set, after merging (``a.b=1 a.c=2`` -> ``a.b``, ``a.c``)."""

    def leaves(node: dict[str, Any], prefix: str) -> list[str]:
        keys = []
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            keys += leaves(value, dotted + ".") if isinstance(value, dict) and value else [dotted]
        return keys

    return leaves(parse_set_overrides(sets), "")


def build_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    sets: Sequence[str] | None = None,
) -> RunConfig:
    """Defaults <- ``base`` <- config file <- ``sets`` (``--set KEY=VALUE`` items) <- ``overrides``
    (dedicated flags); errors name the field and the source."""
    from_sets = parse_set_overrides(sets)
    source = str(path) if path else "settings"
    if from_sets:
        source = f"{path} with {SET_OPTION}" if path else SET_OPTION
    from_file = read_mapping(path) if path else {}
    for given, where in (
        (base or {}, "settings"),
        (from_file, str(path)),
        (from_sets, SET_OPTION),
        (overrides or {}, "settings"),
    ):
        check_sections(given, where)
    data = _merge(base or {}, from_file)
    data = _merge(data, from_sets, keep_none=True)
    data = _merge(data, overrides or {})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid configuration:\n{format_validation_error(err)}") from None
    except ConfigError as err:  # raised by a validator that checks several fields (one line)
        raise ConfigError(f"{source}: {err}") from None


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"])
        got = problem.get("input")
        shown = f" (got {_shorten(repr(got))})" if not isinstance(got, dict) else ""
        lines.append(f"  {where}: {problem['msg']}{shown}")
    return "\n".join(lines)


def _shorten(text: str, limit: int = 120) -> str:
    """A value shown in an error message: at most ``limit`` characters (a long list is cut)."""
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text):,} characters)"


def dump_config(config: RunConfig, exclude: set[str] | None = None) -> str:
    """The settings as YAML (``exclude``: top-level sections left out, e.g. the device)."""
    return yaml.safe_dump(config.model_dump(mode="json", exclude=exclude), sort_keys=False)
