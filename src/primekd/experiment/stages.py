"""The experiment as a graph of cached stages, and how each stage runs.

`plan` turns the config into stages, one small function call each: a teacher per strategy
(or per shard), a student per experiment (`sft`, `kd-<strategy>`, on-policy `op-*`; `base` is
the untrained student), an evaluation per experiment on the same test questions, one attention
analysis over all students, and the report. Each stage's hash covers its own resolved params
and its upstream stages' hashes; `stage_config` builds the stage's own config dataclass and the
`run_*` functions run it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from primekd.core import options, outdir
from primekd.core.errors import PrimekdError
from primekd.core.io import atomic_write_text, read_json
from primekd.distill.config import DistillConfig
from primekd.evaluate.evaluator import evaluate
from primekd.experiment import report
from primekd.experiment.config import (
    ON_POLICY_ENTRY,
    STAGE_CONFIGS,
    DataSlice,
    ExperimentConfig,
    StrategySpec,
    on_policy_students,
    plain,
)
from primekd.experiment.report import RECORDS, record_path
from primekd.teach.teacher import teach

CACHE_VERSION = 1  # bump to invalidate every cached stage after a format change

# --- the stage graph ----------------------------------------------------------------------------


@dataclass
class Stage:
    """One cached step: `params` are hashed; `paths` (outputs, upstream dirs) are not."""

    name: str  # "teacher/none", "students/kd-none", "eval/base", "attention", "report"
    kind: str  # teacher | distill | eval | attention | report
    directory: Path
    params: dict[str, Any]
    paths: dict[str, Any] = field(default_factory=dict)
    upstream: tuple[str, ...] = ()
    hash: str = ""
    run_dir: Path = Path(".")

    @property
    def record_path(self) -> Path:
        return record_path(self.run_dir, self.name)

    def record(self) -> dict[str, Any] | None:
        try:
            return read_json(self.record_path)
        except PrimekdError:
            return None

    def state(self) -> str:
        """`cached` (complete, same hash), `resume` (interrupted, same hash), `changed`
        (another hash: cleared and rerun) or `new`."""
        record = self.record()
        if record is None:
            return "changed" if _has_content(self.directory) else "new"
        if record.get("hash") != self.hash:
            return "changed"
        if not self.directory.is_dir():
            return "new"  # deleted by hand: make it again
        return "cached" if record.get("status") == "complete" else "resume"


def _has_content(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def stage_hash(kind: str, params: dict[str, Any], upstream_hashes: list[str]) -> str:
    payload = json.dumps(
        {"cache_version": CACHE_VERSION, "kind": kind, "params": plain(params),
         "upstream": upstream_hashes},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan(config: ExperimentConfig, out: str | Path) -> list[Stage]:
    """Every stage of the experiment, upstream first, each with its hash."""
    out = Path(out)
    stages: list[Stage] = []
    for name, spec in config.strategies.items():
        stages += teacher_stages(config, out, name, spec)
    # the untrained student's evaluation right after the teachers: with teacher == student
    # (self-distillation) on the vllm engine, with one set of options for both roles, it
    # reuses their server instead of starting one
    if "base" in config.experiments:
        stages.append(eval_stage(config, out, "base"))
    on_policy = on_policy_students(config)
    for experiment in config.experiments:
        if experiment in on_policy:
            stages.append(on_policy_stage(config, out, experiment, on_policy[experiment]))
        elif experiment != "base":
            stages.append(student_stage(config, out, experiment))
    for experiment in config.experiments:
        if experiment != "base":
            stages.append(eval_stage(config, out, experiment))
    if config.attention.get("enabled", True):
        stages.append(attention_stage(config, out))
    stages.append(report_stage(config, out, stages))
    by_name: dict[str, Stage] = {}
    for stage in stages:
        stage.run_dir = out
        stage.hash = stage_hash(stage.kind, stage.params,
                                [by_name[u].hash for u in stage.upstream])
        by_name[stage.name] = stage
    return stages


def _slice(slc: DataSlice) -> dict[str, Any]:
    return dataclasses.asdict(slc)


def data_file(out: Path, which: str) -> Path:
    """The selected questions, written once per run so every stage reads the same ones."""
    return out / "data" / f"{which}.jsonl"


def _with_seed(kind: str, values: dict[str, Any], seed: int) -> dict[str, Any]:
    """The experiment's seed, where the stage has a `seed` field the config leaves unset."""
    if "seed" in options.settable(STAGE_CONFIGS[kind]) and "seed" not in values:
        values = {**values, "seed": seed}
    return values


