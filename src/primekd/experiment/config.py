"""An experiment's config: the schema, its presets, loading, `--set` overrides and validation.

`load_config` builds an `ExperimentConfig` from a preset, a YAML file and `--set` overrides,
checking every key and value (errors name the dotted key and say what to do).

The stage sections of the config (`teacher`, `distill`, `sft`, `eval`, `attention`) take the
fields of the stage's own config dataclass (`TeachConfig`, `DistillConfig`, `EvalConfig`,
`AttentionConfig`), except the ones the experiment fills in (models, data, paths).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from primekd.analyze.attention.config import AttentionConfig
from primekd.core import options
from primekd.core.errors import PrimekdError, did_you_mean
from primekd.core.io import read_yaml
from primekd.core.options import option
from primekd.distill.config import DistillConfig
from primekd.engines import EngineSpec
from primekd.evaluate.evaluator import EvalConfig
from primekd.teach.priming import BUILTIN_STRATEGIES, parse_strategy
from primekd.teach.teacher import TeachConfig

PRESETS = ("quick", "small", "small-onpolicy", "pair", "paper")
CONTROLS = ("base", "sft")

# --- config schema ----------------------------------------------------------------------------


@dataclass
class DataSlice:
    """Which questions of a set: a bundled split or a JSONL path, then sample/offset/limit."""

    split: str = "test"
    sample: int | None = option(None, "A seeded random subset of this many questions.", ge=1)
    seed: int = 0
    offset: int = option(0, "Questions skipped first.", ge=0)
    limit: int | None = option(None, "At most this many questions.", ge=1)


@dataclass
class Models:
    teacher: str = "smollm2-135m-instruct"
    student: str = "smollm2-135m-instruct"


@dataclass
class DataSection:
    transfer: DataSlice = field(default_factory=lambda: DataSlice(split="train", sample=64))
    test: DataSlice = field(default_factory=lambda: DataSlice(split="test", sample=30))


@dataclass
class StrategySpec:
    """One priming strategy: a built-in name, or a custom template, plus per-strategy overrides
    of the teacher, distill and eval sections (changing them reruns only this strategy)."""

    description: str | None = None
    user: str | None = None  # a Jinja2 template over question/reference/answer: a custom one
    system: str | None = None
    prefill: str | None = None
    teacher: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)

    @property
    def custom(self) -> bool:
        return self.user is not None


ROLES = ("teacher", "student")


@dataclass
class EngineSection:
    """The generation engine of the teacher, eval and on-policy stages. `options` go to every
    server; the `teacher` and `student` options are added over them for one role: the
    teacher's (teacher stages, on-policy scoring) and the student's (eval stages, on-policy
    rollouts), e.g. tensor_parallel_size 8 for a 405B teacher and 1 for its 8B student.
    `base_url` is the teacher's running server: teacher stages only, and in their hash."""

    name: str = "hf"  # hf | vllm
    base_url: str | None = None  # vllm: the teacher's running server instead of one started
    options: dict[str, Any] = field(default_factory=dict)  # vllm server/client options
    teacher: dict[str, Any] = field(default_factory=dict)  # the teacher's, over `options`
    student: dict[str, Any] = field(default_factory=dict)  # the student's, over `options`

    def role_options(self, role: str) -> dict[str, Any]:
        """The options of one role's servers (`teacher` or `student`)."""
        return {**self.options, **getattr(self, role)}


@dataclass
class ReportSection:
    title: str | None = None
    examples: int = option(1, "Worked examples (questions) shown.", ge=0)
    max_response_chars: int = 1200  # responses are cut to this length in the report
    power_diff: float = option(8.0, "Difference in points the first paragraph's power "
                               "statement is for (primary comparison).", gt=0, lt=100)


