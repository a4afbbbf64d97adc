"""Small, crash-safe file helpers shared by every stage."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from primekd.errors import PrimekdError


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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (see `atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrimekdError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise PrimekdError(f"{path} is not valid JSON: {e}") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a torn last line (from a killed writer) is ignored."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path, tolerate_torn_tail: bool = True) -> Iterator[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise PrimekdError(f"{path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
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
        yield row


def append_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows and fsync, so a finished batch survives a kill."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PrimekdError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise PrimekdError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PrimekdError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}") from None