# Params whose key starts with `_` are hashed but not passed to the stage's config.


def teacher_stages(
    config: ExperimentConfig, out: Path, name: str, spec: StrategySpec
) -> list[Stage]:
    """One teacher stage per strategy, or one per shard with `teacher_shards` > 1."""
    params = _with_seed("teacher", {**config.teacher, **spec.teacher}, config.seed)
    params |= {"teacher": config.models.teacher, "strategy": name,
               "_transfer": _slice(config.data.transfer), **_engine(config, "teacher")}
    if config.engine.name == "vllm" and config.engine.base_url:
        params["base_url"] = config.engine.base_url  # the server answering is an input
    paths: dict[str, Any] = {"data": data_file(out, "transfer")}
    if spec.custom:
        params["_strategy_spec"] = {
            "description": spec.description or f"custom strategy {name}",
            "user": spec.user, "system": spec.system, "prefill": spec.prefill or ""}
        paths["strategies_file"] = out / RECORDS / "strategies" / f"{name}.yaml"
    shards = config.teacher_shards
    if shards == 1:
        directory = out / "teacher" / name
        return [Stage(f"teacher/{name}", "teacher", directory, params,
                      {**paths, "out": directory})]
    stages = []
    for index in range(shards):
        shard = shard_name(index, shards)
        directory = out / "teacher" / name / shard
        stages.append(Stage(f"teacher/{name}/{shard}", "teacher", directory,
                            {**params, "shard": f"{index}/{shards}"},
                            {**paths, "out": directory}))
    return stages


def shard_name(index: int, count: int) -> str:
    return f"shard-{index}-of-{count}"


def teacher_store_dirs(config: ExperimentConfig, out: Path, strategy: str) -> list[Path]:
    """The store directories of one strategy's teacher: one, or one per shard."""
    root = out / "teacher" / strategy
    if config.teacher_shards == 1:
        return [root]
    return [root / shard_name(i, config.teacher_shards) for i in range(config.teacher_shards)]


def _engine(config: ExperimentConfig, role: str) -> dict[str, Any]:
    """The engine of one role's stages: `teacher` or `student` (eval, on-policy rollouts)."""
    return {"engine": config.engine.name,
            "engine_options": config.engine.role_options(role)}


def student_stage(config: ExperimentConfig, out: Path, experiment: str) -> Stage:
    directory = out / "students" / experiment
    paths: dict[str, Any] = {"out": directory, "resume": True}
    if experiment == "sft":
        params = _with_seed("distill", {**config.distill, **config.sft}, config.seed)
        params |= {"student": config.models.student, "objective": "sft",
                   "_transfer": _slice(config.data.transfer)}
        paths["data"] = data_file(out, "transfer")
        return Stage(f"students/{experiment}", "distill", directory, params, paths)
    strategy = experiment.removeprefix("kd-")
    params = {**config.distill, **config.strategies[strategy].distill}
    params = _with_seed("distill", params, config.seed)
    params |= {"student": config.models.student, "objective": "kd"}
    stores = teacher_store_dirs(config, out, strategy)
    paths["teacher_store"] = stores[0] if len(stores) == 1 else stores
    upstream = tuple(f"teacher/{d.relative_to(out / 'teacher').as_posix()}" for d in stores)
    return Stage(f"students/{experiment}", "distill", directory, params, paths,
                 upstream=upstream)


