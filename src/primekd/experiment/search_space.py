"""The search space of `primekd tune`: which `DistillConfig` fields a study searches, and how.

A space maps `DistillConfig` field names to a range (`{low, high[, log, step, type]}`, float or
int), a list of `{choices: [...]}`, or a plain value that fixes the field for every trial. Each
spec is checked by a pydantic model (a range or choices); what a field may hold is its
`DistillConfig` type.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml

from primekd.core import options
from primekd.core.errors import PrimekdError, did_you_mean
from primekd.core.io import read_yaml
from primekd.distill.config import DistillConfig

if TYPE_CHECKING:
    import optuna
    from pydantic import BaseModel

# The DistillConfig fields tune sets in every trial from its own options (trial_distill_config)
TRIAL_FIELDS = ("student", "teacher_store", "out", "max_steps", "val_size", "eval_steps", "seed")
_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices"}


def reserved_fields() -> set[str]:
    """What a search space may not set: tune's own trial settings, `epochs` (`max_steps` is
    the budget) and what a caller fills in (`set_by="experiment"`: paths, models, data,
    resume, as in `run` configs)."""
    return {*TRIAL_FIELDS, "epochs", *(f.name for f in options.fields(DistillConfig)
                                       if f.metadata.get("set_by") == "experiment")}


@dataclass(frozen=True)
class Param:
    """One searched `DistillConfig` field: a float or int range, or a list of choices."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            step = int(self.step or 1)
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """The values at the edges of the range (every choice of a categorical)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def to_yaml(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        spec: dict[str, Any] = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            spec["log"] = True
        if self.step is not None:
            spec["step"] = self.step
        return spec


@dataclass
class SearchSpace:
    """Searched parameters plus fixed `DistillConfig` values shared by every trial."""

    params: list[Param]
    fixed: dict[str, Any] = field(default_factory=dict)

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        return {**self.fixed, **{p.name: p.suggest(trial) for p in self.params}}

    def to_yaml(self) -> str:
        data = {p.name: p.to_yaml() for p in self.params} | self.fixed
        return yaml.safe_dump(data, sort_keys=False)


def default_search_space() -> SearchSpace:
    """The paper's knobs: KD weight, temperature, learning rate and LoRA rank."""
    return SearchSpace(
        params=[
            Param("alpha", "float", 0.0, 1.0),
            Param("temperature", "float", 1.0, 10.0, log=True),
            Param("lr", "float", 1e-5, 1e-3, log=True),
            Param("lora_r", "categorical", choices=(4, 8, 16)),
        ]
    )


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and check a search space YAML file (format: see `parse_search_space`)."""
    data = read_yaml(path, "search space file")
    return parse_search_space(data, source=str(path))


def parse_search_space(data: Any, source: str = "search space") -> SearchSpace:
    """Check a search space given as a mapping of `DistillConfig` field -> spec.

    A spec with `low`/`high` (optional `log`, `step`, `type: int|float`) is a range, one with
    `choices` a categorical; any plain value fixes the field for every trial.
    """
    if not isinstance(data, dict) or not data:
        raise PrimekdError(
            f"{source} must be a YAML mapping of DistillConfig fields to ranges, "
            "e.g. `alpha: {low: 0.0, high: 1.0}`"
        )
    known = options.defaults(DistillConfig)
    params: list[Param] = []
    fixed: dict[str, Any] = {}
    for name, spec in data.items():
        _check_field(str(name), known)
        if isinstance(spec, dict):
            params.append(_parse_param(str(name), spec, known[name]))
        else:
            fixed[str(name)] = spec
    if not params:
        raise PrimekdError(f"{source} fixes every field and searches none")
    return SearchSpace(params, fixed)


def _check_field(name: str, known: dict[str, Any]) -> None:
    reserved = reserved_fields()
    if name in reserved:
        raise PrimekdError(
            f"search space: {name!r} is set by primekd tune itself "
            "(use its command-line options), not by the search space"
        )
    if name not in known:
        raise PrimekdError(
            f"search space: {name!r} is not a DistillConfig field{did_you_mean(name, known)}; "
            f"fields: {', '.join(sorted(set(known) - reserved))}"
        )


def _yaml_number(value: Any) -> Any:
    """PyYAML reads `1e-5` as text; it is still a number."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


