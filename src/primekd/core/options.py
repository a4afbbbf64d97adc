"""One definition per option: a stage's options are the fields of one dataclass.

Each field carries its default, its help text and, where the command line differs from the
field name, its flags (`option(4, "LoRA rank.", flags=("--lora-r",))`). From that one place:

- `command` builds the typer command's parameters (typer reads `inspect.signature`);
- `type_error` checks a value against the field's type with pydantic (strict: `true` is not an
  integer, `2.7` is not one either, NaN and inf are not numbers), for YAML files, `run`
  configs, `--set` overrides and tuning spaces alike;
- `settable` says which fields a `run` config section may set: a field marked
  `set_by="experiment"` is filled in by the experiment itself (models, data, paths), one marked
  `set_by="on_policy"` only by an `on_policy` entry;
- `defaults` lists every default, so a resolved config pins every value.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import typer

from primekd.core.errors import PrimekdError, did_you_mean

MISSING = dataclasses.MISSING
# pydantic error type -> what the value should have been, in the words of the messages
_EXPECTED = {
    "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
    "finite_number": "a finite number", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
    "none_required": "null", "is_instance_of": "a path or string",
    "dataclass_type": "a mapping", "model_type": "a mapping",
}


def option(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           flags: tuple[str, ...] = (), default_text: str | None = None,
           set_by: str | None = None, cli: bool = True, cli_type: Any = None,
           parse: Callable[[Any], Any] | None = None, name: str | None = None,
           metavar: str | None = None, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None,
           choices: Iterable[str] | None = None, run_only: bool = False) -> Any:
    """A dataclass field that is also a command-line option.

    `flags`: the option's names (default `--field-name`, `--x/--no-x` for booleans);
    `default_text`: what `--help` says the default is (default: the value itself);
    `set_by`: "experiment" or "on_policy" where a `run` section must not set it;
    `cli=False`: no command-line option; `cli_type`/`parse`/`name`: the command line takes
    another type (e.g. repeated `--engine-option k=v`, parsed into a dict) under another
    parameter name; `ge`/`gt`/`le`/`lt`: the range of a number; `choices`: the values a
    string may take (None passes both); `run_only`: changes how a run goes, not what it
    produces (a resumed run may change it).
    """
    metadata = {"help": help, "flags": flags, "default_text": default_text, "set_by": set_by,
                "cli": cli, "cli_type": cli_type, "parse": parse, "cli_name": name,
                "metavar": metavar, "ge": ge, "gt": gt, "le": le, "lt": lt,
                "choices": tuple(choices) if choices is not None else None,
                "run_only": run_only}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


FORCE_HELP = ("Write into a non-empty --out that primekd did not make, beside the files "
              "there (never overwriting or deleting them).")


def force_field(**extra: Any) -> Any:
    """`--force`, the same in every stage that writes an --out (docs/outputs.md)."""
    return option(False, FORCE_HELP, flags=("--force",), set_by="experiment", **extra)


def fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flag(f: dataclasses.Field) -> str:
    """The option's long name, as error messages spell it (`--lora-r`)."""
    names = f.metadata.get("flags") or ()
    long = [n.split("/")[0] for n in names if n.startswith("--")]
    return long[0] if long else "--" + f.name.replace("_", "-")


def field_flag(cls: type, name: str) -> str:
    return next((flag(f) for f in fields(cls) if f.name == name),
                "--" + name.replace("_", "-"))


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def defaults(cls: type, names: Iterable[str] | None = None) -> dict[str, Any]:
    chosen = set(names) if names is not None else None
    return {f.name: default_of(f) for f in fields(cls) if chosen is None or f.name in chosen}


def run_only(cls: type) -> set[str]:
    """The fields a resumed run may change (`option(..., run_only=True)`)."""
    return {f.name for f in fields(cls) if f.metadata.get("run_only")}


def settable(cls: type, on_policy: bool = False) -> dict[str, dataclasses.Field]:
    """The fields a `run` config section may set (an `on_policy` entry: those marked
    `set_by="on_policy"` too)."""
    allowed = {None, "on_policy"} if on_policy else {None}
    return {f.name: f for f in fields(cls) if f.metadata.get("set_by") in allowed}


