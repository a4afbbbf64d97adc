"""Small, crash-safe file helpers shared by every stage."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from primekd.core import diskspace
from primekd.core.errors import PrimekdError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Make `path` by calling `write(tmp)` on a temp file beside it, fsync, then rename.

    Readers see the old content or the new one, never half; a failed or killed write leaves
    at most a hidden `.NAME.*.tmpSUFFIX` file (the suffix kept for writers that read it, such
    as matplotlib's savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and diskspace.is_full(e) and not getattr(e, "filename", 0):
            raise diskspace.as_full(e, path) from e  # the file it was making, for the message
        raise


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or infinity replaced by None: JSON has no such numbers, and
    Python's bare `NaN`/`Infinity` output is not valid JSON for other readers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps that never writes bare NaN/Infinity."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (see `atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_text(path: str | Path, what: str = "") -> str:
    """A UTF-8 text file; missing, unreadable or not UTF-8 is one line naming the file
    (and, for encoding, the byte offset)."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PrimekdError(f"{label} does not exist") from None
    except IsADirectoryError:
        raise PrimekdError(f"{label} is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise PrimekdError(f"{label} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at "
                           f"offset {e.start} ({e.reason})") from None
    except OSError as e:
        raise PrimekdError(f"cannot read {label}: {e.strerror or e}") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise PrimekdError(f"{path} is not valid JSON: {e}") from None


# Fields whose type every reader relies on: (accepted types, what to say).
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "question": ((str,), "a string"),
    "response": ((str,), "a string"),
    "answer": ((str, int, float), "a string or a number"),
    "reference": ((str, int, float), "a string or a number"),
}


def check_field_types(row: dict[str, Any], where: str) -> None:
    """Refuse a row whose question/response is not a string or answer/reference is not a
    string or number (a list, an object, true/false, null), naming `where` (file:line)."""
    for name, (types, words) in _FIELD_TYPES.items():
        if name not in row:
            continue
        value = row[name]
        finite = not isinstance(value, float) or math.isfinite(value)
        if isinstance(value, bool) or not isinstance(value, types) or not finite:
            raise PrimekdError(f"{where}: `{name}` must be {words}, not {_brief(value)}")


def _brief(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a torn last line (from a killed writer) is ignored."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path, tolerate_torn_tail: bool = True) -> Iterator[dict[str, Any]]:
    path = Path(path)
    # "\n" only: str.splitlines() also splits at U+2028, U+0085, \x1c..., which a model's
    # answer may hold (written raw with ensure_ascii=False) and which are valid inside JSON
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if tolerate_torn_tail and number == len(lines):
                return
            raise PrimekdError(f"{path}:{number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise PrimekdError(f"{path}:{number} is not a JSON object")
        check_field_types(row, f"{path}:{number}")
        yield row


def append_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows and fsync, so a finished batch survives a kill. The rows go out in one
    write(2) on an O_APPEND descriptor: a Ctrl-C (KeyboardInterrupt) between Python-level
    buffer writes and flushes cannot leave half a line followed by later rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:  # a regular file takes it in one call; loop in case it does not
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            os.ftruncate(fd, start)  # a full disk leaves no part of these rows behind
            if diskspace.is_full(e):
                raise diskspace.as_full(e, path) from e
            raise
    finally:
        os.close(fd)


def truncate_torn_tail(path: str | Path) -> None:
    """Drop a partial last line left by a killed writer, so appends stay valid JSONL."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def read_yaml(path: str | Path, what: str = "file") -> Any:
    """Parse a YAML file; a missing, unreadable or malformed file is a one-line PrimekdError."""
    path = Path(path)
    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PrimekdError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}") from None
