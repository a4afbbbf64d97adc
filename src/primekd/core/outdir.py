"""Output directories: primekd writes only into directories it recognises as its own.

Each command that takes `--out` leaves a marker, `.primekd.json`, in it: which command
wrote the directory, the files it wrote, and the files that were already there (`foreign`).

- An empty or missing `--out` is claimed.
- A directory with our marker (or, for directories made before markers, the command's own
  record file: `eval_config.json`, a store's `manifest.json`, ...) is ours to resume into.
- Any other non-empty directory is refused with one line, unless `--force`: then the
  command writes beside the files there, but still refuses if one of them has the name of
  a file it would write. Nothing here ever deletes or overwrites a file primekd did not write.
- `remove_owned` (used by `primekd run` to clear a stale stage) deletes only the entries the
  marker or the command's output names say are ours, and reports the others.

`claimed(...)` also takes an exclusive lock on the directory itself (flock on the directory's
file descriptor, released by the OS if the process dies), so no `.lock` file is left behind.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from primekd import __version__
from primekd.core.errors import PrimekdError
from primekd.core.io import write_json

MARKER = ".primekd.json"


@dataclass(frozen=True)
class Outputs:
    """What one command writes into its --out: top-level names (globs), and the file whose
    presence marks a directory it wrote before markers existed."""

    patterns: tuple[str, ...]
    signature: str | None = None


_DISTILL = ("adapter_*", "*.safetensors", "*.bin", "README.md", "distill_config.yaml",
            "train_log.jsonl", "train_log.csv", "summary.json", "run_totals.json",
            "checkpoints", "tensorboard", "tokenizer*", "special_tokens_map.json",
            "chat_template.*", "vocab.json", "merges.txt", "config.json",
            "generation_config.json", "added_tokens.json",
            "trial.json", "val_questions.jsonl", "val_eval",  # these three: tune's trials
            "rounds", "rounds.json")  # on-policy rounds

OUTPUTS: dict[str, Outputs] = {
    "eval": Outputs(("results.jsonl", "summary.json", "eval_config.json"), "eval_config.json"),
    "teach": Outputs(("manifest.json", "part-*.parquet", "part-*.empty.json"), "manifest.json"),
    "distill": Outputs(_DISTILL, "distill_config.yaml"),
    "attention": Outputs(("head_metrics.*", "head_ranking.csv", "accuracy_correlation.csv",
                          "summary.json", "plots"), "head_metrics.parquet"),
    "tune": Outputs(("study.db", "study.db-*", "trials", "trials.csv", "best_params.yaml",
                     "best_run.yaml", "summary.json"), "study.db"),
    "report": Outputs(("*",)),
    "run": Outputs(("config.yaml", "data", "teacher", "students", "eval", "attention",
                    "report.md", "report.html", "report_files", ".stages"), ".stages"),
}
_ALWAYS_OURS = (MARKER, ".lock")  # .lock: left by versions that locked with a file


def is_ours(name: str, command: str, foreign: set[str] | frozenset[str] = frozenset()) -> bool:
    """Whether the top-level entry `name` is one `command` writes (temp files included)."""
    if name in _ALWAYS_OURS:
        return True
    if name in foreign:
        return False
    names = {name}
    if name.startswith(".") and name.endswith(".tmp"):  # atomic writes: .NAME.xxxx.tmp
        names = {name[1:-4], name[1:].rsplit(".", 2)[0]}
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in OUTPUTS[command].patterns)


def read_marker(directory: Path) -> dict[str, Any] | None:
    path = directory / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PrimekdError(f"{path} is damaged; delete it only if {directory} holds nothing "
                           "of yours, or choose another --out") from None
    if not isinstance(marker, dict) or marker.get("command") not in OUTPUTS:
        raise PrimekdError(f"{path} is not a primekd output marker")
    return marker


def owner(directory: Path) -> tuple[str | None, set[str]]:
    """(command that wrote `directory`, names that were there before it) or (None, {})."""
    marker = read_marker(directory)
    if marker is not None:
        return marker["command"], set(marker.get("foreign", []))
    names = _entries(directory)
    for command, outputs in OUTPUTS.items():
        if outputs.signature and outputs.signature in names:
            return command, {n for n in names if not is_ours(n, command)}
    return None, set()


def _entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


def check_writable(out: Path) -> None:
    """`out` is a directory, or can be made one, and we may write there."""
    if out.exists() and not out.is_dir():
        raise PrimekdError(f"--out {out} is a file, not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PrimekdError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PrimekdError(f"--out {out}: no permission to write in {existing}")


def check_out(out: str | Path, command: str, force: bool = False) -> set[str]:
    """Refuse `out` unless it is empty, ours, or (with `force`) holds nothing we would
    overwrite. Writes nothing. Returns the names of entries that are not ours."""
    out = Path(out)
    check_writable(out)
    names = _entries(out)
    if not names:
        return set()
    who, foreign = owner(out)
    if who is not None and who != command:
        raise PrimekdError(f"{out} holds the output of `primekd {who}`, not of "
                           f"`primekd {command}`; choose another --out")
    if who is None:
        foreign = set(names) - set(_ALWAYS_OURS)
        if not foreign:
            return set()
        if not force:
            raise PrimekdError(
                f"{out} is not empty and was not written by `primekd {command}` "
                f"({_list(foreign)}); choose a new or empty --out, or pass --force to write "
                "beside those files")
    clashes = sorted(n for n in foreign if is_ours(n, command))
    if clashes:
        raise PrimekdError(f"{out} holds {_list(clashes)}, which primekd did not write and "
                           f"`primekd {command}` would overwrite; move them or choose "
                           "another --out (--force never overwrites your files)")
    return foreign


def _list(names: set[str] | list[str], most: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def write_marker(out: Path, command: str, foreign: set[str]) -> None:
    previous = read_marker(out) or {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    written = sorted(n for n in _entries(out) if n != MARKER and is_ours(n, command, foreign))
    write_json(out / MARKER, {
        "tool": "primekd", "command": command, "primekd_version": __version__,
        "created_at": previous.get("created_at", now), "updated_at": now,
        "files": written, "foreign": sorted(foreign),
    })


@contextmanager
def claimed(out: str | Path, command: str, force: bool = False, lock: bool = True,
            shared: bool = False) -> Iterator[Path]:
    """Check `out`, lock it, mark it ours; on the way out record the files written.
    `shared`: a shared lock, for processes that each lock their own part (`run --only`)."""
    out = Path(out)
    foreign = check_out(out, command, force)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out, command, shared) if lock else _nothing():
        write_marker(out, command, foreign)
        try:
            yield out
        except BaseException:
            if out.is_dir():
                with suppress(OSError):  # a full disk: the stage's own error is the one to tell
                    write_marker(out, command, foreign)
            raise
        if out.is_dir():
            write_marker(out, command, foreign)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def locked(directory: str | Path, command: str = "", shared: bool = False) -> Iterator[None]:
    """An exclusive (or shared) lock on the directory itself (no lock file is created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            who = f"`primekd {command}`" if command else "primekd"
            raise PrimekdError(f"{directory} is being written by another {who} process; "
                               "wait for it, or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_owned(directory: Path, trust: str | None = None) -> list[str]:
    """Delete the entries of `directory` that primekd wrote; return the others (kept).

    `trust`: a command whose outputs the caller knows it made there (a stage record), used
    when the directory has neither a marker nor a signature file.
    """
    if not directory.is_dir():
        return []
    command, foreign = owner(directory)
    command = command or trust
    kept = []
    for path in sorted(directory.iterdir()):
        if command is not None and is_ours(path.name, command, foreign):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        else:
            kept.append(path.name)
    if not kept:
        directory.rmdir()
    return kept
