"""The whole experiment as a recipe: config -> stage graph -> cached stages -> report.

Read it top to bottom like a script:

1. `load_config` builds an `ExperimentConfig` from a preset, a YAML file and `--set` overrides,
   checking every key and value (errors name the dotted key and say what to do);
2. `plan` turns the config into stages, one small function call each: a teacher per
   strategy, a student per experiment (`sft`, `kd-<strategy>`; `base` is the untrained
   student), an evaluation per experiment on the same test questions, one attention
   analysis over all students, and the report;
3. `run_experiment` runs the stages in order. Each stage is cached by a hash of its own
   resolved config and its upstream stages' hashes, recorded in `.stages/<stage>.json` in
   the run directory (beside, not inside, the stage's own directory, which the stage
   functions own): a complete stage with an unchanged hash is skipped, a stage with a changed
   hash is cleared and rerun, and an interrupted stage is resumed (the stage functions resume).

The stage sections of the config (`teacher`, `distill`, `sft`, `eval`, `attention`) take the
fields of the stage's own config dataclass (`TeachConfig`, `DistillConfig`, `EvalConfig`,
`AttentionConfig`), except the ones the experiment fills in (models, data, paths).
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import fnmatch
import hashlib
import json
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from primekd.analyze.attention.config import AttentionConfig
from primekd.core import options
from primekd.core.errors import PrimekdError, did_you_mean
from primekd.core.io import read_json, read_yaml, write_json
from primekd.core.options import option
from primekd.distill.config import DistillConfig
from primekd.evaluate.evaluator import EvalConfig
from primekd.experiment import report
from primekd.experiment.report import RECORDS, record_path
from primekd.teach.teacher import TeachConfig

PRESETS = ("quick", "small", "small-onpolicy", "paper")
CONTROLS = ("base", "sft")
CACHE_VERSION = 1  # bump to invalidate every cached stage after a format change

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


@dataclass
class EngineSection:
    """The generation engine of the teacher and eval stages (a stage section may still set
    its own `engine`/`engine_options`). `base_url` is not part of any stage's hash."""

    name: str = "hf"  # hf | vllm
    base_url: str | None = None  # vllm: a running server instead of one primekd starts
    options: dict[str, Any] = field(default_factory=dict)  # vllm server/client options


@dataclass
class ReportSection:
    title: str | None = None
    examples: int = option(1, "Worked examples (questions) shown.", ge=0)
    max_response_chars: int = 1200  # responses are cut to this length in the report


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

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["strategies"] = {  # a built-in strategy without overrides reads as `name: {}`
            name: {k: v for k, v in spec.items() if v not in (None, {})}
            for name, spec in data["strategies"].items()
        }
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False, allow_unicode=True)

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
    """Check the `engine` section (the teacher and eval stages' engine)."""
    from primekd.engines import EngineSpec

    engine = config.engine
    try:
        EngineSpec(engine.name, engine.base_url, dict(engine.options)).check()
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
    return _plain(options.defaults(cls, options.settable(cls)))


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
        if not name.replace("_", "").replace("-", "").isalnum():
            raise PrimekdError(
                f"strategy name {name!r}: use letters, digits, `_` and `-` only"
            )
        _check_strategy_name(name, spec)
        if spec.user is None and any(v is not None for v in (spec.system, spec.prefill)):
            raise PrimekdError(
                f"strategy `{name}` sets system/prefill without `user`: a custom strategy "
                "needs a `user` template (e.g. \"{{ question }}\")"
            )


def _check_strategy_name(name: str, spec: StrategySpec) -> None:
    try:
        from primekd.teach.priming import BUILTIN_STRATEGIES
    except ImportError:  # the teacher stage is absent: it reports that itself
        return
    if spec.custom and name in BUILTIN_STRATEGIES:
        raise PrimekdError(
            f"strategy `{name}` is a built-in: give the custom one another name"
        )
    if not spec.custom and name not in BUILTIN_STRATEGIES:
        raise PrimekdError(
            f"unknown strategy `{name}`: built-ins are {', '.join(BUILTIN_STRATEGIES)}; "
            f"a custom strategy needs a `user` template (strategies.{name}.user)"
        )


