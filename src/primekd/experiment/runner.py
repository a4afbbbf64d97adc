"""Running an experiment: the stages of its plan in order, each cached by its hash.

`run_experiment` runs the stages of `stages.plan` in order. Each stage is cached by a hash of
its own resolved config and its upstream stages' hashes, recorded in `.stages/<stage>.json` in
the run directory (beside, not inside, the stage's own directory, which the stage functions
own): a complete stage with an unchanged hash is skipped, a stage with a changed hash is
cleared and rerun, and an interrupted stage is resumed (the stage functions resume).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from primekd.core import diskspace, options, outdir, registry, validate
from primekd.core.data import load_examples
from primekd.core.errors import PrimekdError
from primekd.core.io import atomic_write_text, write_json
from primekd.core.memory import release_memory
from primekd.experiment import heartbeat
from primekd.experiment.config import ExperimentConfig, plain
from primekd.experiment.report import record_path
from primekd.experiment.stages import (
    STAGE_FUNCTIONS,
    Stage,
    StageFunction,
    clear_stale_teachers,
    data_file,
    plan,
    select_stages,
    stage_config,
)
from primekd.teach.teacher import check_config as check_teach


@dataclass
class StageOutcome:
    name: str
    state: str  # what it was before this run: cached | resume | changed | new
    ran: bool
    wall_time_s: float  # of this run (0 when cached)
    directory: str


@dataclass
class RunSummary:
    out: str
    stages: list[StageOutcome]
    wall_time_s: float
    report_md: str
    report_html: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Callback = Callable[[str, Stage, int, int, str], None]  # event, stage, index, total, state


def run_experiment(
    config: ExperimentConfig,
    out: str | Path | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    stage_functions: dict[str, StageFunction] | None = None,
    force: bool = False,
    only: list[str] | None = None,
) -> RunSummary:
    """Run every stage that is not cached, in order; returns what ran and what was cached.

    `force`: run in a non-empty directory primekd did not make, beside the files there.
    `only` (stage names or globs such as `teacher/none/shard-*`) runs just those stages, whose
    upstream stages must be complete: several `run --only` processes (one per teacher shard,
    say) can share a run directory."""
    out = Path(out or Path("runs") / config.name)
    functions = {**STAGE_FUNCTIONS, **(stage_functions or {})}
    stages = checked_plan(config, out)
    start = time.perf_counter()
    outcomes = []
    selected = select_stages(stages, only)
    missing = unfetched_models([s for s in selected if s.state() != "cached"])
    if missing:  # found now, not after hours of the stages before the one that needs it
        raise PrimekdError(missing_models_message(missing))
    with run_lock(out, [s.name for s in selected] if only else None, force):
        write_config(config, out)
        write_data_files(config, out)
        clear_stale_teachers(stages, out)
        try:
            for index, stage in enumerate(selected, start=1):
                if stage.kind not in ("teacher", "eval"):
                    _stop_engine_server()  # training needs the memory a server holds
                # and a server (or the next training) the memory the last stage's model held
                release_memory()
                outcomes.append(run_stage(stage, functions[stage.kind], progress, callback,
                                          index, len(selected)))
        finally:
            _stop_engine_server()
    return RunSummary(str(out), outcomes, time.perf_counter() - start,
                      str(out / "report.md"), str(out / "report.html"))


def _stop_engine_server() -> None:
    """Stop the vLLM server that teacher/eval stages share (kept up between them, so that
    stages of one model start it once)."""
    module = sys.modules.get("primekd.engines.vllm")
    if module is not None:
        module.shutdown()


def write_config(config: ExperimentConfig, out: Path) -> None:
    header = ("# Resolved primekd experiment config. Rerun it with:\n"
              f"#   primekd run {out / 'config.yaml'} --out {out}\n")
    atomic_write_text(out / "config.yaml", header + config.to_yaml())


def write_data_files(config: ExperimentConfig, out: Path) -> None:
    """The transfer and test questions as JSONL (ids kept), rewritten only if they differ."""
    for which, slc in (("transfer", config.data.transfer), ("test", config.data.test)):
        examples = load_examples(slc.split, slc.limit, slc.offset, slc.sample, slc.seed)
        text = "".join(json.dumps({"id": e.id, "question": e.question, "answer": e.answer},
                                  ensure_ascii=False) + "\n" for e in examples)
        path = data_file(out, which)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)


def run_stage(
    stage: Stage,
    function: StageFunction,
    progress: bool = True,
    callback: Callback | None = None,
    index: int = 1,
    total: int = 1,
) -> StageOutcome:
    state = stage.state()
    if callback:
        callback("start", stage, index, total, state)
    if state == "cached":
        if callback:
            callback("end", stage, index, total, state)
        return StageOutcome(stage.name, state, False, 0.0, str(stage.directory))
    if state == "changed":
        clear_stage_dir(stage)
    previous = stage.record() or {}
    spent = (previous.get("wall_time_s", 0.0), previous.get("cpu_time_s", 0.0))
    started, cpu_started = time.perf_counter(), time.process_time()

    def spent_so_far() -> tuple[float, float]:
        return (spent[0] + time.perf_counter() - started,
                spent[1] + time.process_time() - cpu_started)

    try:
        with diskspace.guard(stage.directory, STAGE_NEEDS.get(stage.kind), RERUN):
            _write_record(stage, "running", spent, None)
            # a killed attempt keeps its time up to the last beat
            with heartbeat.every(RECORD_EVERY_S,
                                 lambda: _write_record(stage, "running", spent_so_far(), None)):
                result = function(stage, progress)
            wall = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            # times accumulate over attempts, killed ones included: the stage's compute
            _write_record(stage, "complete", (spent[0] + wall, spent[1] + cpu), result)
    except PrimekdError as e:
        message = str(e)
        raise PrimekdError(message if message.startswith(f"{stage.name}:")
                           else f"{stage.name}: {message}") from None
    if callback:
        callback("end", stage, index, total, state)
    return StageOutcome(stage.name, state, True, wall, str(stage.directory))


RERUN = "rerun the same `primekd run`: finished stages are kept and it resumes"
RECORD_EVERY_S = 60.0  # a running stage's record is rewritten with its time so far
# Rough size of the stage that does not estimate its own (teach, eval, distill and attention
# do): never a reason to refuse, a figure for the full-disk message
STAGE_NEEDS = {
    "report": diskspace.Need(2 << 20, 0, "the report (report.md, report.html, charts)"),
}

_COMMANDS = {"teacher": "teach", "distill": "distill", "eval": "eval",
             "attention": "attention", "report": "report"}


def checked_plan(config: ExperimentConfig, out: Path) -> list[Stage]:
    """`stages.plan`, every stage's options checked (what `run` and `run --dry-run` refuse
    before anything runs)."""
    stages = plan(config, out)
    for stage in stages:
        precheck(stage)
    return stages


def precheck(stage: Stage) -> None:
    """The stage's options checked (types, finiteness, ranges) before any stage runs."""
    if stage.kind not in ("teacher", "distill", "eval"):
        return
    config = stage_config(stage)
    try:
        {"teacher": check_teach, "distill": options.check, "eval": validate.check_eval
         }[stage.kind](config)
        if stage.kind == "eval":
            config.engine_spec().check()
    except PrimekdError as e:
        raise PrimekdError(f"{stage.name}: {e}") from None