def type_error(cls: type, name: str, value: Any) -> str | None:
    """What field `name` of `cls` should be, when `value` is not that; None when it is."""
    from pydantic import ValidationError  # lazy: ~50 modules; --help needs none

    hint = hints(cls)[name]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a built value (a space)
        return None if isinstance(value, hint) else f"a {hint.__name__}"
    try:
        _adapter(hint).validate_python(value)
    except ValidationError as e:
        return expected_words(e)
    return None


def expected_words(error: Any) -> str:
    """A pydantic ValidationError as `an integer or null`."""
    words: list[str] = []
    for item in error.errors():
        word = _EXPECTED.get(item["type"]) or item["msg"].removeprefix("Input should be ")
        if word not in words:
            words.append(word)
    return " or ".join(words)


@functools.cache
def _adapter(hint: Any) -> Any:
    from pydantic import ConfigDict, TypeAdapter  # lazy: see type_error

    return TypeAdapter(hint, config=ConfigDict(strict=True, allow_inf_nan=False))


def check_types(config: Any) -> None:
    """Every field of a config instance against its type, named by its flag."""
    for f in fields(type(config)):
        value = getattr(config, f.name)
        expected = type_error(type(config), f.name, _paths_as_text(value))
        if expected:
            raise PrimekdError(f"{flag(f)} must be {expected}, not {value!r}")


def _paths_as_text(value: Any) -> Any:
    """Library callers may pass a Path where a config holds a path string."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list):
        return [_paths_as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _paths_as_text(v) for k, v in value.items()}
    return value


def check(config: Any) -> None:
    """Types, then ranges and choices, of every field of a config instance."""
    check_types(config)
    for f in fields(type(config)):
        problem = out_of_bounds(f, getattr(config, f.name))
        if problem:
            raise PrimekdError(f"{flag(f)} must be {problem}, not {getattr(config, f.name)!r}")


def out_of_bounds(f: dataclasses.Field, value: Any) -> str | None:
    """What the value should be, when it is outside the field's range or choices."""
    m = f.metadata
    if value is None:
        return None
    if m.get("choices") is not None and value not in m["choices"]:
        return "one of " + ", ".join(m["choices"])
    low, high = (m.get("ge"), m.get("gt")), (m.get("le"), m.get("lt"))
    if not any(b is not None for b in (*low, *high)) or isinstance(value, bool):
        return None
    bad = ((m.get("ge") is not None and value < m["ge"])
           or (m.get("gt") is not None and value <= m["gt"])
           or (m.get("le") is not None and value > m["le"])
           or (m.get("lt") is not None and value >= m["lt"]))
    if not bad:
        return None
    left = f"[{m['ge']:g}" if m.get("ge") is not None else (
        f"({m['gt']:g}" if m.get("gt") is not None else None)
    right = f"{m['le']:g}]" if m.get("le") is not None else (
        f"{m['lt']:g})" if m.get("lt") is not None else None)
    if left and right:
        return f"in {left}, {right}"
    words = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
    key = next(k for k in words if m.get(k) is not None)
    return f"{words[key]} {m[key]:g}"