def on_policy_stage(config: ExperimentConfig, out: Path, name: str, entry: dict[str, Any]
                    ) -> Stage:
    """An on-policy student: the student's rollouts on the transfer questions, scored by the
    teacher under the entry's strategy (`distill --on-policy`); lmbda < 1 mixes in the
    strategy's teacher store."""
    strategy = entry["strategy"]
    settings = options.defaults(DistillConfig, ON_POLICY_ENTRY)
    settings["alpha"] = 0.0  # the divergence alone: CE on its own samples self-trains
    params = {**config.distill, **config.strategies[strategy].distill, **settings}
    params |= {k: v for k, v in entry.items() if k != "name"}
    params = _with_seed("distill", params, config.seed)
    params |= {"student": config.models.student, "objective": "kd", "on_policy": True,
               "teacher": config.models.teacher, "_transfer": _slice(config.data.transfer),
               **_engine(config, "student")}
    teacher_options = config.engine.role_options("teacher")
    if teacher_options != params["engine_options"]:  # unset: the same as the student's
        params["teacher_engine_options"] = teacher_options
    for key in ("val_size", "epochs", "max_steps"):  # rounds decide the steps
        params.pop(key, None)
    directory = out / "students" / name
    paths: dict[str, Any] = {"out": directory, "resume": True,
                             "data": data_file(out, "transfer")}
    # The teacher stage(s) only when the store (lmbda < 1) or the strategy file (custom) is read.
    stores = teacher_store_dirs(config, out, strategy)
    upstream: tuple[str, ...] = ()
    if params["lmbda"] < 1 or config.strategies[strategy].custom:
        upstream = tuple(f"teacher/{d.relative_to(out / 'teacher').as_posix()}" for d in stores)
    if params["lmbda"] < 1:
        paths["teacher_store"] = stores[0] if len(stores) == 1 else [str(d) for d in stores]
    if config.strategies[strategy].custom:
        paths["strategies_file"] = out / RECORDS / "strategies" / f"{strategy}.yaml"
    return Stage(f"students/{name}", "distill", directory, params, paths, upstream=upstream)


def eval_stage(config: ExperimentConfig, out: Path, experiment: str) -> Stage:
    overrides: dict[str, Any] = {}
    if experiment.startswith("kd-"):
        overrides = config.strategies[experiment.removeprefix("kd-")].eval
    params = _with_seed("eval", {**config.eval, **overrides}, config.seed)
    params |= {"model": config.models.student, "_test": _slice(config.data.test),
               **_engine(config, "student")}  # never the teacher's server (base_url)
    directory = out / "eval" / experiment
    paths: dict[str, Any] = {"out": directory, "data": data_file(out, "test")}
    upstream: tuple[str, ...] = ()
    if experiment != "base":
        paths["adapter"] = out / "students" / experiment
        upstream = (f"students/{experiment}",)
    return Stage(f"eval/{experiment}", "eval", directory, params, paths, upstream)


def attention_stage(config: ExperimentConfig, out: Path) -> Stage:
    params = {k: v for k, v in config.attention.items() if k != "enabled"}
    params = _with_seed("attention", params, config.seed)
    params |= {"model": config.models.student, "_test": _slice(config.data.test)}
    trained = [e for e in config.experiments if e != "base"]
    paths = {"out": out / "attention", "data": data_file(out, "test"),
             "adapters": {e: out / "students" / e for e in trained},
             "results": {e: out / "eval" / e / "results.jsonl" for e in config.experiments}}
    upstream = tuple(f"students/{e}" for e in trained) + tuple(
        f"eval/{e}" for e in config.experiments)
    return Stage("attention", "attention", out / "attention", params, paths, upstream)


def report_stage(config: ExperimentConfig, out: Path, stages: list[Stage]) -> Stage:
    hashed = plain(config.to_dict())
    hashed["engine"].pop("base_url", None)  # where the server runs changes no result
    hashed.pop("costs", None)  # the dry-run's estimate only
    params = {"report": dataclasses.asdict(config.report), "format": report.FORMAT_VERSION,
              "config": hashed}
    layout = report.Layout(
        run_dir=out,
        teachers={name: out / "teacher" / name for name in config.strategies},
        students={s.name.split("/", 1)[1]: s.directory for s in stages if s.kind == "distill"},
        evals={s.name.split("/", 1)[1]: s.directory for s in stages if s.kind == "eval"},
        attention=next((s.directory for s in stages if s.kind == "attention"), None),
        stages={s.name: s.directory for s in stages},
    )
    return Stage("report", "report", out / report.ASSETS, params,
                 {"out": out, "layout": layout}, upstream=tuple(s.name for s in stages))