def check_stage_sections(config: ExperimentConfig) -> None:
    """Check the stage sections against the stage config dataclasses, then build every stage
    config once, so that a bad value fails before anything runs."""
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
        if name in taken or not name.replace("_", "").replace("-", "").isalnum():
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


# --- the stage graph ----------------------------------------------------------------------------


@dataclass
class Stage:
    """One cached step: `params` are hashed; `paths` (outputs, upstream dirs) are not."""

    name: str  # "teacher/none", "students/kd-none", "eval/base", "attention", "report"
    kind: str  # teacher | distill | eval | attention | report
    directory: Path
    params: dict[str, Any]
    paths: dict[str, Any] = field(default_factory=dict)
    upstream: tuple[str, ...] = ()
    hash: str = ""
    run_dir: Path = Path(".")

    @property
    def record_path(self) -> Path:
        return record_path(self.run_dir, self.name)

    def record(self) -> dict[str, Any] | None:
        try:
            return read_json(self.record_path)
        except PrimekdError:
            return None

    def state(self) -> str:
        """`cached` (complete, same hash), `resume` (interrupted, same hash), `changed`
        (another hash: cleared and rerun) or `new`."""
        record = self.record()
        if record is None:
            return "changed" if _has_content(self.directory) else "new"
        if record.get("hash") != self.hash:
            return "changed"
        if not self.directory.is_dir():
            return "new"  # deleted by hand: make it again
        return "cached" if record.get("status") == "complete" else "resume"


