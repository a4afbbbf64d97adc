"""`primekd tune`: search-space checks, a real short search, the best-params round trip into
distill, and several workers (real processes) sharing one SQLite study."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from primekd.core.errors import PrimekdError
from primekd.experiment.search_space import (
    default_search_space,
    load_search_space,
    parse_search_space,
)
from primekd.experiment.tune import TuneConfig, tune

FAST = ["--max-steps", "2", "--eval-steps", "1", "--val-size", "3", "--heartbeat", "1"]


@pytest.fixture(scope="session")
def tiny_store(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `primekd teach --teacher TINY --strategy none --limit 12 --max-new-tokens 24`
    writes (through the same library call)."""
    from primekd.teach.teacher import TeachConfig, teach

    out = tmp_path_factory.mktemp("tune-store") / "none"
    teach(
        TeachConfig(teacher=str(tiny_model_dir), out=out, limit=12, max_new_tokens=24),
        progress=False,
    )
    return out


def _study(storage_path: Path, name: str = "primekd-tune"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{storage_path}")


def _finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def _primekd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from primekd.cli import main; main()", *args]


# ------------------------------------------------------------------ search space


def test_default_space_is_the_papers_knobs():
    import optuna

    space = default_search_space()
    assert [p.name for p in space.params] == ["alpha", "temperature", "lr", "lora_r"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        params = space.sample(study.ask())
        assert 0.0 <= params["alpha"] <= 1.0
        assert 1.0 <= params["temperature"] <= 10.0
        assert 1e-5 <= params["lr"] <= 1e-3
        assert params["lora_r"] in (4, 8, 16)


def test_space_yaml_ranges_choices_logs_and_fixed_values(tmp_path: Path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "alpha: {low: 0.2, high: 0.8}\n"
        "temperature: {low: 1, high: 8, log: true}\n"
        "lr: {low: 1e-5, high: 1e-3, log: true}\n"  # PyYAML reads 1e-5 as a string
        "lora_r: {choices: [4, 8]}\n"
        "lora_alpha: {type: int, low: 8, high: 32, step: 8}\n"
        "divergence: forward_kl\n"
    )
    space = load_search_space(path)
    kinds = {p.name: (p.kind, p.log) for p in space.params}
    assert kinds == {
        "alpha": ("float", False),
        "temperature": ("float", True),  # a float field, although its bounds are integers
        "lr": ("float", True),
        "lora_r": ("categorical", False),
        "lora_alpha": ("int", False),
    }
    assert space.fixed == {"divergence": "forward_kl"}
    assert parse_search_space(yaml.safe_load(space.to_yaml())).to_yaml() == space.to_yaml()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"alpah": {"low": 0, "high": 1}}, "did you mean 'alpha'"),
        ({"max_steps": {"low": 1, "high": 9}}, "set by primekd tune itself"),
        ({"alpha": {"low": 0.9, "high": 0.1}}, "must be below high"),
        ({"lr": {"low": 0, "high": 1e-3, "log": True}}, "log range needs low > 0"),
        ({"alpha": {"low": 0, "hi": 1}}, "unknown key"),
        ({"lora_r": {"choices": []}}, "non-empty list"),
        ({"lora_r": {"low": 2.5, "high": 9.5}}, "integer field"),
        ({"alpha": {"low": "zero", "high": 1}}, "must be a number"),
        ({"divergence": "jsd"}, "searches none"),
        ([1, 2], "must be a YAML mapping"),
    ],
)
def test_bad_space_is_refused_with_a_reason(data, message):
    with pytest.raises(PrimekdError, match=message):
        parse_search_space(data)


def test_space_values_distill_would_reject_are_refused_before_training(tiny_store, tmp_path):
    space = parse_search_space({"alpha": {"low": 0.5, "high": 2.0}})
    config = TuneConfig(str(tiny_store), "unused", str(tmp_path / "t"), space=space)
    with pytest.raises(PrimekdError, match=r"alpha=2.0 is invalid.*\[0, 1\]"):
        tune(config, progress=False)
    assert not (tmp_path / "t" / "study.db").exists()


