"""Issue 17: nothing of the user's lost, nothing silently wrong, every error one line.

Each test reruns one probe of the issue: data loss in --out, non-finite and mistyped options,
non-UTF-8 and mistyped inputs, over-long prompts, concurrent evals, Ctrl-C and rough edges.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from primekd.core import outdir
from primekd.core.errors import PrimekdError

PRIMEKD = [sys.executable, "-c", "from primekd.cli import main; main()"]
QUESTIONS = [{"question": "What is 1+1?", "answer": "#### 2"},
             {"question": "What is 2+2?", "answer": "#### 4"}]


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*PRIMEKD, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _user_dir(directory: Path, files: dict[str, str]) -> dict[str, bytes]:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return _snapshot(directory)


def _eval_config(model: Path, data: Path, out: Path, **kw):
    from primekd.evaluate.evaluator import EvalConfig

    return EvalConfig(model=str(model), data=str(data), out=out, max_new_tokens=2,
                      batch_size=2, **kw)


# --- 1. data loss ------------------------------------------------------------------------------


def test_eval_refuses_a_directory_of_the_users(tiny_model_dir: Path, tmp_path: Path) -> None:
    from primekd.evaluate.evaluator import evaluate

    data, out = _jsonl(tmp_path / "q.jsonl", QUESTIONS), tmp_path / "out"
    before = _user_dir(out, {"summary.json": "my summary"})
    with pytest.raises(PrimekdError, match="not empty and was not written"):
        evaluate(_eval_config(tiny_model_dir, data, out), progress=False)
    with pytest.raises(PrimekdError, match="would overwrite"):  # --force never overwrites
        evaluate(_eval_config(tiny_model_dir, data, out, force=True), progress=False)
    assert _snapshot(out) == before  # byte-identical, and no .lock or marker left


def test_eval_force_writes_beside_the_users_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    from primekd.evaluate.evaluator import evaluate

    data, out = _jsonl(tmp_path / "q.jsonl", QUESTIONS), tmp_path / "out"
    before = _user_dir(out, {"notes.txt": "mine", "sub/x.txt": "also mine"})
    summary = evaluate(_eval_config(tiny_model_dir, data, out, force=True), progress=False)
    assert summary["n"] == 2
    after = _snapshot(out)
    assert all(after[name] == content for name, content in before.items())
    marker = json.loads((out / outdir.MARKER).read_text())
    assert marker["command"] == "eval" and "results.jsonl" in marker["files"]
    assert set(marker["foreign"]) == {"notes.txt", "sub"}
    # a rerun resumes in its own directory without --force
    assert evaluate(_eval_config(tiny_model_dir, data, out), progress=False)["n"] == 2


def test_distill_refuses_before_loading_anything(tmp_path: Path) -> None:
    from primekd.distill import distill
    from primekd.distill.config import DistillConfig

    out = tmp_path / "student"
    before = _user_dir(out, {"README.md": "my readme"})
    config = DistillConfig(out=str(out), objective="sft", data="train", limit=4, max_steps=1)
    with pytest.raises(PrimekdError, match="not empty"):
        distill(config, progress=False)
    config.force = True
    with pytest.raises(PrimekdError, match="README.md"):
        distill(config, progress=False)
    assert _snapshot(out) == before


def test_run_refuses_a_directory_holding_the_users_files(tmp_path: Path) -> None:
    from primekd.experiment.config import load_config
    from primekd.experiment.runner import run_experiment

    out = tmp_path / "run"
    before = _user_dir(out, {"config.yaml": "mine", "data/test.jsonl": "mine",
                             "report.md": "mine", "teacher/none/mine.txt": "mine"})
    config = load_config(preset="quick")
    with pytest.raises(PrimekdError, match="not empty"):
        run_experiment(config, out, progress=False)
    with pytest.raises(PrimekdError, match="overwrite"):
        run_experiment(config, out, progress=False, force=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "data", "report.md",
                                                     "teacher"]


@pytest.mark.parametrize("stage_name,kind", [("teacher/none", "teacher"),
                                             ("attention", "attention")])
def test_run_clears_only_what_it_wrote(tmp_path: Path, stage_name: str, kind: str) -> None:
    from primekd.experiment.runner import clear_stage_dir
    from primekd.experiment.stages import Stage

    directory = tmp_path / stage_name
    stage = Stage(stage_name, kind, directory, {"v": 1}, run_dir=tmp_path)
    stage.hash = "new"
    before = _user_dir(directory, {"mine.txt": "user's", "x.txt": "user's"})
    assert stage.state() == "changed"  # content without a record
    with pytest.raises(PrimekdError, match="did not write"):
        clear_stage_dir(stage)
    assert _snapshot(directory) == before


def test_stale_stage_loses_its_own_files_only(tmp_path: Path) -> None:
    from primekd.experiment.runner import clear_stage_dir
    from primekd.experiment.stages import Stage

    directory = tmp_path / "eval" / "base"
    directory.mkdir(parents=True)
    (directory / "results.jsonl").write_text("{}\n")
    (directory / "mine.txt").write_text("user's")
    outdir.write_marker(directory, "eval", {"mine.txt"})
    stage = Stage("eval/base", "eval", directory, {}, run_dir=tmp_path)
    with pytest.raises(PrimekdError, match="mine.txt"):
        clear_stage_dir(stage)
    assert sorted(p.name for p in directory.iterdir()) == ["mine.txt"]


def test_out_that_is_a_file_is_refused_before_work(tmp_path: Path) -> None:
    from primekd.analyze.attention import AttentionConfig, analyse

    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(PrimekdError, match="is a file"):
        analyse(AttentionConfig(model="smollm2-135m-instruct", out=out), progress=False)
    assert out.read_text() == "a file"


# --- 2. non-finite and out-of-range options ------------------------------------------------------


@pytest.mark.parametrize("option", [{"temperature": math.nan}, {"temperature": math.inf},
                                    {"batch_size": 0}, {"top_p": math.nan},
                                    {"max_new_tokens": 0}, {"device": "nope"}])
def test_eval_options_checked_before_output(tiny_model_dir: Path, tmp_path: Path,
                                            option: dict) -> None:
    from primekd.evaluate.evaluator import evaluate

    data, out = _jsonl(tmp_path / "q.jsonl", QUESTIONS), tmp_path / "out"
    config = _eval_config(tiny_model_dir, data, out)
    for key, value in option.items():
        setattr(config, key, value)
    with pytest.raises(PrimekdError, match=f"--{next(iter(option)).replace('_', '-')}"):
        evaluate(config, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("option", [{"temperature": math.inf}, {"temperature": math.nan},
                                    {"top_k": 100000}, {"batch_size": 0}])
def test_teach_options_checked_before_output(tiny_model_dir: Path, tmp_path: Path,
                                             option: dict) -> None:
    from primekd.teach.teacher import TeachConfig, teach

    data, out = _jsonl(tmp_path / "q.jsonl", QUESTIONS), tmp_path / "store"
    config = TeachConfig(teacher=str(tiny_model_dir), out=out, data=str(data),
                         max_new_tokens=2, **option)
    with pytest.raises(PrimekdError, match=f"--{next(iter(option)).replace('_', '-')}"):
        teach(config, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("values", [{"temperature": math.inf}, {"lr": math.nan},
                                    {"alpha": "high"}, {"lora_r": True}, {"max_steps": 2.7},
                                    {"batch_size": 0}])
def test_distill_values_of_the_wrong_type_or_not_finite(tmp_path: Path, values: dict) -> None:
    from primekd.distill.config import check_config, config_from_dict

    config = config_from_dict({"out": str(tmp_path / "s"), "objective": "sft", **values})
    with pytest.raises(PrimekdError, match=f"--{next(iter(values)).replace('_', '-')}"):
        check_config(config)


def test_run_checks_every_stage_before_writing(tmp_path: Path) -> None:
    from primekd.experiment.config import load_config
    from primekd.experiment.runner import run_experiment

    out = tmp_path / "run"
    config = load_config(preset="quick", overrides=["eval.batch_size=0"])
    with pytest.raises(PrimekdError, match="batch-size must be at least 1"):
        run_experiment(config, out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("space,match", [
    ({"lora_r": {"choices": [4, "eight"]}}, "lora-r must be an integer"),
    ({"alpha": {"low": 0.1, "high": math.inf}}, "finite"),
])
def test_tune_spaces_of_the_wrong_type(space: dict, match: str) -> None:
    from primekd.experiment.search_space import parse_search_space

    with pytest.raises(PrimekdError, match=match):
        parse_search_space(space)


def test_json_files_never_hold_bare_nan(tmp_path: Path) -> None:
    from primekd.core.io import append_jsonl, write_json

    write_json(tmp_path / "a.json", {"loss": math.nan, "x": [math.inf, 1.0]})
    append_jsonl(tmp_path / "b.jsonl", [{"loss": -math.inf}])
    strict = {"parse_constant": lambda c: pytest.fail(f"bare {c} in JSON")}
    assert json.loads((tmp_path / "a.json").read_text(), **strict) == {"loss": None,
                                                                        "x": [None, 1.0]}
    assert json.loads((tmp_path / "b.jsonl").read_text(), **strict) == {"loss": None}


# --- error classes: encodings, types, prompts --------------------------------------------------


def _latin1(path: Path) -> Path:
    path.write_bytes('{"question": "caf\xe9", "answer": "#### 1", "response": "1"}\n'
                     .encode("latin-1"))
    return path


def test_non_utf8_inputs_are_one_line_with_the_offset(tmp_path: Path) -> None:
    from primekd.analyze.compare import load_results
    from primekd.core.data import load_examples
    from primekd.core.grading import grade_file
    from primekd.core.io import read_yaml
    from primekd.evaluate.prompts import load_template

    bad = _latin1(tmp_path / "bad.jsonl")
    readers = [lambda: grade_file(bad), lambda: load_results(bad),
               lambda: load_examples(str(bad)), lambda: read_yaml(bad, "config file")]
    for read in readers:
        with pytest.raises(PrimekdError, match=r"not UTF-8 text: byte 0xe9 at offset 17"):
            read()
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"Q: {question} \xff")
    with pytest.raises(PrimekdError, match="offset 14"):
        load_template(str(prompt))


def test_cli_non_utf8_is_exit_2(tmp_path: Path) -> None:
    result = _cli("grade", str(_latin1(tmp_path / "bad.jsonl")))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "offset 17" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("row,match", [
    ({"answer": [3, 2], "response": "3"}, "`answer` must be a string or a number"),
    ({"answer": "3", "response": {"text": "5"}}, "`response` must be a string"),
    ({"question": 42, "answer": "3", "response": "3"}, "`question` must be a string"),
])
def test_grade_refuses_wrong_types_with_the_line(tmp_path: Path, row: dict, match: str) -> None:
    from primekd.core.grading import grade_file

    path = _jsonl(tmp_path / "r.jsonl", [{"answer": "1", "response": "1"}, row])
    with pytest.raises(PrimekdError, match=rf"r.jsonl:2: {match}"):
        grade_file(path)


def test_data_refuses_numbers_as_questions_and_answers_without_one(tmp_path: Path) -> None:
    from primekd.core.data import load_examples

    with pytest.raises(PrimekdError, match="`question` must be a string"):
        load_examples(str(_jsonl(tmp_path / "a.jsonl", [{"question": 42, "answer": "3"}])))
    with pytest.raises(PrimekdError, match="holds no number"):
        load_examples(str(_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "two"}])))
    with pytest.raises(PrimekdError, match="--sample 100 is more than the 1 questions"):
        load_examples(str(_jsonl(tmp_path / "c.jsonl", [{"question": "q", "answer": "2"}])),
                      sample=100)


def test_compare_refuses_numeric_questions(tmp_path: Path) -> None:
    from primekd.analyze.compare import load_results

    path = _jsonl(tmp_path / "r.jsonl", [{"id": "1", "question": 7, "correct": True}])
    with pytest.raises(PrimekdError, match="r.jsonl:1: `question` must be a string"):
        load_results(path)


def test_over_long_prompt_refused_with_lengths(tiny_model_dir: Path, tmp_path: Path) -> None:
    from primekd.evaluate.evaluator import evaluate

    long = {"question": " ".join(["apples"] * 20000) + "?", "answer": "#### 1"}
    data, out = _jsonl(tmp_path / "q.jsonl", [QUESTIONS[0], long]), tmp_path / "out"
    started = time.perf_counter()
    with pytest.raises(PrimekdError, match=r"question 2 is \d+ tokens.*context of 1024"):
        evaluate(_eval_config(tiny_model_dir, data, out), progress=False)
    assert time.perf_counter() - started < 60 and not out.exists()
    with pytest.raises(PrimekdError, match="--few-shot 100000 asks for more"):
        evaluate(_eval_config(tiny_model_dir, data, out, few_shot=100000), progress=False)


# --- concurrency, Ctrl-C, rough edges ----------------------------------------------------------


def test_second_eval_on_one_out_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    data, out = _jsonl(tmp_path / "q.jsonl", QUESTIONS), tmp_path / "out"
    with outdir.claimed(out, "eval"):  # a first eval, holding its directory
        result = _cli("eval", "-m", str(tiny_model_dir), "--data", str(data), "--out",
                      str(out), "--max-new-tokens", "2")
    assert result.returncode == 2, result.stderr
    assert "being written by another `primekd eval` process" in result.stderr
    assert not (out / "results.jsonl").exists() and not (out / ".lock").exists()


def test_sigint_prints_the_rerun_hint(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*PRIMEKD, "eval", "-m", str(tiny_model_dir), "--data", "train", "--limit", "3000",
         "--out", str(out), "--max-new-tokens", "32", "-b", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # a shell's background job starts with SIGINT ignored, and Python keeps it so
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "results.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr


def test_version_help_text_and_model_file_messages(tmp_path: Path) -> None:
    from primekd import __version__

    assert _cli("--version").stdout.strip() == f"primekd {__version__}"
    assert '"ci95": [lo, hi]' in " ".join(_cli("grade", "--help").stdout.split())
    data = _jsonl(tmp_path / "q.jsonl", QUESTIONS)
    result = _cli("eval", "-m", str(data), "--data", str(data), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "is a file, not a model" in result.stderr
    started = time.perf_counter()
    result = _cli("eval", "-m", "nobody/nothing", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "HF_HUB_OFFLINE" in result.stderr
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "o").exists()


# --- property tests for the readers ------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)
_rows = st.fixed_dictionaries({}, optional={
    "id": _json, "question": _json, "answer": _json, "reference": _json,
    "response": _json, "correct": _json, "extracted": _json, "gold": _json})


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_rows, min_size=1, max_size=3))
def test_readers_never_raise_anything_but_one_line(tmp_path: Path, rows: list) -> None:
    from primekd.analyze.compare import load_results
    from primekd.core.data import load_examples
    from primekd.core.grading import grade_file

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for read in (lambda: grade_file(path), lambda: load_results(path),
                 lambda: load_examples(str(path))):
        try:
            read()
        except PrimekdError as e:
            assert "\n" not in str(e)


def test_jsonl_rows_with_unicode_line_separators_round_trip(tmp_path: Path) -> None:
    """A random model's answer held U+2028; str.splitlines() split the row there and the
    reader refused its own file ("results.jsonl:2388 is not valid JSON")."""
    from primekd.core.io import append_jsonl, read_jsonl

    rows = [{"id": "a", "response": "x\u2028y\x85z\x1cw"}, {"id": "b", "response": "ok"}]
    path = tmp_path / "r.jsonl"
    append_jsonl(path, rows)
    assert read_jsonl(path) == rows