# --- running the stages -------------------------------------------------------------------------


def stage_config(stage: Stage) -> Any:
    """The stage's own config dataclass, built from its params and paths (as text)."""
    values = {k: v for k, v in stage.params.items() if not k.startswith("_")}
    try:
        return STAGE_CONFIGS[stage.kind](**values | plain(stage.paths))
    except PrimekdError as e:
        raise PrimekdError(f"{stage.name}: {e}") from None
    except (TypeError, ValueError) as e:
        raise PrimekdError(f"{stage.name}: bad settings: {e}") from None


StageFunction = Callable[[Stage, bool], Any]


def run_teacher(stage: Stage, progress: bool) -> Any:
    if "_strategy_spec" in stage.params:  # a custom strategy: the file `teach` reads
        spec = {k: v for k, v in stage.params["_strategy_spec"].items() if v is not None}
        text = yaml.safe_dump({"strategies": {stage.params["strategy"]: spec}}, sort_keys=False)
        atomic_write_text(stage.paths["strategies_file"], text)
    return teach(stage_config(stage), progress=progress)


def run_distill(stage: Stage, progress: bool) -> Any:
    from primekd.distill import distill
    from primekd.distill.trainer import remove_checkpoints

    result = distill(stage_config(stage), progress=progress)
    remove_checkpoints(stage.directory)  # finished: the adapter stays, resume state goes
    return result.summary


def run_eval(stage: Stage, progress: bool) -> Any:
    config = stage_config(stage)
    summary = evaluate(config, progress=progress)
    if config.engine == "vllm" and config.adapter and not config.engine_options.get("lora"):
        from primekd.engines.vllm import drop_merged

        drop_merged(config.model, str(config.adapter))  # the stage is cached from now on
    return summary


def run_attention(stage: Stage, progress: bool) -> Any:
    from primekd.analyze import attention

    result = attention.analyse(stage_config(stage), progress=progress)
    return result.summary  # the tables are in the stage directory


def run_report(stage: Stage, progress: bool) -> Any:
    settings = stage.params["report"]
    return report.write_report(stage.paths["out"], stage.paths["layout"], **settings)


STAGE_FUNCTIONS: dict[str, StageFunction] = {
    "teacher": run_teacher, "distill": run_distill, "eval": run_eval,
    "attention": run_attention, "report": run_report,
}



def select_stages(stages: list[Stage], only: list[str] | None) -> list[Stage]:
    """The stages `--only` names (all of them without it); their upstream must be complete."""
    if not only:
        return stages
    selected = [s for s in stages if any(fnmatch.fnmatchcase(s.name, p) for p in only)]
    unmatched = [p for p in only if not any(fnmatch.fnmatchcase(s.name, p) for s in stages)]
    if unmatched:
        raise PrimekdError(f"--only {unmatched[0]} names no stage of this run; "
                           "`primekd run --dry-run` lists them")
    chosen = {s.name for s in selected}
    by_name = {s.name: s for s in stages}
    for stage in selected:
        for name in stage.upstream:
            if name not in chosen and by_name[name].state() != "cached":
                raise PrimekdError(f"{stage.name} needs {name}, which is not complete: "
                                   "run it first (or include it in --only)")
    return selected


def clear_stale_teachers(stages: list[Stage], out: Path) -> None:
    """After `teacher_shards` changed, remove the teacher stores made under the other layout
    (their records say primekd made them), so a strategy's directory holds one layout only."""
    planned = {s.name for s in stages if s.kind == "teacher"}
    records = out / RECORDS
    if not records.is_dir():
        return
    for path in sorted(records.glob("teacher--*.json")):
        try:
            name = read_json(path)["stage"]
        except (PrimekdError, KeyError, TypeError):
            continue
        if name in planned:
            continue
        directory = out / "teacher" / name.removeprefix("teacher/")
        # only the old store's own files go: new shard directories and the user's files stay
        if not outdir.remove_owned(directory, trust="teach") and directory.is_dir():
            directory.rmdir()
        path.unlink(missing_ok=True)  # another `run --only` may have cleared it first