def _has_content(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def stage_hash(kind: str, params: dict[str, Any], upstream_hashes: list[str]) -> str:
    payload = json.dumps(
        {"cache_version": CACHE_VERSION, "kind": kind, "params": _plain(params),
         "upstream": upstream_hashes},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan(config: ExperimentConfig, out: str | Path) -> list[Stage]:
    """Every stage of the experiment, upstream first, each with its hash."""
    out = Path(out)
    stages: list[Stage] = []
    for name, spec in config.strategies.items():
        stages += teacher_stages(config, out, name, spec)
    # the untrained student's evaluation right after the teachers: with teacher == student
    # (self-distillation) on the vllm engine it reuses their server instead of starting one
    if "base" in config.experiments:
        stages.append(eval_stage(config, out, "base"))
    on_policy = on_policy_students(config)
    for experiment in config.experiments:
        if experiment in on_policy:
            stages.append(on_policy_stage(config, out, experiment, on_policy[experiment]))
        elif experiment != "base":
            stages.append(student_stage(config, out, experiment))
    for experiment in config.experiments:
        if experiment != "base":
            stages.append(eval_stage(config, out, experiment))
    if config.attention.get("enabled", True):
        stages.append(attention_stage(config, out))
    stages.append(report_stage(config, out, stages))
    by_name: dict[str, Stage] = {}
    for stage in stages:
        stage.run_dir = out
        stage.hash = stage_hash(stage.kind, stage.params,
                                [by_name[u].hash for u in stage.upstream])
        by_name[stage.name] = stage
    return stages


def _slice(slc: DataSlice) -> dict[str, Any]:
    return dataclasses.asdict(slc)


def data_file(out: Path, which: str) -> Path:
    """The selected questions, written once per run so every stage reads the same ones."""
    return out / "data" / f"{which}.jsonl"


def _with_seed(kind: str, values: dict[str, Any], seed: int) -> dict[str, Any]:
    """The experiment's seed, where the stage has a `seed` field the config leaves unset."""
    if "seed" in options.settable(STAGE_CONFIGS[kind]) and "seed" not in values:
        values = {**values, "seed": seed}
    return values


# Params whose key starts with `_` are hashed but not passed to the stage's config.


def teacher_stages(
    config: ExperimentConfig, out: Path, name: str, spec: StrategySpec
) -> list[Stage]:
    """One teacher stage per strategy, or one per shard with `teacher_shards` > 1."""
    params = _with_seed("teacher", {**config.teacher, **spec.teacher}, config.seed)
    params |= {"teacher": config.models.teacher, "strategy": name,
               "_transfer": _slice(config.data.transfer), **_engine(config)}
    paths: dict[str, Any] = {"data": data_file(out, "transfer"), **_base_url(config, params)}
    if spec.custom:
        params["_strategy_spec"] = {
            "description": spec.description or f"custom strategy {name}",
            "user": spec.user, "system": spec.system, "prefill": spec.prefill or ""}
        paths["strategies_file"] = out / RECORDS / "strategies" / f"{name}.yaml"
    shards = config.teacher_shards
    if shards == 1:
        directory = out / "teacher" / name
        return [Stage(f"teacher/{name}", "teacher", directory, params,
                      {**paths, "out": directory})]
    stages = []
    for index in range(shards):
        shard = shard_name(index, shards)
        directory = out / "teacher" / name / shard
        stages.append(Stage(f"teacher/{name}/{shard}", "teacher", directory,
                            {**params, "shard": f"{index}/{shards}"},
                            {**paths, "out": directory}))
    return stages


def shard_name(index: int, count: int) -> str:
    return f"shard-{index}-of-{count}"


def teacher_store_dirs(config: ExperimentConfig, out: Path, strategy: str) -> list[Path]:
    """The store directories of one strategy's teacher: one, or one per shard."""
    root = out / "teacher" / strategy
    if config.teacher_shards == 1:
        return [root]
    return [root / shard_name(i, config.teacher_shards) for i in range(config.teacher_shards)]


def _engine(config: ExperimentConfig) -> dict[str, Any]:
    return {"engine": config.engine.name, "engine_options": dict(config.engine.options)}


def _base_url(config: ExperimentConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The engine section's server, for stages on the vllm engine (a path: not hashed)."""
    if params.get("engine") == "vllm" and config.engine.base_url:
        return {"base_url": config.engine.base_url}
    return {}


def student_stage(config: ExperimentConfig, out: Path, experiment: str) -> Stage:
    directory = out / "students" / experiment
    paths: dict[str, Any] = {"out": directory, "resume": True}
    if experiment == "sft":
        params = _with_seed("distill", {**config.distill, **config.sft}, config.seed)
        params |= {"student": config.models.student, "objective": "sft",
                   "_transfer": _slice(config.data.transfer)}
        paths["data"] = data_file(out, "transfer")
        return Stage(f"students/{experiment}", "distill", directory, params, paths)
    strategy = experiment.removeprefix("kd-")
    params = {**config.distill, **config.strategies[strategy].distill}
    params = _with_seed("distill", params, config.seed)
    params |= {"student": config.models.student, "objective": "kd"}
    stores = teacher_store_dirs(config, out, strategy)
    paths["teacher_store"] = stores[0] if len(stores) == 1 else stores
    upstream = tuple(f"teacher/{d.relative_to(out / 'teacher').as_posix()}" for d in stores)
    return Stage(f"students/{experiment}", "distill", directory, params, paths,
                 upstream=upstream)


def on_policy_stage(config: ExperimentConfig, out: Path, name: str, entry: dict[str, Any]
                    ) -> Stage:
    """An on-policy student: the student's rollouts on the transfer questions, scored by the
    teacher under the entry's strategy (`distill --on-policy`); lmbda < 1 mixes in the
    strategy's teacher store."""
    from primekd.distill.config import DistillConfig

    strategy = entry["strategy"]
    defaults = DistillConfig()
    settings = {key: getattr(defaults, key) for key in ON_POLICY_ENTRY}
    settings["alpha"] = 0.0  # the divergence alone: CE on its own samples self-trains
    params = {**config.distill, **config.strategies[strategy].distill, **settings}
    params |= {k: v for k, v in entry.items() if k != "name"}
    params = _with_seed("distill", params, config.seed)
    params |= {"student": config.models.student, "objective": "kd", "on_policy": True,
               "teacher": config.models.teacher, "_transfer": _slice(config.data.transfer),
               **_engine(config)}
    for key in ("val_size", "epochs", "max_steps"):  # rounds decide the steps
        params.pop(key, None)
    directory = out / "students" / name
    paths: dict[str, Any] = {"out": directory, "resume": True,
                             "data": data_file(out, "transfer")}
    # The teacher stage(s) only when the store (lmbda < 1) or the strategy file (custom) is read.
    stores = teacher_store_dirs(config, out, strategy)
    upstream: tuple[str, ...] = ()
    if params["lmbda"] < 1 or config.strategies[strategy].custom:
        upstream = tuple(f"teacher/{d.relative_to(out / 'teacher').as_posix()}" for d in stores)
    if params["lmbda"] < 1:
        paths["teacher_store"] = stores[0] if len(stores) == 1 else [str(d) for d in stores]
    if config.strategies[strategy].custom:
        paths["strategies_file"] = out / RECORDS / "strategies" / f"{strategy}.yaml"
    return Stage(f"students/{name}", "distill", directory, params, paths, upstream=upstream)


def eval_stage(config: ExperimentConfig, out: Path, experiment: str) -> Stage:
    overrides: dict[str, Any] = {}
    if experiment.startswith("kd-"):
        overrides = config.strategies[experiment.removeprefix("kd-")].eval
    params = _with_seed("eval", {**config.eval, **overrides}, config.seed)
    params |= {"model": config.models.student, "_test": _slice(config.data.test),
               **_engine(config)}
    directory = out / "eval" / experiment
    paths: dict[str, Any] = {"out": directory, "data": data_file(out, "test"),
                             **_base_url(config, params)}
    upstream: tuple[str, ...] = ()
    if experiment != "base":
        paths["adapter"] = out / "students" / experiment
        upstream = (f"students/{experiment}",)
    return Stage(f"eval/{experiment}", "eval", directory, params, paths, upstream)


def attention_stage(config: ExperimentConfig, out: Path) -> Stage:
    params = {k: v for k, v in config.attention.items() if k != "enabled"}
    params = _with_seed("attention", params, config.seed)
    params |= {"model": config.models.student, "_test": _slice(config.data.test)}
    trained = [e for e in config.experiments if e != "base"]
    paths = {"out": out / "attention", "data": data_file(out, "test"),
             "adapters": {e: out / "students" / e for e in trained},
             "results": {e: out / "eval" / e / "results.jsonl" for e in config.experiments}}
    upstream = tuple(f"students/{e}" for e in trained) + tuple(
        f"eval/{e}" for e in config.experiments)
    return Stage("attention", "attention", out / "attention", params, paths, upstream)


def report_stage(config: ExperimentConfig, out: Path, stages: list[Stage]) -> Stage:
    hashed = _plain(config.to_dict())
    hashed["engine"].pop("base_url", None)  # where the server runs changes no result
    params = {"report": dataclasses.asdict(config.report), "format": report.FORMAT_VERSION,
              "config": hashed}
    layout = report.Layout(
        run_dir=out,
        teachers={name: out / "teacher" / name for name in config.strategies},
        students={s.name.split("/", 1)[1]: s.directory for s in stages if s.kind == "distill"},
        evals={s.name.split("/", 1)[1]: s.directory for s in stages if s.kind == "eval"},
        attention=next((s.directory for s in stages if s.kind == "attention"), None),
        stages={s.name: s.directory for s in stages},
    )
    return Stage("report", "report", out / report.ASSETS, params,
                 {"out": out, "layout": layout}, upstream=tuple(s.name for s in stages))


# --- running the stages -------------------------------------------------------------------------


def stage_config(stage: Stage) -> Any:
    """The stage's own config dataclass, built from its params and paths."""
    cls = STAGE_CONFIGS[stage.kind]
    values = {k: v for k, v in stage.params.items() if not k.startswith("_")}
    values |= {k: _path_value(v) for k, v in stage.paths.items()}
    accepted = {f.name for f in dataclasses.fields(cls)}
    values = _rename_for(cls, values)
    missing = sorted(set(values) - accepted)
    if missing:
        raise PrimekdError(
            f"{cls.__name__} has no field(s) {', '.join(missing)}: this primekd's "
            f"{stage.kind} stage does not match the experiment runner"
        )
    try:
        return cls(**values)
    except PrimekdError as e:
        raise PrimekdError(f"{stage.name}: {e}") from None
    except (TypeError, ValueError) as e:
        raise PrimekdError(f"{stage.name}: bad settings: {e}") from None


def _rename_for(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Map the runner's generic names onto the stage config's (`teacher`/`model`, ...)."""
    accepted = {f.name for f in dataclasses.fields(cls)}
    renamed = dict(values)
    for ours, alternatives in (("teacher", ("model",)), ("student", ("model",))):
        if ours in renamed and ours not in accepted:
            for alt in alternatives:
                if alt in accepted:
                    renamed[alt] = renamed.pop(ours)
                    break
    return renamed


def _path_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _path_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_path_value(v) for v in value]
    return value


StageFunction = Callable[[Stage, bool], Any]


def run_teacher(stage: Stage, progress: bool) -> Any:
    from primekd.core.io import atomic_write_text
    from primekd.teach.teacher import teach

    if "_strategy_spec" in stage.params:  # a custom strategy: the file `teach` reads
        spec = {k: v for k, v in stage.params["_strategy_spec"].items() if v is not None}
        text = yaml.safe_dump({"strategies": {stage.params["strategy"]: spec}}, sort_keys=False)
        atomic_write_text(stage.paths["strategies_file"], text)
    return teach(stage_config(stage), progress=progress)


def run_distill(stage: Stage, progress: bool) -> Any:
    from primekd.distill import distill
    from primekd.distill.trainer import remove_checkpoints

    result = distill(stage_config(stage), progress=progress)
    remove_checkpoints(stage.directory)  # finished: the adapter stays, resume state goes
    return result.summary


def run_eval(stage: Stage, progress: bool) -> Any:
    from primekd.evaluate.evaluator import evaluate

    return evaluate(stage_config(stage), progress=progress)


def run_attention(stage: Stage, progress: bool) -> Any:
    from primekd.analyze import attention

    result = attention.analyse(stage_config(stage), progress=progress)
    return result.summary  # the tables are in the stage directory


def run_report(stage: Stage, progress: bool) -> Any:
    settings = stage.params["report"]
    return report.write_report(stage.paths["out"], stage.paths["layout"], **settings)


STAGE_FUNCTIONS: dict[str, StageFunction] = {
    "teacher": run_teacher, "distill": run_distill, "eval": run_eval,
    "attention": run_attention, "report": run_report,
}


@dataclass
class StageOutcome:
    name: str
    state: str  # what it was before this run: cached | resume | changed | new
    ran: bool
    wall_time_s: float  # of this run (0 when cached)
    directory: str


@dataclass
class RunSummary:
    out: str
    stages: list[StageOutcome]
    wall_time_s: float
    report_md: str
    report_html: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Callback = Callable[[str, Stage, int, int, str], None]  # event, stage, index, total, state


def run_experiment(
    config: ExperimentConfig,
    out: str | Path | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    stage_functions: dict[str, StageFunction] | None = None,
    force: bool = False,
    only: list[str] | None = None,
) -> RunSummary:
    """Run every stage that is not cached, in order; returns what ran and what was cached.

    `force`: run in a non-empty directory primekd did not make, beside the files there.
    `only` (stage names or globs such as `teacher/none/shard-*`) runs just those stages, whose
    upstream stages must be complete: several `run --only` processes (one per teacher shard,
    say) can share a run directory."""
    from primekd.core import outdir

    out = Path(out or Path("runs") / config.name)
    functions = {**STAGE_FUNCTIONS, **(stage_functions or {})}
    stages = plan(config, out)
    for stage in stages:
        precheck(stage)
    start = time.perf_counter()
    outcomes = []
    selected = select_stages(stages, only)
    with outdir.claimed(out, "run", force, shared=bool(only)), \
            stage_locks(out, [s.name for s in selected] if only else []):
        write_config(config, out)
        write_data_files(config, out)
        clear_stale_teachers(stages, out)
        try:
            for index, stage in enumerate(selected, start=1):
                if stage.kind not in ("teacher", "eval"):
                    _stop_engine_server()  # training needs the memory a server holds
                outcomes.append(run_stage(stage, functions[stage.kind], progress, callback,
                                          index, len(selected)))
        finally:
            _stop_engine_server()
    return RunSummary(str(out), outcomes, time.perf_counter() - start,
                      str(out / "report.md"), str(out / "report.html"))


def _stop_engine_server() -> None:
    """Stop the vLLM server that teacher/eval stages share (kept up between them, so that
    stages of one model start it once)."""
    import sys

    module = sys.modules.get("primekd.engines.vllm")
    if module is not None:
        module.shutdown()


def write_config(config: ExperimentConfig, out: Path) -> None:
    from primekd.core.io import atomic_write_text

    header = ("# Resolved primekd experiment config. Rerun it with:\n"
              f"#   primekd run {out / 'config.yaml'} --out {out}\n")
    atomic_write_text(out / "config.yaml", header + config.to_yaml())


def write_data_files(config: ExperimentConfig, out: Path) -> None:
    """The transfer and test questions as JSONL (ids kept), rewritten only if they differ."""
    from primekd.core.data import load_examples
    from primekd.core.io import atomic_write_text

    for which, slc in (("transfer", config.data.transfer), ("test", config.data.test)):
        examples = load_examples(slc.split, slc.limit, slc.offset, slc.sample, slc.seed)
        text = "".join(json.dumps({"id": e.id, "question": e.question, "answer": e.answer},
                                  ensure_ascii=False) + "\n" for e in examples)
        path = data_file(out, which)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)


def run_stage(
    stage: Stage,
    function: StageFunction,
    progress: bool = True,
    callback: Callback | None = None,
    index: int = 1,
    total: int = 1,
) -> StageOutcome:
    state = stage.state()
    if callback:
        callback("start", stage, index, total, state)
    if state == "cached":
        if callback:
            callback("end", stage, index, total, state)
        return StageOutcome(stage.name, state, False, 0.0, str(stage.directory))
    if state == "changed":
        clear_stage_dir(stage)
    previous = stage.record() or {}
    spent = (previous.get("wall_time_s", 0.0), previous.get("cpu_time_s", 0.0))
    started, cpu_started = time.perf_counter(), time.process_time()
    _write_record(stage, "running", spent, None)
    try:
        result = function(stage, progress)
    except PrimekdError as e:
        message = str(e)
        raise PrimekdError(message if message.startswith(f"{stage.name}:")
                           else f"{stage.name}: {message}") from None
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    # times accumulate over resumed attempts (that finished): the compute the stage cost
    _write_record(stage, "complete", (spent[0] + wall, spent[1] + cpu), result)
    if callback:
        callback("end", stage, index, total, state)
    return StageOutcome(stage.name, state, True, wall, str(stage.directory))


_COMMANDS = {"teacher": "teach", "distill": "distill", "eval": "eval",
             "attention": "attention", "report": "report"}


def precheck(stage: Stage) -> None:
    """The stage's options checked (types, finiteness, ranges) before any stage runs."""
    from primekd.core import validate

    if stage.kind not in ("teacher", "distill", "eval"):
        return
    config = stage_config(stage)
    try:
        if stage.kind == "teacher":
            from primekd.teach.teacher import check_config

            check_config(config)
        elif stage.kind == "distill":
            options.check(config)
        else:
            validate.check_eval(config)
            config.engine_spec().check()
    except PrimekdError as e:
        raise PrimekdError(f"{stage.name}: {e}") from None


def clear_stage_dir(stage: Stage) -> None:
    """Remove a stage's outputs made under another hash (stale, never mixed with new ones).

    Only what primekd wrote goes (by the directory's marker, or, for a stage this run
    recorded, the stage's output names); anything else stops the run with one line."""
    from primekd.core import outdir

    if stage.kind == "report":
        for name in ("report.md", "report.html"):
            (stage.paths["out"] / name).unlink(missing_ok=True)
    trusted = _COMMANDS[stage.kind] if stage.record() is not None else None
    kept = outdir.remove_owned(stage.directory, trust=trusted)
    if kept:
        names = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
        raise PrimekdError(f"{stage.directory} holds files primekd did not write ({names}); "
                           "the stage must be redone there: move them, or choose another "
                           "--out")
    stage.record_path.unlink(missing_ok=True)


def _write_record(stage: Stage, status: str, times: tuple[float, float], result: Any) -> None:
    record = {
        "stage": stage.name,
        "kind": stage.kind,
        "hash": stage.hash,
        "status": status,
        "upstream": list(stage.upstream),
        "params": _plain(stage.params),
        "wall_time_s": round(times[0], 3),
        "cpu_time_s": round(times[1], 3),  # process CPU time, all threads
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if status == "complete":
        record["completed_at"] = record["updated_at"]
        record["summary"] = _summary_of(result)
    write_json(stage.record_path, record)


def _summary_of(result: Any) -> Any:
    if result is None:
        return None
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    try:
        return json.loads(json.dumps(result, default=str))
    except (TypeError, ValueError):
        return str(result)


def select_stages(stages: list[Stage], only: list[str] | None) -> list[Stage]:
    """The stages `--only` names (all of them without it); their upstream must be complete."""
    if not only:
        return stages
    selected = [s for s in stages if any(fnmatch.fnmatchcase(s.name, p) for p in only)]
    unmatched = [p for p in only if not any(fnmatch.fnmatchcase(s.name, p) for s in stages)]
    if unmatched:
        raise PrimekdError(f"--only {unmatched[0]} names no stage of this run; "
                           "`primekd run --dry-run` lists them")
    chosen = {s.name for s in selected}
    by_name = {s.name: s for s in stages}
    for stage in selected:
        for name in stage.upstream:
            if name not in chosen and by_name[name].state() != "cached":
                raise PrimekdError(f"{stage.name} needs {name}, which is not complete: "
                                   "run it first (or include it in --only)")
    return selected


def clear_stale_teachers(stages: list[Stage], out: Path) -> None:
    """After `teacher_shards` changed, remove the teacher stores made under the other layout
    (their records say primekd made them), so a strategy's directory holds one layout only."""
    from primekd.core import outdir

    planned = {s.name for s in stages if s.kind == "teacher"}
    records = out / RECORDS
    if not records.is_dir():
        return
    for path in sorted(records.glob("teacher--*.json")):
        try:
            name = read_json(path)["stage"]
        except (PrimekdError, KeyError, TypeError):
            continue
        if name in planned:
            continue
        directory = out / "teacher" / name.removeprefix("teacher/")
        # only the old store's own files go: new shard directories and the user's files stay
        if not outdir.remove_owned(directory, trust="teach") and directory.is_dir():
            directory.rmdir()
        path.unlink(missing_ok=True)  # another `run --only` may have cleared it first


@contextmanager
def run_lock(out: Path, only_stages: list[str] | None = None) -> Iterator[None]:
    """One `primekd run` per run directory at a time (a lock on the directory itself).
    `run --only` processes share the directory (a shared lock) and each holds its own stages,
    so that teacher shards can run in parallel, on several machines over a shared file system."""
    from primekd.core.outdir import locked

    with locked(out, "run", shared=only_stages is not None), stage_locks(out, only_stages or []):
        yield


@contextmanager
def stage_locks(out: Path, names: list[str]) -> Iterator[None]:
    """An exclusive lock per stage, on a file beside the stage's record in `.stages/`."""
    handles = []
    try:
        for name in names:
            path = record_path(out, name).with_suffix(".lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            handles.append(path.open("a+"))
            try:
                fcntl.flock(handles[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PrimekdError(
                    f"another `primekd run --only` is running {name} in {out}") from None
        yield
    finally:
        for handle in handles:
            handle.close()  # closing releases the lock; the files stay (unlinking would race)


# --- helpers ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """YAML/JSON-friendly: paths to strings, tuples to lists, dataclasses to dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