def test_cli_bad_input_is_a_one_line_error(tiny_model_dir, tiny_store, tmp_path):
    from primekd.cli.app import app

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("alpha: {low: 0\n")
    base = ["tune", "--student", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    cases = [
        (["--teacher-store", str(tiny_store), "--objective", "accuracy"], "unknown objective"),
        (["--teacher-store", str(tmp_path / "nope")], "primekd teach"),
        (["--teacher-store", str(tiny_store), "--space", str(bad_yaml)], "not valid YAML"),
        (["--teacher-store", str(tiny_store), "--sampler", "grid"], "unknown sampler"),
        (["--teacher-store", str(tiny_store), "--val-size", "12"], "leaves no training"),
        (
            ["--teacher-store", str(tiny_store), "--val-size", "3", "--storage", "nosuch://x"],
            "cannot open",
        ),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, base + args)
        assert isinstance(result.exception, PrimekdError), result.output
        assert message in str(result.exception)


def test_joining_a_study_with_other_settings_is_refused(tiny_store, tmp_path):
    from primekd.experiment.tune import create_study, open_storage

    first = TuneConfig(str(tiny_store), "student", str(tmp_path / "a"), max_steps=5)
    create_study(first, open_storage(first.storage_url))
    other = TuneConfig(
        str(tiny_store), "student", str(tmp_path / "b"), max_steps=7, storage=first.storage_url
    )
    with pytest.raises(PrimekdError, match="different --max-steps"):
        create_study(other, open_storage(other.storage_url))
    same = TuneConfig(
        str(tiny_store), "student", str(tmp_path / "c"), max_steps=5, storage=first.storage_url
    )
    assert create_study(same, open_storage(same.storage_url)).user_attrs["max_steps"] == 5


# ------------------------------------------------------------------ real searches


def test_short_search_exports_params_that_distill_accepts(tiny_model_dir, tiny_store, tmp_path):
    from primekd.distill import distill
    from primekd.distill.config import load_distill_config

    out = tmp_path / "tune"
    config = TuneConfig(
        teacher_store=str(tiny_store),
        student=str(tiny_model_dir),
        out=str(out),
        trials=2,
        max_steps=2,
        eval_steps=1,
        val_size=3,
        sampler="random",
    )
    result = tune(config, progress=False)

    assert result.complete + result.pruned == 2 and result.failed == 0
    assert result.worker_trials == [0, 1]
    for name in ("best_params.yaml", "trials.csv", "summary.json", "history.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "importance.png").exists() == (result.complete >= 2)
    for number in (0, 1):
        record = (out / "trials" / str(number) / "trial.json").read_text()
        assert '"intermediate"' in record
        assert (out / "trials" / str(number) / "adapter_model.safetensors").exists()
    assert len((out / "trials.csv").read_text().splitlines()) == 3

    # The fragment is DistillConfig fields only; distill runs from it.
    fragment = yaml.safe_load((out / "best_params.yaml").read_text())
    assert set(fragment) == {"alpha", "temperature", "lr", "lora_r"}
    loaded = load_distill_config(
        out / "best_params.yaml",
        student=str(tiny_model_dir),
        teacher_store=str(tiny_store),
        out=str(tmp_path / "student"),
        max_steps=1,
    )
    assert loaded.alpha == fragment["alpha"] and loaded.lora_r == fragment["lora_r"]
    trained = distill(loaded, progress=False)
    assert trained.summary["steps"] == 1

    # best_run.yaml is the same values as a `primekd run` config (its `distill` section).
    from primekd.experiment.config import load_config

    experiment = load_config(out / "best_run.yaml", preset="quick")
    assert {k: experiment.distill[k] for k in fragment} == fragment

    # Rerunning the finished study trains nothing more.
    again = tune(config, progress=False)
    assert again.worker_trials == [] and again.complete + again.pruned == 2


@pytest.mark.slow
def test_two_workers_share_one_study_exactly(tiny_model_dir, tiny_store, tmp_path):
    """Two `primekd tune` processes, one SQLite study, --trials 3: exactly 3 finished trials
    between them, each trained once, none lost or duplicated."""
    storage = tmp_path / "shared.db"
    workers = [
        subprocess.Popen(
            _primekd(
                "tune",
                "--teacher-store",
                str(tiny_store),
                "--student",
                str(tiny_model_dir),
                "--trials",
                "3",
                "--storage",
                f"sqlite:///{storage}",
                "--study",
                "shared",
                "--sampler",
                "random",
                "--out",
                str(tmp_path / f"worker{i}"),
                "--json",
                *FAST,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-2000:]

    import json

    summaries = [json.loads(stdout) for stdout, _ in outputs]
    ran = [n for s in summaries for n in s["worker_trials"]]
    finished = _finished(_study(storage, "shared"))
    assert sorted(ran) == sorted(t.number for t in finished)  # every trial ran exactly once
    assert len(finished) == 3 and len(set(ran)) == 3
    for number in ran:
        owners = [i for i, s in enumerate(summaries) if number in s["worker_trials"]]
        trial_dir = tmp_path / f"worker{owners[0]}" / "trials" / str(number)
        assert (trial_dir / "trial.json").exists()
    assert all(s["complete"] + s["pruned"] == 3 for s in summaries)


@pytest.mark.slow
def test_a_killed_workers_trial_fails_and_the_study_continues(tiny_model_dir, tiny_store, tmp_path):
    """A worker process holding a running trial is SIGKILLed; the surviving worker marks the
    trial failed once its heartbeat stops, reruns its parameters, and completes the study."""
    out = tmp_path / "tune"
    config = TuneConfig(
        teacher_store=str(tiny_store),
        student=str(tiny_model_dir),
        out=str(out),
        trials=2,
        max_steps=2,
        eval_steps=1,
        val_size=3,
        heartbeat=1,
        timeout=120,  # a safety net: the study must finish long before this
        objective="val_accuracy",
        max_new_tokens=8,
    )
    doomed = subprocess.Popen(
        [sys.executable, "-c", _HANGING_WORKER, str(tiny_store), str(tiny_model_dir), str(out)]
    )
    try:
        _wait_for_running_trial(out / "study.db")
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()

    result = tune(config, progress=False)

    study = _study(out / "study.db")
    states = {t.number: t.state.name for t in study.trials}
    assert states[0] == "FAIL"
    assert result.failed == 1 and result.complete + result.pruned == 2
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].params == study.trials[0].params

    # val_accuracy: graded answers to the held-out questions, which training never saw.
    from primekd.core.io import read_jsonl
    from primekd.core.models import load_tokenizer
    from primekd.distill.config import DistillConfig
    from primekd.distill.data import build_datasets

    assert 0.0 <= result.best_value <= 1.0
    trial_dir = out / "trials" / str(result.best_trial)
    graded = read_jsonl(trial_dir / "val_eval" / "results.jsonl")
    held = {row["id"] for row in read_jsonl(trial_dir / "val_questions.jsonl")}
    assert {row["id"] for row in graded} == held and len(held) == 3
    trained = build_datasets(
        DistillConfig(teacher_store=str(tiny_store), val_size=3, seed=0, alpha=1.0),
        load_tokenizer(str(tiny_model_dir)),
    ).train
    assert held.isdisjoint(item.id for item in trained)


def test_a_trial_whose_worker_never_beat_is_failed(tiny_model_dir, tiny_store, tmp_path):
    """A trial created by a worker that died before its first heartbeat (no heartbeat, no
    parameters) does not block the study for ever."""
    from primekd.experiment.tune import create_study, open_storage

    config = TuneConfig(
        str(tiny_store),
        str(tiny_model_dir),
        str(tmp_path / "t"),
        trials=1,
        max_steps=1,
        val_size=3,
        heartbeat=1,
        timeout=120,
    )
    create_study(config, open_storage(config.storage_url, heartbeat=1)).ask()  # the orphan
    result = tune(config, progress=False)
    states = [t.state.name for t in _study(tmp_path / "t" / "study.db").trials]
    assert states[0] == "FAIL" and result.complete + result.pruned == 1


# A worker that takes a trial (with heartbeats, as `tune` does) and then hangs until killed.
_HANGING_WORKER = """
import sys, time
from primekd.experiment import tune as t
store, student, out = sys.argv[1:]
config = t.TuneConfig(store, student, out, trials=2, max_steps=2, eval_steps=1, val_size=3,
                      heartbeat=1, objective="val_accuracy")
storage = t.open_storage(config.storage_url, config.heartbeat)
study = t.create_study(config, storage)
study.optimize(lambda trial: (config.space.sample(trial), time.sleep(600)), n_trials=1)
"""


def _wait_for_running_trial(db: Path, timeout: float = 60) -> None:
    from optuna.trial import TrialState

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            try:
                # Sampled parameters mean the trial's heartbeat thread is already beating;
                # wait for all of them, or the retry's parameters cannot match (a race).
                names = {p.name for p in default_search_space().params}
                running = _study(db).get_trials(states=(TrialState.RUNNING,))
                if any(set(t.params) == names for t in running):
                    return
            except Exception:  # noqa: BLE001 - the study may not exist yet
                pass
        time.sleep(0.2)
    raise AssertionError("the doomed worker never started its trial")
