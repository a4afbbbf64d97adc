"""Optuna search over KD hyperparameters (`primekd tune`).

A search space maps `DistillConfig` field names to ranges (float, int, log-scaled) or choices;
each trial trains a student for a few steps on the teacher store minus a held-out validation
slice and is scored on that slice only (validation cross-entropy on the teacher's answers,
or GSM8K accuracy by generation), never on the test set. Intermediate validation losses go
to the pruner.

Several workers (processes, machines) share one study through an Optuna RDB storage URL.
`trials` is the study's total: a worker starts a trial only while finished + running trials
are fewer than `trials`, and a trial that loses a race for the last slot is dropped before it
trains, so the study ends with exactly `trials` finished trials. Workers send heartbeats; the
trial of a killed worker is marked failed (and its parameters retried) by the survivors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import random
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from primekd.core import options, outdir
from primekd.core.errors import PrimekdError
from primekd.core.io import atomic_write, atomic_write_text, write_json
from primekd.core.options import option
from primekd.distill.config import DistillConfig, check_config
from primekd.evaluate.evaluator import EvalConfig, evaluate
from primekd.experiment.search_space import (
    TRIAL_FIELDS,
    SearchSpace,
    default_search_space,
    load_search_space,
)

if TYPE_CHECKING:
    import optuna

OBJECTIVES = ("val_loss", "val_accuracy")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
DEFAULT_STUDY = "primekd-tune"
_SURPLUS_ATTR = "primekd_surplus"
# The yardstick of every trial: the student's per-token cross-entropy on the held-out teacher
# answers. Not `eval_loss`: that is alpha * CE + (1 - alpha) * T^2 * KD, which changes with the
# very alpha and temperature being tuned, so comparing it across trials would reward the loss
# formula instead of the student.
VAL_METRIC = "eval_ce"


@dataclass
class TuneConfig:
    """Everything `primekd tune` needs; the CLI options map one to one onto these fields."""

    teacher_store: str = option(help="Teacher store directory written by `primekd teach`.",
                                cli_type=Path, parse=str)
    student: str = option(help="Student model: a model alias (the bundled "
                          "smollm2-135m-instruct; `primekd models` lists the others), a local "
                          "HF directory, a .gguf file or a hub id.")
    out: str = option(help="Output directory: trials/<number>/, best_params.yaml (for distill "
                      "--config), best_run.yaml (for primekd run), trials.csv, summary.json, "
                      "history.png, importance.png (and study.db with the default storage).",
                      cli_type=Path, parse=str)
    space: SearchSpace = option(
        help="Search space YAML (DistillConfig field -> {low, high[, log, step, type]} or "
        "{choices: [...]}, or a plain value to fix it). Default: alpha in [0, 1], temperature "
        "in [1, 10] (log), lr in [1e-5, 1e-3] (log), lora_r in {4, 8, 16}.",
        factory=default_search_space, cli_type=Path, parse=load_search_space,
        default_text="")
    objective: str = option("val_loss", "What a trial is scored on, always on the held-out "
                            "validation slice of the store: val_loss (the student's "
                            "cross-entropy on the held-out teacher answers, minimised, cheap) "
                            "or val_accuracy (GSM8K accuracy of its generated answers, "
                            "maximised).")
    val_size: int = option(16, "Store questions held out of training as the validation "
                           "slice.", ge=1)
    trials: int = option(10, "Finished trials (complete or pruned) the study should hold in "
                         "total, counted over all workers sharing it.", ge=1)
    timeout: float | None = option(None, "Seconds after which this worker starts no new "
                                   "trial.", gt=0)
    storage: str | None = option(None, "Optuna RDB URL shared by workers, e.g. "
                                 "postgresql://user:pass@host/db. Default: "
                                 "sqlite:///OUT/study.db.")
    study: str = option(DEFAULT_STUDY, "Study name inside the storage (workers join by name).")
    sampler: str = option("tpe", "tpe (Bayesian optimisation after random start-up) or "
                          "random.")
    pruner: str = option("median", "median (stop a trial whose validation loss is worse than "
                         "the median of earlier trials at the same step) or none.")
    max_steps: int = option(30, "Optimiser steps per trial (a reduced budget).", ge=1)
    eval_steps: int | None = option(None, "Validation loss every N steps, reported to the "
                                    "pruner. Default: max-steps / 4.")
    seed: int = option(0, "Seed of the sampler, of every trial's training and of the "
                       "validation slice.")
    heartbeat: int = option(10, "Seconds between worker heartbeats; a trial silent for 3x "
                            "this is marked failed and its parameters retried.", ge=1)
    max_new_tokens: int = option(256, "Answer length limit of the val_accuracy objective.")

    def __post_init__(self) -> None:
        options.check(self)  # types and ranges, as the fields declare them
        if self.objective not in OBJECTIVES:
            raise PrimekdError(
                f"unknown objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}"
            )
        if self.sampler not in SAMPLERS:
            raise PrimekdError(f"unknown sampler {self.sampler!r}: use {' or '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise PrimekdError(f"unknown pruner {self.pruner!r}: use {' or '.join(PRUNERS)}")
        if not Path(self.teacher_store).is_dir():
            raise PrimekdError(
                f"teacher store {self.teacher_store} does not exist: "
                "make one with `primekd teach ... --out DIR`"
            )
        if not (Path(self.teacher_store) / "manifest.json").exists():
            raise PrimekdError(
                f"{self.teacher_store} has no manifest.json: not a teacher store "
                "(make one with `primekd teach`)"
            )

    @property
    def direction(self) -> str:
        return "maximize" if self.objective == "val_accuracy" else "minimize"

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"

    @property
    def resolved_eval_steps(self) -> int:
        return self.eval_steps or max(1, self.max_steps // 4)


@dataclass
class TuneResult:
    """What a worker reports at the end: the whole study's state, not only its own trials."""

    study: str
    storage: str
    objective: str
    direction: str
    n_trials: int
    complete: int
    pruned: int
    failed: int
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any] | None
    files: dict[str, str]
    worker_trials: list[int]
    wall_s: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- storage and study