_MODEL_KEYS = ("teacher", "student", "model")


def unfetched_models(stages: list[Stage]) -> list[str]:
    """The fetched-model aliases (`primekd models`) these stages load that are not in the
    cache yet: a file's hash is checked when it is loaded, its presence here."""
    aliases = {s.params[key] for s in stages for key in _MODEL_KEYS
               if isinstance(s.params.get(key), str) and s.params[key] in registry.FETCHED}
    return sorted(a for a in aliases if not registry.FETCHED[a].path().is_file())


def missing_models_message(aliases: list[str]) -> str:
    names = " ".join(aliases)
    return (f"model{'s' if len(aliases) > 1 else ''} not fetched yet: {', '.join(aliases)}; "
            f"run `make models` or `primekd models fetch {names}` first")


def clear_stage_dir(stage: Stage) -> None:
    """Remove a stage's outputs made under another hash (stale, never mixed with new ones).

    Only what primekd wrote goes (by the directory's marker, or, for a stage this run
    recorded, the stage's output names); anything else stops the run with one line."""
    if stage.kind == "report":
        for name in ("report.md", "report.html"):
            (stage.paths["out"] / name).unlink(missing_ok=True)
    trusted = _COMMANDS[stage.kind] if stage.record() is not None else None
    kept = outdir.remove_owned(stage.directory, trust=trusted)
    if kept:
        names = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
        raise PrimekdError(f"{stage.directory} holds files primekd did not write ({names}); "
                           "the stage must be redone there: move them, or choose another "
                           "--out")
    stage.record_path.unlink(missing_ok=True)


def _write_record(stage: Stage, status: str, times: tuple[float, float], result: Any) -> None:
    record = {
        "stage": stage.name,
        "kind": stage.kind,
        "hash": stage.hash,
        "status": status,
        "upstream": list(stage.upstream),
        "params": plain(stage.params),
        "wall_time_s": round(times[0], 3),
        "cpu_time_s": round(times[1], 3),  # process CPU time, all threads
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if status == "complete":
        record["completed_at"] = record["updated_at"]
        record["summary"] = _summary_of(result)
    write_json(stage.record_path, record)


def _summary_of(result: Any) -> Any:
    if result is None:
        return None
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    try:
        return json.loads(json.dumps(result, default=str))
    except (TypeError, ValueError):
        return str(result)


@contextmanager
def run_lock(out: Path, only_stages: list[str] | None = None, force: bool = False
             ) -> Iterator[None]:
    """One `primekd run` per run directory at a time (a lock on the directory itself, which
    it claims: docs/outputs.md). `run --only` processes share the directory (a shared lock)
    and each holds its own stages, so that teacher shards can run in parallel, on several
    machines over a shared file system."""
    with outdir.claimed(out, "run", force, shared=only_stages is not None), \
            stage_locks(out, only_stages or []):
        yield


@contextmanager
def stage_locks(out: Path, names: list[str]) -> Iterator[None]:
    """An exclusive lock per stage, on a file beside the stage's record in `.stages/`."""
    handles = []
    try:
        for name in names:
            path = record_path(out, name).with_suffix(".lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            handles.append(path.open("a+"))
            try:
                fcntl.flock(handles[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PrimekdError(
                    f"another `primekd run --only` is running {name} in {out}") from None
        yield
    finally:
        for handle in handles:
            handle.close()  # closing releases the lock; the files stay (unlinking would race)