@dataclass
class CostSection:
    """Measured rates for `run --dry-run`'s time estimate (experiment/estimate.py); no stage
    reads them, so they are in no stage's hash. null: that stage kind is not estimated."""

    teacher_tokens_per_s: float | None = option(None, "Teacher generation, answer tokens/s "
                                                "over all requests in flight.", gt=0)
    score_tokens_per_s: float | None = option(None, "Teacher-forced scoring (`target: "
                                              "reference`), scored tokens/s.", gt=0)
    eval_tokens_per_s: float | None = option(None, "Evaluation, answer tokens/s.", gt=0)
    train_tokens_per_s: float | None = option(None, "Student training, tokens/s (prompt + "
                                              "answer).", gt=0)
    answer_tokens: float = option(250.0, "Mean answer length in tokens (capped by each stage's "
                                  "max_new_tokens).", gt=0)
    reference_tokens: float = option(130.0, "Mean GSM8K reference solution in tokens.", gt=0)
    prompt_tokens: float = option(120.0, "Mean prompt in tokens.", gt=0)
    start_s: float = option(0.0, "Per generation stage: model load or server start (and "
                            "adapter merge).", ge=0)
    attention_s: float = option(60.0, "The attention stage.", ge=0)
    report_s: float = option(10.0, "The report stage.", ge=0)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    models: Models = field(default_factory=Models)
    data: DataSection = field(default_factory=DataSection)
    strategies: dict[str, StrategySpec] = field(
        default_factory=lambda: {"none": StrategySpec(), "ground_truth": StrategySpec()}
    )
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    engine: EngineSection = field(default_factory=EngineSection)
    # teacher stages per strategy, each answering every n-th question (`teach --shard i/n`);
    # the students train on all of them. Run shards in parallel with `primekd run --only`.
    teacher_shards: int = option(1, "Teacher stages per strategy.", ge=1)
    teacher: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    attention: dict[str, Any] = field(default_factory=lambda: {"enabled": True})
    # on-policy students: {strategy, name?, lmbda?, divergence?, rounds?, ...} each
    on_policy: list[dict[str, Any]] = field(default_factory=list)
    report: ReportSection = field(default_factory=ReportSection)
    costs: CostSection = field(default_factory=CostSection)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["strategies"] = {  # a built-in strategy without overrides reads as `name: {}`
            name: {k: v for k, v in spec.items() if v not in (None, {})}
            for name, spec in data["strategies"].items()
        }
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(plain(self.to_dict()), sort_keys=False, allow_unicode=True)

    @property
    def experiments(self) -> list[str]:
        """The rows of the results table, in order: controls, one KD student a strategy, then
        the on-policy students."""
        return [c for c in CONTROLS if c in self.controls] + [
            f"kd-{s}" for s in self.strategies] + list(on_policy_students(self))


