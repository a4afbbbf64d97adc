"""`primekd distill --on-policy --engine vllm` on the bundled model (issue 15's vllm tests).

ONE run serves every test here (it is the expensive part: each round starts a server for the
merged student and one for the teacher): the CLI is SIGKILLed inside round 1 (the second
round), rerun with `--resume`, and the vLLM servers it started are watched throughout. The
rows are then checked against the session server (conftest `vllm_url`, the bundled model in
float32, as the run serves it): round 0's rollouts are the base model's greedy answers to the
bare prompt, round 1's those of round 0's checkpoint, and the stored teacher top-k is the
base model's scoring after the primed (ground-truth) prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from primekd.core.chat import encode_prompts
from primekd.core.data import load_examples
from primekd.core.models import BUNDLED_ALIAS
from primekd.teach import store

pytestmark = [pytest.mark.vllm, pytest.mark.integration, pytest.mark.slow]
CLI = [sys.executable, "-c", "from primekd.cli import main; main()"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
N, TOKENS, TOP_K = 4, 48, 20


def _args(out: Path) -> list[str]:
    # --limit N with --round-size N: round 1 answers round 0's questions (with a moved student)
    return [*CLI, "distill", "--on-policy", "--student", BUNDLED_ALIAS, "--strategy",
            "ground_truth", "--rounds", "2", "--round-size", str(N), "--limit", str(N),
            "--batch-size", "2", "--rollout-max-new-tokens", str(TOKENS),
            "--rollout-temperature", "0", "--top-k", str(TOP_K), "--lr", "5e-3",
            "--engine", "vllm", "--engine-option", "dtype=float32", "--device", "cpu",
            "--quiet", "--json", "--out", str(out)]


def _procs() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, process group, state) of every process."""
    from primekd.engines.vllm_server import process_stats

    return [(pid, int(f[1]), int(f[2]), f[0]) for pid, f in process_stats()]


def _server_groups(pid: int) -> set[int]:
    """Process groups of the servers `pid` started (each leads its own group)."""
    return {p for p, ppid, group, _ in _procs() if ppid == pid and group == p}


def _alive(groups: set[int]) -> list[int]:
    return [p for p, _, group, state in _procs() if group in groups and state != "Z"]