@functools.cache
def _models() -> tuple[type[BaseModel], type[BaseModel]]:
    """The pydantic models of a range and of choices (built on first use: pydantic, ~50
    modules, stays out of the CLI's start-up)."""
    from pydantic import (
        BaseModel,
        BeforeValidator,
        ConfigDict,
        Field,
        StrictBool,
        StrictFloat,
        StrictInt,
        StrictStr,
    )

    number = Annotated[StrictInt | StrictFloat, BeforeValidator(_yaml_number)]

    class Range(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

        type: Literal["float", "int"] | None = None
        low: number
        high: number
        log: bool = False
        step: number | None = Field(None, gt=0)

    class Choices(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

        type: str | None = None
        choices: list[StrictStr | StrictBool | StrictInt | StrictFloat | None] = Field(
            min_length=1)

    return Range, Choices


def _parse_param(name: str, spec: dict[str, Any], default: Any) -> Param:
    if "choices" in spec:
        if set(spec) - {"choices", "type"}:
            raise PrimekdError(f"search space: {name}: `choices` cannot be mixed with a range")
        choices = _validate(_models()[1], name, spec).choices
        for choice in choices:  # of the option's type (`lora_r: [4, "eight"]` fails)
            if expected := options.type_error(DistillConfig, name, choice):
                flag = options.field_flag(DistillConfig, name)
                raise PrimekdError(f"search space: {name}: choice {choice!r}: {flag} must be "
                                   f"{expected}, not {choice!r}")
        return Param(name, "categorical", choices=tuple(choices))
    r = _validate(_models()[0], name, spec)
    ints = isinstance(r.low, int) and isinstance(r.high, int)
    kind = r.type or ("int" if ints and not isinstance(default, float) else "float")
    if kind == "float" and isinstance(default, int) and not isinstance(default, bool):
        raise PrimekdError(f"search space: {name} is an integer field; use `type: int`")
    problem = (f"low ({r.low}) must be below high ({r.high})" if not r.low < r.high
               else f"a log range needs low > 0, not {r.low}" if r.log and r.low <= 0
               else "`step` cannot be used with `log: true`" if r.log and r.step is not None
               else "an int range needs whole-number bounds"
               if kind == "int" and (r.low != int(r.low) or r.high != int(r.high)) else None)
    if problem:
        raise PrimekdError(f"search space: {name}: {problem}")
    return Param(name, kind, r.low, r.high, log=r.log, step=r.step)


def _validate(model: type[BaseModel], name: str, spec: dict[str, Any]) -> Any:
    """The spec as `model`, or one line naming its first problem (unknown keys first, a
    union's type mismatch last)."""
    from pydantic import ValidationError

    try:
        return model.model_validate(spec)
    except ValidationError as e:
        error = min(e.errors(), key=lambda item: (item["type"] != "extra_forbidden",
                                                  item["type"] in ("int_type", "float_type")))
    key, value = error["loc"][0], error["input"]
    if error["type"] == "extra_forbidden":
        unknown = sorted(set(spec) - set(model.model_fields))
        problem = f": unknown key(s) {unknown}; use {sorted(_SPEC_KEYS)}"
    elif error["type"] == "missing":
        problem = " needs `low` and `high` (a range) or `choices` (a list)"
    elif key == "choices":
        problem = (": `choices` must be a non-empty list" if len(error["loc"]) == 1 else
                   f": choice {value!r} must be a string, number or boolean")
    elif key in ("type", "log"):
        problem = f".{key} must be {'float or int' if key == 'type' else 'true or false'}, " \
                  f"not {value!r}"
    else:
        what = {"finite_number": "a finite number", "greater_than": "positive"}
        problem = f".{key} must be {what.get(error['type'], 'a number')}, not {value!r}"
    raise PrimekdError(f"search space: {name}{problem}")