def open_storage(url: str, heartbeat: int = 10) -> optuna.storages.RDBStorage:
    """An RDB storage with worker heartbeats: a killed worker's trial becomes FAIL and its
    parameters are queued once more for the surviving workers."""
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several processes write one SQLite file: wait for the lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 120}
        _sqlite_parent(url).mkdir(parents=True, exist_ok=True)
    for attempt in range(6):
        try:
            with _quiet_optuna_warnings():
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat,
                    grace_period=3 * heartbeat,
                    heartbeat_stale_trial_callback=RetryFailedTrialCallback(max_retry=1),
                )
        except ImportError as e:
            raise PrimekdError(
                f"storage {redact(url)} needs a database driver that is not installed "
                f"({e}); for PostgreSQL: pip install psycopg2-binary"
            ) from None
        except Exception as e:  # noqa: BLE001 - bad URL, unreachable server, wrong schema
            # Workers starting together race to create the schema: one wins, the rest retry.
            if attempt == 5 or type(e).__name__ not in ("IntegrityError", "OperationalError"):
                raise PrimekdError(f"cannot open Optuna storage {redact(url)}: {e}") from None
            time.sleep(0.2 * (attempt + 1) + random.random() / 2)
    raise AssertionError("unreachable")


def _sqlite_parent(url: str) -> Path:
    return Path(url.split(":///", 1)[-1]).expanduser().resolve().parent


def redact(url: str) -> str:
    """The storage URL without its password, for logs and summaries."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL has no password to hide
        return url


@contextlib.contextmanager
def _quiet_optuna_warnings() -> Iterator[None]:
    """Optuna flags heartbeats and constant_liar as experimental; that is not news to users."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def create_study(config: TuneConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study, or join it when another worker made it first (same settings only)."""
    import optuna

    study = optuna.create_study(
        storage=storage,
        study_name=config.study,
        direction=config.direction,
        load_if_exists=True,
    )
    expected = _study_attrs(config)
    if not study.user_attrs:
        for key, value in expected.items():
            study.set_user_attr(key, value)
        return study
    for key, label in _MUST_MATCH.items():
        # A key may be missing while the worker that created the study is still writing them.
        if key in study.user_attrs and study.user_attrs[key] != expected[key]:
            raise PrimekdError(
                f"study {config.study!r} in {redact(config.storage_url)} was created with a "
                f"different {label}; use the same settings to join it, or --study NAME for a "
                "new study"
            )
    return study