def command_line(config: Any, command: str) -> str:
    """`primekd COMMAND --flag value ...` that rebuilds `config` (options left at their
    default are left out), quoted for a POSIX shell: the rerun a message can name."""
    import shlex

    words = ["primekd", command]
    for f in fields(type(config)):
        value = getattr(config, f.name)
        if not f.metadata.get("cli", False) or value == default_of(f) or value is None:
            continue
        name = flag(f)
        if isinstance(value, bool):
            names = f.metadata.get("flags") or ()
            pair = next((n for n in names if "/" in n), f"{name}/--no-{name[2:]}")
            words.append(pair.split("/")[0] if value else pair.split("/")[1])
        elif isinstance(value, dict):
            for key, item in value.items():
                words += [name, f"{key}={item}"]
        elif isinstance(value, list | tuple) and f.metadata.get("cli_type") is str:
            words += [name, ",".join(map(str, value))]
        elif isinstance(value, list | tuple):
            for item in value:
                words += [name, str(item)]
        else:
            words += [name, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return shlex.join(words)


def from_mapping(cls: type, values: dict[str, Any], source: str, what: str) -> Any:
    """`cls(**values)` with option names checked (`lora-r` reads as `lora_r`)."""
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise PrimekdError(f"{source}: unknown {what} option(s) {', '.join(unknown)}"
                           f"{did_you_mean(unknown[0], names)}; known: {', '.join(sorted(names))}")
    return cls(**values)


# --- the command line ---------------------------------------------------------------------------


def _help(f: dataclasses.Field, require: bool = False) -> str:
    text = f.metadata.get("help", "")
    if require and f.default is MISSING and f.default_factory is MISSING:
        return f"{text.rstrip('.')} (required)."
    shown = f.metadata.get("default_text")
    default = default_of(f)
    empty = default is None or default is False or (
        isinstance(default, str | list | dict | tuple) and not default)
    if shown is None and not empty:
        shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
    return f"{text.rstrip('.')} (default: {shown})." if shown else text


def parameters(cls: type, skip: Iterable[str] = (), require: bool = False
               ) -> list[inspect.Parameter]:
    """A keyword parameter per command-line field: typer.Option(None, flags, help=...); None
    means "not given", so a `--config` file or the dataclass default decides."""
    params = []
    for f in fields(cls):
        if not f.metadata.get("cli", False) or f.name in skip:
            continue
        hint = f.metadata.get("cli_type") or hints(cls)[f.name]
        names = f.metadata.get("flags") or ()
        if not any(n.startswith("--") for n in names):
            long = "--" + f.name.replace("_", "-")
            names = (f"{long}/--no-{long[2:]}" if hint is bool else long, *names)
        annotation = _cli_annotation(hint)
        params.append(inspect.Parameter(
            f.metadata.get("cli_name") or f.name, inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, *names, help=_help(f, require), show_default=False,
                                 metavar=f.metadata.get("metavar") or _metavar(annotation)),
            annotation=annotation))
    return params


def _metavar(annotation: Any) -> str | None:
    """Click's names for the value (TEXT, INTEGER, FLOAT, PATH), also for repeatable options."""
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    return {str: "TEXT", int: "INTEGER", float: "FLOAT", Path: "PATH"}.get(annotation)


def _cli_annotation(hint: Any) -> Any:
    """The type click converts to: `int | None` -> int; `str | list[str]` -> list[str]."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        lists = [a for a in args if typing.get_origin(a) is list]
        return lists[0] if lists else args[0]
    return hint


def given(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The fields given on the command line (not None), parsed, under their field names."""
    out = {}
    for f in fields(cls):
        key = f.metadata.get("cli_name") or f.name
        value = values.get(key)
        if value is None or (isinstance(value, list) and not value and f.metadata.get("parse")):
            continue
        parse = f.metadata.get("parse")
        out[f.name] = parse(value) if parse else value
    return out


def command(cls: type, extra: list[inspect.Parameter], run: Callable[..., None],
            doc: str, skip: Iterable[str] = (), require: bool = True) -> Callable[..., None]:
    """A function for `app.command()`: the fields of `cls` as options, then `extra`; it calls
    `run(given_fields, **extra_values)`. With `require`, fields without a default must be
    given (`run` checks them itself otherwise)."""
    names = {p.name for p in extra}

    def invoke(**values: Any) -> None:
        options = given(cls, values)
        if require:
            check_required(cls, options)
        run(options, **{k: v for k, v in values.items() if k in names})

    invoke.__signature__ = inspect.Signature([*parameters(cls, skip, require), *extra])  # type: ignore[attr-defined]
    invoke.__doc__ = doc
    invoke.__name__ = f"{cls.__name__}_command"
    return invoke


def check_required(cls: type, values: dict[str, Any]) -> None:
    missing = [flag(f) for f in fields(cls) if f.name not in values
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise PrimekdError(f"missing option(s) {', '.join(missing)}; see --help")


def extra(name: str, *names: str, default: Any = None, help: str, annotation: Any = str,
          metavar: str | None = None) -> inspect.Parameter:
    """A command-line option that is not a config field (`--json`, `--config`)."""
    metavar = metavar or _metavar(_cli_annotation(annotation))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                             default=typer.Option(default, *names, help=help, metavar=metavar),
                             annotation=annotation)


def argument(name: str, help: str, annotation: Any = Path) -> inspect.Parameter:
    """A required positional argument (`primekd grade FILE`)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                             default=typer.Argument(..., help=help, show_default=False),
                             annotation=annotation)