def _watch(process: subprocess.Popen, groups: set[int], until, timeout: float) -> None:
    """Poll until `until()` or the process ends, noting every server group it starts."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and not until():
        groups |= _server_groups(process.pid)
        assert time.monotonic() < deadline, f"nothing after {timeout:.0f} s"
        time.sleep(0.05)


def _wait_gone(groups: set[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while _alive(groups) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _alive(groups)


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _rows(directory: Path) -> list[dict]:
    return sorted(store.load_store(directory).to_pylist(), key=lambda r: (r["id"], r["sample"]))


@pytest.fixture(scope="module")
def run(vllm_env: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("onpolicy-vllm") / "run"
    killed: set[int] = set()
    process = subprocess.Popen(_args(out), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    rollout = out / "rounds" / "round-001" / "rollout.jsonl"
    try:  # killed once round 1's student has answered (its server, or the teacher's, is up)
        _watch(process, killed, lambda: rollout.exists() and rollout.stat().st_size > 0, 900)
        assert process.poll() is None, process.stderr.read()[-3000:]
        killed |= _server_groups(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stray_after_kill = _wait_gone(killed, 120)
    state = json.loads((out / "rounds.json").read_text())
    round0 = _snapshot(out / "rounds" / "round-000")

    resumed: set[int] = set()
    again = subprocess.Popen([*_args(out), "--resume"], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _watch(again, resumed, lambda: False, 900)
        stdout, stderr = again.communicate()
    finally:
        if again.poll() is None:
            again.kill()
            again.wait()
    return {"out": out, "killed_servers": killed, "stray_after_kill": stray_after_kill,
            "rounds_at_kill": state["rounds"], "round0": round0, "resumed_servers": resumed,
            "stray_after_resume": _alive(resumed), "returncode": again.returncode,
            "stdout": stdout, "stderr": stderr}


def test_kill_in_round_two_resumes_with_round_one_untouched(run) -> None:
    out = run["out"]
    assert [r["round"] for r in run["rounds_at_kill"]] == [0]  # killed in the second round
    assert run["returncode"] == 0, run["stderr"][-3000:]
    summary = json.loads(run["stdout"])
    assert [r["round"] for r in summary["on_policy"]["rounds"]] == [0, 1]
    assert summary["on_policy"]["engine"] == "vllm" and summary["steps"] == 4
    assert _snapshot(out / "rounds" / "round-000") == run["round0"]
    for r in range(2):
        directory = out / "rounds" / f"round-{r:03d}"
        manifest = store.validate_store(directory)
        assert manifest["complete"] and manifest["target"] == "student"
        keys = [(x["id"], x["sample"]) for x in _rows(directory)]
        assert len(keys) == len(set(keys)) == N
        lines = (directory / "rollout.jsonl").read_text().splitlines()
        assert len(lines) == N  # no rollout redone or duplicated
    assert (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_vllm_servers_are_stopped_on_exit_and_after_a_kill(run) -> None:
    """The killed run had a server up; none of its servers outlives it (they die with their
    parent), and the resumed run, which starts a student and a teacher server for round 1,
    leaves none behind."""
    assert run["killed_servers"], "the killed run started no server"
    assert not run["stray_after_kill"], f"server processes left after SIGKILL: " \
                                        f"{run['stray_after_kill']}"
    assert len(run["resumed_servers"]) >= 2
    assert not run["stray_after_resume"], run["stray_after_resume"]


def _student_prompts(questions: list[str]) -> list[list[int]]:
    from primekd.core.models import load_tokenizer, resolve
    from primekd.distill.data import student_prompts

    tokenizer = load_tokenizer(resolve(BUNDLED_ALIAS), padding_side="right")
    return student_prompts(tokenizer, questions, None)


def test_training_tokens_are_the_students_own_greedy_answers(run, vllm_url, bundled) -> None:
    """Round 0's rows are the base model's greedy answers to the bare prompt through the
    engine (LoRA starts at zero), not the references nor the primed teacher's answers; round
    1's are the answers of round 0's checkpoint; the training sequences are prompt + those."""
    from primekd.core.models import load, load_tokenizer, resolve
    from primekd.distill.config import DistillConfig
    from primekd.distill.data import build_datasets
    from primekd.engines import EngineSpec, SamplingParams, collect, get_engine
    from primekd.engines.hf import HFEngine

    out = run["out"]
    first, second = (_rows(out / "rounds" / f"round-00{r}") for r in (0, 1))
    assert [r["id"] for r in first] == [r["id"] for r in second]
    prompts = _student_prompts([r["question"] for r in first])
    tokenizer = bundled[1]
    engine = get_engine(BUNDLED_ALIAS, EngineSpec("vllm", vllm_url))
    try:
        student = collect(engine.generate(prompts, SamplingParams(TOKENS)), N)
        teacher_prompts = encode_prompts(tokenizer, [r["teacher_prompt"] for r in first])
        primed = collect(engine.generate(teacher_prompts, SamplingParams(TOKENS)), N)
    finally:
        engine.close()
    own = sum(r["token_ids"] == g.token_ids for r, g in zip(first, student, strict=True))
    assert own == N, f"only {own}/{N} rollouts are the student's greedy answers"
    assert sum(r["response"] == g.text for r, g in zip(first, student, strict=True)) == N
    assert not any(r["token_ids"] == g.token_ids for r, g in zip(first, primed, strict=True))
    for row in first:
        reference = tokenizer(row["reference"], add_special_tokens=False)["input_ids"]
        assert row["token_ids"][:8] != reference[:8]

    checkpoint = json.loads((out / "rounds.json").read_text())["rounds"][0]["checkpoint"]
    model, tok = load(BUNDLED_ALIAS, adapter=checkpoint, device="cpu")
    moved = collect(HFEngine(model.eval(), tok).generate(prompts, SamplingParams(TOKENS)), N)
    same = sum(r["token_ids"] == g.token_ids for r, g in zip(second, moved, strict=True))
    assert same >= N - 1, f"{same}/{N} round-1 rollouts are round 0's checkpoint's answers"
    assert [r["token_ids"] for r in first] != [r["token_ids"] for r in second]

    train_tok = load_tokenizer(resolve(BUNDLED_ALIAS), padding_side="right")
    config = DistillConfig(student=BUNDLED_ALIAS, out=str(out / "x"),
                           teacher_store=str(out / "rounds" / "round-001"))
    items = {i.id: i for i in build_datasets(config, train_tok).train}
    for row, prompt in zip(second, prompts, strict=True):
        assert items[row["id"]].input_ids.tolist() == prompt + row["token_ids"]


def test_teacher_scores_come_from_the_primed_prompt(run, vllm_url, bundled) -> None:
    """The teacher prompt of every row holds the ground truth, the student's does not, and
    the stored top-k is the base model's scoring of the student's tokens after it."""
    from primekd.engines import EngineSpec, collect, get_engine
    from primekd.teach.teacher import answer_text

    rows = _rows(run["out"] / "rounds" / "round-000")
    examples = {e.id: e for e in load_examples("train", limit=N)}
    tokenizer = bundled[1]
    bare = _student_prompts([r["question"] for r in rows])
    for row, prompt in zip(rows, bare, strict=True):
        truth = f"The correct final answer is {answer_text(examples[row['id']])}"
        assert truth in row["teacher_prompt"]
        assert "correct final answer" not in tokenizer.decode(prompt)
    primed = encode_prompts(tokenizer, [r["teacher_prompt"] for r in rows])
    answers = [r["token_ids"] for r in rows]
    engine = get_engine(BUNDLED_ALIAS, EngineSpec("vllm", vllm_url))
    try:
        expected = collect(engine.score(primed, answers, TOP_K), N)
        unprimed = collect(engine.score(bare, answers, TOP_K), N)
    finally:
        engine.close()
    for row, want, other in zip(rows, expected, unprimed, strict=True):
        ids, logprobs = np.array(row["topk_ids"]), np.array(row["topk_logprobs"])
        assert ids.shape == want.ids.shape == (len(row["token_ids"]), TOP_K)
        assert (ids[:, 0] == want.ids[:, 0]).mean() >= 0.98
        np.testing.assert_allclose(logprobs, want.logprobs, atol=2e-3)
        assert np.abs(logprobs - other.logprobs).max() > 0.1  # not the student's view
