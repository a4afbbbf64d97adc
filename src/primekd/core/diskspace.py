"""Full disks: one line naming the path, the free space and what the stage needs.

Each stage that writes runs inside `guard(out)`: a stage that can estimate its output cheaply
(a teacher store: answers x tokens x bytes per token; an adapter: parameters x bytes) calls
`expect(Need(...))` before the work starts, which refuses to start when the free space is
below the least the stage can need. A write that still fails for want of space (ENOSPC, or
EDQUOT for a quota) becomes a `PrimekdError`: the path, the free space there, the stage's
estimate and the rerun that resumes. The CLI maps any such error outside a guard to one line
the same way (`message`). Writers are atomic or truncate what they appended (core.io), so a
rerun never trusts a half-written file.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from primekd.core.errors import PrimekdError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do not raise OSError say it: safetensors ("No space left on device (os
# error 28)"), pyarrow (errno in the text), sqlite ("database or disk is full")
_FULL_WORDS = tuple(os.strerror(e) for e in FULL_ERRNOS) + (
    "os error 28", "os error 122", "errno 28", "StorageFull", "database or disk is full")
# torch.save on a full disk says only "unexpected pos ..." or "file write failed": such an
# error counts as a full disk when less than this is left where it wrote
NEARLY_FULL = 1 << 20
RERUN = "rerun the same command: finished work is kept and it resumes"


@dataclass(frozen=True)
class Need:
    """A stage's output estimate: `bytes` about what it writes, `floor` the least it can need
    (below that it clearly cannot finish, so it is refused before it starts)."""

    bytes: int
    floor: int
    what: str  # "teach (16 answers x up to 256 tokens x top-20)"


def is_full(error: BaseException) -> bool:
    """Whether `error` (or one it was raised from) says the disk or the quota is full."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS:
            return True
        if any(word.lower() in str(current).lower() for word in _FULL_WORDS):
            return True
        current = current.__cause__ or current.__context__
    return False


def looks_full(error: BaseException, path: str | Path) -> bool:
    """`is_full`, or a write error with next to nothing left where `path` is."""
    if is_full(error):
        return True
    return isinstance(error, OSError | RuntimeError) and free_bytes(path) < NEARLY_FULL


def as_full(error: BaseException, path: str | Path) -> OSError:
    """An ENOSPC (or EDQUOT) OSError naming `path`, for raising `from error`."""
    code = next((e.errno for e in _chain(error) if isinstance(e, OSError)
                 and e.errno in FULL_ERRNOS), errno.ENOSPC)
    return OSError(code, os.strerror(code), str(path))


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem of `path` (of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def size(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024, as df -h)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def message(error: BaseException, directory: str | Path | None = None,
            need: Need | None = None, rerun: str = RERUN) -> str:
    """The one line for a write that failed for want of space."""
    path = next((e.filename for e in _chain(error) if isinstance(e, OSError) and e.filename),
                None) or directory
    quota = any(isinstance(e, OSError) and e.errno == errno.EDQUOT for e in _chain(error))
    what = "disk quota exceeded" if quota else "no space left on device"
    where = f" writing {path}" if path else ""
    free = f": {size(free_bytes(path))} free there" if path else ""
    needs = f"; {need.what} needs about {size(need.bytes)}" if need else ""
    return (f"{what}{where}{free}{needs}; free some space (or choose another --out), then "
            f"{rerun}")


class Guard:
    """What `guard` yields: `expect(need)` once the stage knows its estimate."""

    def __init__(self, directory: Path, rerun: str):
        self.directory, self.rerun = directory, rerun
        self.need: Need | None = None

    def expect(self, need: Need) -> None:
        """Record the estimate; refuse to start when even its floor does not fit."""
        self.need = need
        free = free_bytes(self.directory)
        if free < need.floor:
            raise PrimekdError(
                f"not enough space for {self.directory}: {size(free)} free there, and "
                f"{need.what} needs about {size(need.bytes)} (at least {size(need.floor)}); "
                "free some space or choose another --out")


_GUARDS: ContextVar[tuple[Guard, ...]] = ContextVar("primekd_disk_guards", default=())


@contextmanager
def guard(directory: str | Path, need: Need | None = None, rerun: str = RERUN
          ) -> Iterator[Guard]:
    """Run a stage writing into `directory`: a full disk inside becomes one line."""
    state = Guard(Path(directory), rerun)
    if need is not None:
        state.expect(need)
    token = _GUARDS.set((*_GUARDS.get(), state))
    try:
        yield state
    except PrimekdError:
        raise
    except Exception as e:
        if not is_full(e):
            raise
        raise PrimekdError(message(e, state.directory, state.need, state.rerun)) from None
    finally:
        _GUARDS.reset(token)


def expect(need: Need) -> None:
    """`Guard.expect` of the innermost guard, for code that does not hold it (a stage that
    knows its size only once its model is built); nothing outside a guard."""
    guards = _GUARDS.get()
    if guards:
        guards[-1].expect(need)
