"""The vLLM server's scratch directories: `primekd-vllm-*` in the system temp folder.

Each holds a server's log and the caches it compiles (about 150 MB on CPU). A stopped server
takes its directory with it; a failed one keeps its log alone. A directory whose primekd
process was killed (a session's end, an OOM kill) had no one to remove it: each new server
first removes those, recognised by their `owner` file (the pid and start time of the
process that made them, so a reused pid is not taken for the owner).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "primekd-vllm-"
OWNER = "owner"
LOG = "server.log"


def make() -> Path:
    """A new scratch directory owned by this process, after removing orphaned ones."""
    remove_orphans()
    scratch = Path(tempfile.mkdtemp(prefix=PREFIX))
    (scratch / OWNER).write_text(_identity(os.getpid()))
    return scratch


def keep_log_only(scratch: Path) -> None:
    """A failed server's directory: its log stays for the user (and is never swept as an
    orphan), the caches go."""
    for entry in scratch.iterdir():
        if entry.name == LOG:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def remove_orphans(folder: str | Path | None = None) -> list[Path]:
    """Remove the scratch directories whose owning process is gone; return them."""
    removed = []
    for scratch in Path(folder or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = (scratch / OWNER).read_text()
        except OSError:
            continue  # no owner file: a kept log, or not ours to judge
        pid = owner.split(" ", 1)[0]
        if pid.isdigit() and _identity(int(pid)) != owner:
            shutil.rmtree(scratch, ignore_errors=True)
            removed.append(scratch)
    return removed


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None where
    the process is gone (or exits while it is read)."""
    try:
        text = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return fields if len(fields) > 2 else None


def _identity(pid: int) -> str:
    """`pid start-time` for a live process (start time in clock ticks since boot),
    `pid` alone where /proc has no such process."""
    fields = stat_fields(pid)
    return f"{pid} {fields[19]}" if fields else str(pid)