def on_policy_students(config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Name -> entry of every on-policy student (`op-<strategy>` unless the entry names it)."""
    named = {}
    for entry in config.on_policy:
        strategy = entry.get("strategy") if isinstance(entry, dict) else None
        named[str(entry.get("name") or f"op-{strategy}") if strategy else "?"] = entry
    return named


# --- the stage configs the sections map onto ----------------------------------------------------


# A section sets the fields of its stage's config dataclass, except those marked `set_by`
# (the experiment fills them in: models, data, paths; `on_policy` ones come from an entry).
STAGE_CONFIGS: dict[str, type] = {"teacher": TeachConfig, "distill": DistillConfig,
                                  "eval": EvalConfig, "attention": AttentionConfig}
# What an `on_policy` entry sets beyond a distill section (lmbda, rounds, ...)
ON_POLICY_ENTRY = tuple(name for name, f in options.settable(DistillConfig, True).items()
                        if f.metadata["set_by"] == "on_policy")
# config section -> stage kind whose fields it takes
SECTION_KINDS = {"teacher": "teacher", "distill": "distill", "sft": "distill", "eval": "eval",
                 "attention": "attention"}


# --- loading and validation ---------------------------------------------------------------------


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise PrimekdError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Path(str(files("primekd") / "configs" / f"{name}.yaml"))


def preset_text(name: str) -> str:
    return preset_path(name).read_text(encoding="utf-8")


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    check_stages: bool = True,
) -> ExperimentConfig:
    """Schema defaults <- preset (default `quick` when no file is given) <- file <- `--set`."""
    raw: dict[str, Any] = {}
    if preset is None and path is None:
        preset = "quick"
    if preset is not None:
        raw = _deep_merge(raw, _read_yaml(preset_path(preset)))
    if path is not None:
        raw = _deep_merge(raw, _read_yaml(Path(path)))
    raw = _normalise(raw)
    for item in overrides or []:
        key, value = parse_override(item)
        raw = _normalise(set_dotted(raw, key, value))
    return config_from_dict(raw, check_stages=check_stages)


def config_from_dict(raw: dict[str, Any], check_stages: bool = True) -> ExperimentConfig:
    config = _build(ExperimentConfig, _normalise(copy.deepcopy(raw)), "")
    _check_semantics(config)
    if check_stages:
        check_stage_sections(config)
        apply_engine(config)
        fill_stage_defaults(config)
    return config


def apply_engine(config: ExperimentConfig) -> None:
    """Check the `engine` section (each role's options over the shared ones)."""
    engine = config.engine
    try:
        for role in ROLES:
            EngineSpec(engine.name, engine.base_url, engine.role_options(role)).check()
    except PrimekdError as e:
        raise PrimekdError(f"config section `engine`: {e}") from None


def fill_stage_defaults(config: ExperimentConfig) -> None:
    """Write every stage field into its section (the stage's default, the experiment's seed
    for `seed`), so the resolved config and the stage hashes pin every value."""
    for section in ("teacher", "distill", "eval", "attention"):
        values = getattr(config, section)
        if section == "attention" and not values.get("enabled", True):
            continue
        defaults = stage_defaults(STAGE_CONFIGS[section])
        if "seed" in defaults:
            defaults["seed"] = config.seed
        extra = {"enabled": values.get("enabled", True)} if section == "attention" else {}
        setattr(config, section, {**extra, **defaults, **values})


def stage_defaults(cls: type) -> dict[str, Any]:
    return plain(options.defaults(cls, options.settable(cls)))


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PrimekdError(f"{path}: a config is a YAML mapping of keys to values")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`distill.alpha=0.5` -> ("distill.alpha", 0.5); the value is read as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise PrimekdError(f"--set {item!r}: write it as dotted.key=value, e.g. distill.alpha=0.5")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise PrimekdError(f"--set {key}: `{where}` is a value, not a section")
        node = child
    node[parts[-1]] = value
    return raw


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    """Accept the short forms: `strategies: [none, teacher]` and `name: null` entries."""
    strategies = raw.get("strategies")
    if isinstance(strategies, str):
        strategies = [strategies]
    if isinstance(strategies, list):
        if not all(isinstance(s, str) for s in strategies):
            raise PrimekdError("`strategies` must be a list of names or a mapping name -> spec")
        raw["strategies"] = {name: {} for name in strategies}
    elif isinstance(strategies, dict):
        raw["strategies"] = {str(k): ({} if v is None else v) for k, v in strategies.items()}
    if isinstance(raw.get("controls"), str):
        raw["controls"] = [raw["controls"]]
    return raw


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Construct schema dataclass `cls` from a mapping: unknown keys are refused, nested
    sections built the same way, and each value checked against its type by pydantic."""
    where = prefix.rstrip(".") or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PrimekdError(f"`{where}` must be a mapping of keys to values, not {data!r}")
    hints = options.hints(cls)
    for key in data:
        if key not in hints:
            raise unknown_key_error(f"{prefix}{key}", hints)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        elif cls is ExperimentConfig and name == "strategies":
            if not isinstance(value, dict) or not value:
                raise PrimekdError("`strategies` must name at least one priming strategy")
            kwargs[name] = {k: _build(StrategySpec, v, f"strategies.{k}.")
                            for k, v in value.items()}
        else:
            _type_error(f"{prefix}{name}", cls, name, value)
            problem = options.out_of_bounds(cls.__dataclass_fields__[name], value)
            if problem:
                raise PrimekdError(f"config key `{prefix}{name}` must be {problem}, "
                                   f"not {value!r}")
            kwargs[name] = float(value) if hint is float else value
    return cls(**kwargs)


def unknown_key_error(key: str, known: typing.Iterable[str]) -> PrimekdError:
    leaf = key.rsplit(".", 1)[-1]
    return PrimekdError(
        f"unknown config key `{key}`{did_you_mean(leaf, known)}; "
        f"valid keys here: {', '.join(sorted(known))}"
    )


def _type_error(key: str, cls: type, name: str, value: Any) -> None:
    expected = options.type_error(cls, name, value)
    if expected:
        raise PrimekdError(f"config key `{key}` is {value!r}; expected {expected}")


def _check_semantics(config: ExperimentConfig) -> None:
    for control in config.controls:
        if control not in CONTROLS:
            raise PrimekdError(
                f"config key `controls` has {control!r}; choose from {', '.join(CONTROLS)}"
            )
    if not config.name or "/" in config.name:
        raise PrimekdError("config key `name` must be a non-empty name without `/`")
    for name, spec in config.strategies.items():
        if not _plain_name(name):
            raise PrimekdError(
                f"strategy name {name!r}: use letters, digits, `_` and `-` only"
            )
        _check_strategy_name(name, spec)
        if spec.user is None and any(v is not None for v in (spec.system, spec.prefill)):
            raise PrimekdError(
                f"strategy `{name}` sets system/prefill without `user`: a custom strategy "
                "needs a `user` template (e.g. \"{{ question }}\")"
            )


def _plain_name(name: str) -> bool:
    return name.replace("_", "").replace("-", "").isalnum()


def _check_strategy_name(name: str, spec: StrategySpec) -> None:
    if spec.custom and name in BUILTIN_STRATEGIES:
        raise PrimekdError(
            f"strategy `{name}` is a built-in: give the custom one another name"
        )
    if not spec.custom and name not in BUILTIN_STRATEGIES:
        raise PrimekdError(
            f"unknown strategy `{name}`: built-ins are {', '.join(BUILTIN_STRATEGIES)}; "
            f"a custom strategy needs a `user` template (strategies.{name}.user)"
        )
    if spec.custom:  # its templates checked now, not when its teacher stage starts
        texts = {"description": spec.description, "user": spec.user, "system": spec.system,
                 "prefill": spec.prefill}
        parse_strategy(name, {k: v for k, v in texts.items() if v is not None},
                       f"config key `strategies.{name}`")


def check_stage_sections(config: ExperimentConfig) -> None:
    """Check the stage sections' keys and value types against the stage config dataclasses
    (the runner's precheck checks ranges, on each stage's built config, before any runs)."""
    for section, kind in SECTION_KINDS.items():
        values = dict(getattr(config, section))
        if section == "attention":
            if not isinstance(values.pop("enabled", True), bool):
                raise PrimekdError("config key `attention.enabled` must be true or false")
            if not config.attention.get("enabled", True):
                continue
        _check_section(section, values, STAGE_CONFIGS[kind])
    for name, spec in config.strategies.items():
        for section in ("teacher", "distill", "eval"):
            _check_section(f"strategies.{name}.{section}", getattr(spec, section),
                           STAGE_CONFIGS[section])
    _check_on_policy(config)


def _check_on_policy(config: ExperimentConfig) -> None:
    """Each `on_policy` entry: a strategy of `strategies`, a free name, known fields."""
    taken = set(CONTROLS) | {f"kd-{s}" for s in config.strategies}
    for i, entry in enumerate(config.on_policy):
        where = f"on_policy[{i}]"
        if not isinstance(entry, dict) or entry.get("strategy") not in config.strategies:
            raise PrimekdError(f"config key `{where}.strategy` must name one of `strategies` "
                               f"({', '.join(config.strategies)})")
        name = str(entry.get("name") or f"op-{entry['strategy']}")
        if name in taken or not _plain_name(name):
            raise PrimekdError(f"config key `{where}.name`: {name!r} is taken or not a plain "
                               "name (letters, digits, `_`, `-`); give each on-policy student "
                               "its own `name`")
        taken.add(name)
        _check_section(where, {k: v for k, v in entry.items() if k != "name"}, DistillConfig,
                       on_policy=True, extra=("name",))


def _check_section(prefix: str, values: dict[str, Any], cls: type, on_policy: bool = False,
                   extra: tuple[str, ...] = ()) -> None:
    known = options.settable(cls, on_policy)
    every = {f.name for f in options.fields(cls)}
    for key, value in values.items():
        if key in every and key not in known:
            raise PrimekdError(
                f"config key `{prefix}.{key}` is set by the experiment itself "
                f"(see `models`, `data`, `engine` and `strategies`); remove it"
            )
        if key not in known:
            raise unknown_key_error(f"{prefix}.{key}", [*known, *extra])
        _type_error(f"{prefix}.{key}", cls, key, value)


# --- helpers ------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """YAML/JSON-friendly: paths to strings, tuples to lists, dataclasses to dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