# What workers of one study must agree on (the same store may sit at different paths).
_MUST_MATCH = {
    "objective": "objective",
    "space": "search space",
    "max_steps": "--max-steps",
    "val_size": "--val-size (validation slice)",
    "seed": "--seed (it also picks the validation slice)",
    "store_id": "teacher store (its manifest differs)",
    "student_id": "student",
}


def _study_attrs(config: TuneConfig) -> dict[str, Any]:
    manifest = (Path(config.teacher_store) / "manifest.json").read_bytes()
    return {
        "objective": config.objective,
        "space": config.space.to_yaml(),
        "fixed": config.space.fixed,
        "max_steps": config.max_steps,
        "val_size": config.val_size,
        "seed": config.seed,
        "teacher_store": str(Path(config.teacher_store).resolve()),
        "store_id": hashlib.sha256(manifest).hexdigest()[:16],
        "student": config.student,
        "student_id": Path(config.student).name,
    }


def make_sampler(kind: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """TPE (Bayesian optimisation) after a few random start-up trials, or pure random.

    `constant_liar` makes parallel workers avoid the points other workers are running.
    """
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with _quiet_optuna_warnings():
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=max(2, min(10, trials // 4)), constant_liar=True
        )


def make_pruner(kind: str, eval_steps: int) -> optuna.pruners.BasePruner:
    """Median pruning from the second evaluation on, once two trials have finished."""
    import optuna

    if kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2 * eval_steps)


# --------------------------------------------------------------------------- the search


class _Surplus(Exception):
    """A trial that lost the race for the study's last slot; dropped before it trains."""


def tune(config: TuneConfig, progress: bool = True) -> TuneResult:
    """Run trials until the study holds `config.trials` finished ones (or the timeout).

    Safe to run as several processes (or on several machines) with one storage URL.
    """
    import optuna

    start = time.monotonic()
    # no lock: several tune workers may share one --out
    foreign = outdir.check_out(config.out, "tune")
    Path(config.out).mkdir(parents=True, exist_ok=True)
    outdir.write_marker(Path(config.out), "tune", foreign)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        preflight(config)
        storage = open_storage(config.storage_url, config.heartbeat)
        study = create_study(config, storage)
        mine = _work(config, storage, progress, start)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return write_outputs(study, config, mine, time.monotonic() - start)


def _work(
    config: TuneConfig, storage: optuna.storages.BaseStorage, progress: bool, start: float
) -> list[int]:
    """This worker's loop: claim a free slot, run one trial, repeat; numbers it ran."""
    say = _printer(progress)
    mine: list[int] = []
    waiting_said = False
    while True:
        study = _load_study(config, storage)
        finished, running = _counts(study)
        if finished >= config.trials:
            return mine
        if config.timeout is not None and time.monotonic() - start >= config.timeout:
            say(f"timeout reached after {finished} finished trials")
            return mine
        if finished + running >= config.trials:
            if not waiting_said:
                say(f"waiting for {running} trial(s) running in other workers")
                waiting_said = True
            time.sleep(min(config.heartbeat, 5))
            continue
        waiting_said = False
        study.optimize(
            lambda trial: _objective(trial, config, progress),
            n_trials=1,
            catch=(_Surplus,),
            callbacks=[lambda s, t: _report(t, config, say, mine)],
        )


def _load_study(config: TuneConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """A fresh handle per trial, its sampler seeded by the trial count so that one worker
    is reproducible and concurrent workers do not draw the same random start-up points."""
    import optuna

    with _quiet_optuna_warnings():
        study = optuna.load_study(study_name=config.study, storage=storage)
        optuna.storages.fail_stale_trials(study)
    _fail_orphans(study, orphan_after=6 * config.heartbeat)
    n = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(config.sampler, _derived_seed(config.seed, n), config.trials)
    study.pruner = make_pruner(config.pruner, config.resolved_eval_steps)
    return study


def _fail_orphans(study: optuna.Study, orphan_after: float) -> None:
    """Fail RUNNING trials that never got parameters long after they started.

    Optuna's heartbeat check skips a trial that never sent a heartbeat: a worker killed
    between creating a trial and its first heartbeat would leave it RUNNING for ever, and the
    other workers waiting for it. A live worker samples parameters within moments of
    creating a trial, so a parameterless trial this old has no worker.
    """
    from optuna.trial import TrialState

    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        if trial.params or started is None or (now - started).total_seconds() < orphan_after:
            continue
        with contextlib.suppress(Exception):  # another worker may have failed it first
            study.tell(trial.number, state=TrialState.FAIL)


def _derived_seed(seed: int, n: int) -> int:
    """A well-mixed seed per (seed, trial count): seeds 0, 1, 2, ... draw correlated numbers."""
    return int(hashlib.sha256(f"{seed}/{n}".encode()).hexdigest()[:8], 16)


def _counts(study: optuna.Study) -> tuple[int, int]:
    from optuna.trial import TrialState

    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return len(finished), len(running)


def _is_surplus(trial: optuna.Trial, total: int) -> bool:
    """True when `total` live trials were created before this one.

    Trial numbers are assigned in creation order by the storage, so "the first `total` trials
    that have not failed" is the same set for every worker: exactly `total` trials train.
    """
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    earlier = [
        t for t in trial.study.get_trials(deepcopy=False, states=live) if t.number < trial.number
    ]
    return len(earlier) >= total


def _printer(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda message: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda message: console.print(message, highlight=False, soft_wrap=True)


def _report(
    trial: optuna.trial.FrozenTrial,
    config: TuneConfig,
    say: Callable[[str], None],
    mine: list[int],
) -> None:
    if trial.user_attrs.get(_SURPLUS_ATTR):
        return
    mine.append(trial.number)
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    outcome = trial.state.name.lower()
    if trial.value is not None:
        outcome = f"{config.objective} {trial.value:.4g}"
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    say(f"trial {trial.number}: {params} -> {outcome} ({seconds:.1f} s)")


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- one trial


def _objective(trial: optuna.Trial, config: TuneConfig, progress: bool) -> float:
    """Train a student with this trial's parameters; score it on the validation slice."""
    import optuna

    if _is_surplus(trial, config.trials):
        trial.set_user_attr(_SURPLUS_ATTR, True)
        raise _Surplus(f"the study already has {config.trials} trials")
    params = config.space.sample(trial)
    trial_dir = Path(config.out) / "trials" / str(trial.number)
    distill_config = trial_distill_config(config, params, trial_dir)
    sign = -1.0 if config.objective == "val_accuracy" else 1.0
    pruning = _pruning_callback(trial, sign)
    _distill(distill_config, pruning, progress)
    if pruning.pruned:
        write_json(trial_dir / "trial.json", _trial_record(trial, params, pruning, None))
        raise optuna.TrialPruned(f"pruned at step {pruning.last_step}")
    value = _score(config, distill_config, pruning)
    write_json(trial_dir / "trial.json", _trial_record(trial, params, pruning, value))
    return value


def trial_distill_config(config: TuneConfig, params: dict[str, Any], out: Path
                         ) -> DistillConfig:
    """The DistillConfig of one trial: the sampled parameters over tune's fixed settings."""
    settings = {name: getattr(config, name) for name in TRIAL_FIELDS}
    settings |= {"out": str(out), "eval_steps": config.resolved_eval_steps}
    try:
        return DistillConfig(**{**params, **settings})
    except (TypeError, ValueError) as e:
        raise PrimekdError(f"search space gives an invalid distill config: {e}") from None


def _pruning_callback(trial: optuna.Trial, sign: float) -> Any:
    """A TrainerCallback that reports each validation loss (times `sign`) to the trial and
    stops training when the pruner says so."""
    from transformers import TrainerCallback

    class PruningCallback(TrainerCallback):
        def __init__(self) -> None:
            self.pruned = False
            self.last_step = 0
            self.reported: dict[int, float] = {}

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get(VAL_METRIC)
            if loss is None or state.global_step in self.reported:
                return
            value = sign * float(loss)
            self.reported[state.global_step] = value
            self.last_step = state.global_step
            trial.report(value, state.global_step)
            if trial.should_prune():
                self.pruned = True
                control.should_training_stop = True

    return PruningCallback()


def _distill(distill_config: Any, pruning: Any, progress: bool) -> Any:
    from primekd.core.memory import release_memory
    from primekd.distill import distill
    from primekd.distill.trainer import remove_checkpoints

    try:
        result = distill(distill_config, callbacks=[pruning], progress=progress)
    except BaseException as error:
        # the traceback's frames hold the trial's model and optimizer for as long as the
        # error is kept (optuna keeps it while it records the failed trial)
        traceback.clear_frames(error.__traceback__)
        release_memory()
        raise
    release_memory()
    remove_checkpoints(distill_config.out)  # a trial is never resumed; keep the disk free
    return result


def _score(config: TuneConfig, distill_config: Any, pruning: Any) -> float:
    if config.objective == "val_loss":
        if not pruning.reported:
            raise PrimekdError("training reported no validation loss")
        return pruning.reported[max(pruning.reported)]
    return _val_accuracy(config, distill_config)


def _val_accuracy(config: TuneConfig, distill_config: Any) -> float:
    """Greedy GSM8K accuracy of the trained adapter on the held-out slice questions."""
    trial_dir = Path(distill_config.out)
    questions = trial_dir / "val_questions.jsonl"
    atomic_write_text(
        questions, "".join(json.dumps(q) + "\n" for q in validation_questions(distill_config))
    )
    summary = evaluate(
        EvalConfig(
            model=distill_config.student,
            adapter=str(trial_dir),
            data=str(questions),
            out=trial_dir / "val_eval",
            max_new_tokens=config.max_new_tokens,
            prompt=distill_config.prompt,
            device=distill_config.device,
        ),
        progress=False,
    )
    return float(summary["accuracy"])


_SPLITS: dict[tuple, list[dict[str, Any]]] = {}


def validation_questions(distill_config: Any) -> list[dict[str, Any]]:
    """The held-out slice (id, question, answer) exactly as `distill` splits the store: found
    by distill's own `build_datasets`, so no trial ever trains on these questions."""
    key = (
        str(Path(distill_config.teacher_store).resolve()),
        distill_config.student,
        distill_config.seed,
        distill_config.val_size,
        distill_config.limit,
        distill_config.max_length,
    )
    if key not in _SPLITS:
        _SPLITS[key] = _split(distill_config)
    return _SPLITS[key]


def _split(distill_config: Any) -> list[dict[str, Any]]:
    from primekd.core.models import load_tokenizer
    from primekd.distill.data import build_datasets
    from primekd.teach.store import load_store

    # alpha = 1: the split does not depend on the teacher's top-k, so skip loading them.
    probe = dataclasses.replace(distill_config, alpha=1.0)
    held = {item.id for item in build_datasets(probe, load_tokenizer(probe.student)).val}
    table = load_store(distill_config.teacher_store, columns=["id", "question", "reference"],
                       require_complete=not distill_config.allow_partial)
    rows: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        if row["id"] in held and row["id"] not in rows:
            rows[row["id"]] = {
                "id": row["id"],
                "question": row["question"],
                "answer": row["reference"],
            }
    return [rows[i] for i in sorted(rows)]


def preflight(config: TuneConfig) -> None:
    """Refuse a search space that distill would reject, or a store too small for the
    validation slice, before any trial starts."""
    from primekd.teach.store import store_directories, training_coverage

    base = trial_distill_config(config, config.space.fixed, Path(config.out) / "trials")
    # an unfinished store is the store's fault, not the space's (allow_partial: a fixed value)
    training_coverage(store_directories(config.teacher_store), base.allow_partial)
    try:
        check_config(base)
    except PrimekdError as e:
        raise PrimekdError(f"search space: fixed values are invalid: {e}") from None
    for param in config.space.params:
        for value in param.extremes():
            try:
                check_config(dataclasses.replace(base, **{param.name: value}))
            except PrimekdError as e:
                raise PrimekdError(
                    f"search space: {param.name}={value!r} is invalid: {e}"
                ) from None
    validation_questions(base)


def _trial_record(
    trial: optuna.Trial, params: dict[str, Any], pruning: Any, value: float | None
) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": "pruned" if pruning.pruned else "complete",
        "value": value,
        "params": params,
        "intermediate": pruning.reported,
    }


# --------------------------------------------------------------------------- outputs


def write_outputs(
    study: optuna.Study, config: TuneConfig, mine: list[int], wall_s: float
) -> TuneResult:
    """Write best_params.yaml, best_run.yaml, trials.csv, history.png, importance.png and
    summary.json."""
    from optuna.trial import TrialState

    out = Path(config.out)
    files: dict[str, str] = {}
    notes: list[str] = []
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(_SURPLUS_ATTR)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        files["best_params"] = str(export_best(study, out / "best_params.yaml"))
        files["best_run"] = str(export_best(study, out / "best_run.yaml", for_run=True))
    else:
        notes.append("no trial completed, so there are no best parameters to export")
    files["trials"] = str(write_trials_csv(study, out / "trials.csv"))
    notes += write_plots(study, out, files)
    best = study.best_trial if complete else None
    result = TuneResult(
        study=config.study,
        storage=redact(config.storage_url),
        objective=config.objective,
        direction=config.direction,
        n_trials=config.trials,
        complete=len(complete),
        pruned=sum(t.state == TrialState.PRUNED for t in trials),
        failed=sum(t.state == TrialState.FAIL for t in trials),
        best_trial=best.number if best else None,
        best_value=best.value if best else None,
        best_params=best_params(study) if best else None,
        files=files | {"summary": str(out / "summary.json")},
        worker_trials=sorted(mine),
        wall_s=round(wall_s, 2),
        notes=notes,
    )
    write_json(out / "summary.json", result.to_dict())
    return result


def best_params(study: optuna.Study) -> dict[str, Any]:
    """The best trial's parameters merged over the space's fixed values."""
    return {**study.user_attrs.get("fixed", {}), **study.best_trial.params}


def export_best(study: optuna.Study, path: str | Path, for_run: bool = False) -> Path:
    """Write the best parameters as a YAML config fragment of `DistillConfig` fields.

    The flat form is for `primekd distill --config FILE`; `for_run` nests it under `distill:`
    (leaving out the fields `primekd run` fills in itself) for `primekd run FILE`.
    """
    best = study.best_trial
    attrs = study.user_attrs
    params = best_params(study)
    if for_run:
        settable = options.settable(DistillConfig)
        body = yaml.safe_dump({"distill": {k: v for k, v in params.items() if k in settable}},
                              sort_keys=False)
        use = f"primekd run {Path(path).name} [--preset quick|paper]"
    else:
        body = yaml.safe_dump(params, sort_keys=False)
        use = (
            f"primekd distill --config {Path(path).name} --student M --teacher-store DIR --out DIR"
        )
    header = [
        "# Best KD hyperparameters found by `primekd tune`.",
        f"# study {study.study_name}: trial {best.number} of "
        f"{len(study.get_trials(deepcopy=False))}, "
        f"{attrs.get('objective', 'objective')} = {best.value:.6g}",
        f"# each trial trained {attrs.get('max_steps', '?')} steps; "
        "set epochs or max_steps for the real run.",
        f"# use: {use}",
    ]
    path = Path(path)
    atomic_write_text(path, "\n".join(header) + "\n" + body)
    return path


def write_trials_csv(study: optuna.Study, path: str | Path) -> Path:
    """One row per trial: number, state, value, parameters, timings."""
    frame = study.trials_dataframe(
        attrs=("number", "state", "value", "params", "datetime_start", "duration")
    )
    path = Path(path)
    atomic_write_text(path, frame.to_csv(index=False))
    return path


def write_plots(study: optuna.Study, out: Path, files: dict[str, str]) -> list[str]:
    """history.png always; importance.png from two completed trials on. Returns notes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.ticker import MaxNLocator
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    notes: list[str] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with _quiet_optuna_warnings(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "importances will be equal" on few trials
        if complete:
            axes = plots.plot_optimization_history(study)
            axes.set_ylabel(study.user_attrs.get("objective", "objective"))
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            _save(axes, out / "history.png")
            files["history"] = str(out / "history.png")
        if len(complete) < 2:
            notes.append("parameter importances need at least 2 completed trials")
            return notes
        try:
            _save(plots.plot_param_importances(study), out / "importance.png")
            files["importance"] = str(out / "importance.png")
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            notes.append(f"parameter importances skipped: {e}")
    return notes


def _save(axes: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = axes.get_figure()
    figure.set_size_inches(7, 4.5)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, bbox_inches="tight"))
    plt.close(figure)
