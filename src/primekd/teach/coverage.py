"""Whether teacher stores hold every answer their teach run planned.

A store is unfinished when its `teach` stopped early (killed, out of disk: manifest
`complete: false`), and a shard set is short when a shard of a `teach --shard i/n` run is
missing, also when one shard is given alone. Either would train a student on part of the
transfer set without a word, so readers ask `require_complete` first; what is missing is
named with the command that finishes it (the manifest records the `primekd teach` command
that wrote each store).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from primekd.core.data import load_examples
from primekd.core.errors import PrimekdError


@dataclass(frozen=True)
class Coverage:
    """Answers present against answers planned, and what is missing (one phrase a gap)."""

    answered: int
    planned: int
    missing: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.missing

    def to_dict(self) -> dict[str, Any]:
        return {"answered_rows": self.answered, "planned_rows": self.planned,
                "missing": list(self.missing)}


def coverage(dirs: Sequence[Path], manifests: Sequence[dict[str, Any]],
             answered_rows: Sequence[int | None]) -> Coverage:
    """What the stores `dirs` (one store, or the shards of one teach run) hold of their run.
    `answered_rows`: the answers each store's batch records count (None: the manifest's
    count), since a kill between a part and the manifest's update leaves the manifest one
    batch behind."""
    answered = planned = 0
    missing: list[str] = []
    for directory, manifest, recorded in zip(dirs, manifests, answered_rows, strict=True):
        counts = manifest.get("counts") or {}
        rows = int(counts.get("rows", 0) if recorded is None else recorded)
        expected = int(counts.get("expected_rows", rows))
        answered, planned = answered + rows, planned + expected
        # a finished store whose parts hold fewer rows lost a part: load_store's count check
        # says so (a part missing or duplicated), which is not a teach run to finish
        if not manifest.get("complete"):
            missing.append(f"{directory} is unfinished ({rows} of {expected} answers: its "
                           f"`primekd teach` stopped early); finish it with "
                           f"`{_command(manifest, directory)}`")
    gaps = _missing_shards(manifests)
    if gaps:
        count = manifests[0]["params"]["shard"]["count"]
        planned += sum(_shard_rows(manifests, index) for index in gaps)
        names = ", ".join(f"{i}/{count}" for i in gaps)
        commands = "; ".join(f"`{_shard_command(dirs, manifests, i)}`" for i in gaps)
        missing.append(f"shard(s) {names} of this {count}-shard teach run are missing "
                       f"(given: {', '.join(map(str, dirs))}); make them with {commands} and "
                       "give every shard directory (or a glob that matches them all)")
    return Coverage(answered, planned, tuple(missing))


def require_complete(found: Coverage, hint: str = "") -> Coverage:
    """`found`, or one line naming what is missing (and `hint`) when it is short."""
    if not found.complete:
        raise PrimekdError(f"incomplete teacher store: {'; '.join(found.missing)}"
                           + (f"; {hint}" if hint else ""))
    return found


def _missing_shards(manifests: Sequence[dict[str, Any]]) -> list[int]:
    shards = [(m.get("params") or {}).get("shard") for m in manifests]
    if not shards or any(s is None for s in shards):
        return []
    return sorted(set(range(shards[0]["count"])) - {s["index"] for s in shards})


def _shard_rows(manifests: Sequence[dict[str, Any]], index: int) -> int:
    """The answers a missing shard plans: from the run's data where it can still be read,
    else as many as the shards present plan on average."""
    params = manifests[0]["params"]
    data = params.get("data") or {}
    samples = (params.get("generation") or {}).get("samples_per_question", 1)
    try:
        examples = load_examples(data["spec"], limit=data.get("limit"),
                                 offset=data.get("offset", 0), sample=data.get("sample"),
                                 seed=data.get("seed", 0))
        ids = sorted(e.id for e in examples)
        return len(ids[index::params["shard"]["count"]]) * samples
    except (PrimekdError, KeyError, TypeError):
        per_shard = [int((m.get("counts") or {}).get("expected_rows", 0)) for m in manifests]
        return round(sum(per_shard) / len(per_shard))


def _command(manifest: dict[str, Any], directory: Path) -> str:
    return manifest.get("command") or \
        f"primekd teach ... --out {shlex.quote(str(directory))} (the options that wrote it)"


def _shard_command(dirs: Sequence[Path], manifests: Sequence[dict[str, Any]],
                   index: int) -> str:
    """A present shard's teach command with `--shard` and `--out` set for shard `index`."""
    manifest, directory = manifests[0], dirs[0]
    count = manifest["params"]["shard"]["count"]
    out = _sibling(directory, manifest["params"]["shard"]["index"], index)
    if not manifest.get("command"):
        return f"primekd teach ... --shard {index}/{count} --out {shlex.quote(out)}"
    words = shlex.split(manifest["command"])
    for flag, value in (("--shard", f"{index}/{count}"), ("--out", out)):
        if flag in words:
            words[words.index(flag) + 1] = value
        else:
            words += [flag, value]
    return shlex.join(words)


def _sibling(directory: Path, present: int, index: int) -> str:
    """The directory of shard `index`, named as the given shard's (`s0` -> `s1`,
    `shard-0-of-4` -> `shard-2-of-4`): its name's last number equal to the shard's index
    replaced; `DIR-shard-<index>` when the name holds no such number."""
    runs = [m for m in re.finditer(r"\d+", directory.name) if int(m.group()) == present]
    if not runs:
        return f"{directory}-shard-{index}"
    last = runs[-1]
    name = directory.name[:last.start()] + str(index) + directory.name[last.end():]
    return str(directory.with_name(name))
