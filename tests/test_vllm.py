"""The vllm engine against a real vLLM server (CPU build, `make vllm`) on the bundled model.

One session server (conftest `vllm_url`, float32) serves most tests through `--base-url`;
the adapter test lets primekd start (and lose, and restart) its own server. Requests are
few and short: the point is agreement with the hf engine and the failure paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from primekd.core.data import load_examples
from primekd.core.io import read_jsonl
from primekd.core.models import BUNDLED_ALIAS
from primekd.engines import EngineSpec, SamplingParams, collect, encode_chats, get_engine
from primekd.engines.hf import HFEngine
from primekd.engines.vllm_server import group_members
from primekd.evaluate.evaluator import EvalConfig, evaluate
from primekd.evaluate.prompts import load_template
from primekd.teach import store

pytestmark = [pytest.mark.vllm, pytest.mark.integration, pytest.mark.slow,
              pytest.mark.usefixtures("vllm_scratch")]
CLI = [sys.executable, "-c", "from primekd.cli import main; main()"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _cli_scratch(vllm_scratch: Path) -> None:
    """Servers started by the CLIs below keep their scratch directories in the session's
    checked temp folder too."""
    ENV["TMPDIR"] = str(vllm_scratch)


def _prompts(tokenizer, n: int, split: str = "train") -> list[list[int]]:
    template = load_template()
    return encode_chats(tokenizer, [template.build(e.question)
                                    for e in load_examples(split, limit=n)])


def test_generation_and_scoring_agree_with_hf(vllm_url, bundled) -> None:
    hf = HFEngine(*bundled, batch_size=8)
    vllm = get_engine(BUNDLED_ALIAS, EngineSpec("vllm", vllm_url))
    try:
        prompts = _prompts(hf.tokenizer, 8)
        sampling = SamplingParams(max_new_tokens=40, logprobs=5)
        ours = collect(vllm.generate(prompts, sampling), 8)
        theirs = collect(hf.generate(prompts, sampling), 8)
        same = sum(a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=True))
        assert same >= 7, f"only {same}/8 greedy answers equal"
        for a, b in zip(ours, theirs, strict=True):
            assert a.finish_reason == b.finish_reason or a.token_ids != b.token_ids
            n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False))
                      if x != y), min(a.n_tokens, b.n_tokens))
            # generation log-probs are the raw T=1 log-softmax, as hf's teacher forcing
            np.testing.assert_array_equal(a.topk.ids[:n, 0], b.topk.ids[:n, 0])
            np.testing.assert_allclose(a.topk.logprobs[:n], b.topk.logprobs[:n], atol=2e-3)
        references = [hf.tokenizer(e.answer, add_special_tokens=False)["input_ids"]
                      for e in load_examples("train", limit=8)]
        scored = collect(vllm.score(prompts, references, 20), 8)
        expected = collect(hf.score(prompts, references, 20), 8)
        top1 = np.concatenate([a.ids[:, 0] == b.ids[:, 0]
                               for a, b in zip(scored, expected, strict=True)])
        assert top1.mean() >= 0.99
        for a, b in zip(scored, expected, strict=True):
            assert a.ids.shape == b.ids.shape == (len(a.ids), 20)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-3)
    finally:
        vllm.close()


def test_seeded_sampling_of_a_batch_longer_than_one_step(vllm_url, bundled) -> None:
    """More prompt tokens than one engine step takes (2,048 on CPU), sampled at T=1 with a
    seed: with chunked prefill vLLM's CPU worker died on this ("CPU Generator does not use
    offset"); primekd's server prefills whole prompts. The seed makes answers repeatable."""
    vllm = get_engine(BUNDLED_ALIAS, EngineSpec("vllm", vllm_url))
    try:
        prompts = _prompts(bundled[1], 24)
        assert sum(map(len, prompts)) > 2048
        sampling = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
        first = collect(vllm.generate(prompts, sampling), 24)
        again = collect(vllm.generate(prompts, sampling), 24)
    finally:
        vllm.close()
    assert all(a.n_tokens >= 1 for a in first)
    assert [a.token_ids for a in first] == [b.token_ids for b in again]


def test_teach_writes_a_valid_store_through_vllm(vllm_url, tmp_path) -> None:
    out = tmp_path / "store"
    result = subprocess.run(
        [*CLI, "teach", "--teacher", BUNDLED_ALIAS, "--strategy", "ground_truth", "--limit", "6",
         "--max-new-tokens", "40", "--batch-size", "4", "--engine", "vllm", "--base-url",
         vllm_url, "--out", str(out), "--json"], env=ENV, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = store.validate_store(out)
    assert manifest["complete"] and manifest["counts"]["rows"] == 6
    assert manifest["params"]["engine"] == "vllm" and len(store.part_files(out)) == 2
    for row in store.load_store(out).to_pylist():
        ids, logprobs = np.array(row["topk_ids"]), np.array(row["topk_logprobs"])
        assert ids.shape == (len(row["token_ids"]), 20)
        clear = logprobs[:, 0] - logprobs[:, 1] > 1e-3
        assert (ids[clear, 0] == np.array(row["token_ids"])[clear]).all()  # greedy
        assert (np.diff(logprobs, axis=1) <= 0).all() and (np.exp(logprobs).sum(1) <= 1.001).all()


def test_eval_answers_agree_with_hf(vllm_url, bundled, tmp_path) -> None:
    common = {"model": BUNDLED_ALIAS, "limit": 6, "max_new_tokens": 48}
    ours = evaluate(EvalConfig(out=tmp_path / "v", engine="vllm", base_url=vllm_url, **common),
                    progress=False)
    theirs = evaluate(EvalConfig(out=tmp_path / "h", **common), progress=False, loaded=bundled)
    assert ours["engine"] == "vllm" and ours["n"] == theirs["n"] == 6
    a = read_jsonl(tmp_path / "v" / "results.jsonl")
    b = read_jsonl(tmp_path / "h" / "results.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert sum(x["response"] == y["response"] for x, y in zip(a, b, strict=True)) >= 5


def test_base_url_of_another_model_is_refused(vllm_url, tiny_model_dir, tmp_path) -> None:
    result = subprocess.run(
        [*CLI, "eval", "--model", str(tiny_model_dir), "--engine", "vllm", "--base-url",
         vllm_url, "--limit", "2", "--out", str(tmp_path / "o")], env=ENV,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "point --base-url at a server of" in result.stderr  # the served model, or
    assert "Traceback" not in result.stderr  # its tokenizer, is not the model asked for
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_a_server_that_fails_to_start_says_why(vllm_env, tmp_path) -> None:
    result = subprocess.run(
        [*CLI, "eval", "--model", BUNDLED_ALIAS, "--engine", "vllm", "--engine-option",
         "dtype=float7", "--limit", "2", "--out", str(tmp_path / "o")], env=ENV,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "exited with code" in result.stderr and "float7" in result.stderr
    assert "Traceback" not in result.stderr.split("its log")[0]
    log = _kept_log(result.stderr)  # a failed server's log stays for the user to read
    assert "float7" in log.read_text()
    shutil.rmtree(log.parent)


def _kept_log(stderr: str) -> Path:
    match = re.search(r"(/\S*primekd-vllm-[^/\s]+/server\.log)", stderr)
    assert match and Path(match.group(1)).exists(), stderr
    return Path(match.group(1))


def _save_adapter(directory: Path, seed: int = 0, scale: float = 0.05) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from primekd.core.models import resolve

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve(BUNDLED_ALIAS).path)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    model = get_peft_model(base, lora)
    with torch.no_grad():  # small, so answers change but stay language
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)
    model.save_pretrained(directory)
    return directory


def test_one_lora_server_serves_successive_adapters(vllm_env, tmp_path, bundled) -> None:
    """With `lora: true` two adapters are loaded into one server at run time (the same
    process answers both), and each adapter's answers are its own: the log-probs of the hf
    engine with that adapter, not the other's."""
    from primekd.engines.vllm import shutdown

    prompts = _prompts(bundled[1], 3)
    sampling = SamplingParams(max_new_tokens=4, logprobs=5)
    spec = EngineSpec("vllm", None, {"lora": True, "dtype": "float32"})
    answers, pids = [], []
    try:
        for seed in (1, 2):
            adapter = str(_save_adapter(tmp_path / f"adapter-{seed}", seed, scale=0.3))
            vllm = get_engine(BUNDLED_ALIAS, spec, adapter=adapter)
            try:
                pids.append(vllm.server.process.pid)
                ours = collect(vllm.generate(prompts, sampling), 3)
            finally:
                vllm.close()
            theirs = collect(get_engine(BUNDLED_ALIAS, adapter=adapter).generate(
                prompts, sampling), 3)
            answers.append((ours, theirs))
    finally:
        shutdown()
    assert pids[0] == pids[1]
    for ours, theirs in answers:
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a.topk.ids[0], b.topk.ids[0])
            np.testing.assert_allclose(a.topk.logprobs[0], b.topk.logprobs[0], atol=1e-2)
    first = np.stack([a.topk.logprobs[0] for a in answers[0][1]])
    second = np.stack([a.topk.logprobs[0] for a in answers[1][1]])
    assert np.abs(first - second).max() > 0.1  # the two adapters answer differently


def _children(pid: int) -> list[int]:
    from primekd.engines.vllm_server import process_stats

    return [child for child, fields in process_stats() if int(fields[1]) == pid]


def _engine_cores(primekd_pid: int) -> list[int]:
    """The EngineCore processes of the servers that the primekd process `primekd_pid` runs
    (each server in its own process group; vLLM names the process VLLM::EngineCore)."""
    cores = []
    for server in _children(primekd_pid):
        for pid in group_members(server):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().startswith("VLLM::EngineCor"):
                    cores.append(pid)
    return cores


def test_a_killed_engine_is_restarted_and_the_eval_completes(vllm_env, tmp_path,
                                                             bundled) -> None:
    """primekd starts its own server on the merged adapter; its EngineCore is SIGKILLed
    mid-eval: the finished answers stay, the server is restarted once (a warning names the
    dead server's kept log), and the eval completes with every question answered exactly
    once, with the hf engine's answers (with the adapter)."""
    adapter = _save_adapter(tmp_path / "adapter")
    out = tmp_path / "eval"
    command = [*CLI, "eval", "--model", BUNDLED_ALIAS, "--adapter", str(adapter), "--engine",
               "vllm", "--engine-option", "dtype=float32", "--limit", "8",
               "--max-new-tokens", "64", "--out", str(out), "--json",
               # two requests in flight: answers that all run to the token limit would
               # otherwise finish in one decode step, before the engine can be killed
               "--batch-size", "2"]
    results = out / "results.jsonl"
    with (tmp_path / "stderr").open("w") as stderr:
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=stderr,
                                   text=True)
    try:
        deadline = time.monotonic() + 600
        while not results.exists() or not results.read_text():
            assert process.poll() is None, (tmp_path / "stderr").read_text()
            assert time.monotonic() < deadline, "no answer within 600 s"
            time.sleep(0.05)
        cores = _engine_cores(process.pid)
        assert len(cores) == 1, cores
        os.kill(cores[0], signal.SIGKILL)
        written = len(read_jsonl(results))
        stdout, _ = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert process.returncode == 0, stderr
    assert written < 8 and "Restarting it once and resuming" in stderr
    assert "error:" not in stderr and "Traceback" not in stderr.split("its log")[0]
    shutil.rmtree(_kept_log(stderr).parent)
    rows = read_jsonl(results)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 8 and json.loads(stdout)["n"] == 8
    hf = evaluate(EvalConfig(model=BUNDLED_ALIAS, adapter=str(adapter), out=tmp_path / "hf",
                             limit=8, max_new_tokens=64), progress=False)
    expected = {r["id"]: r["response"] for r in read_jsonl(tmp_path / "hf" / "results.jsonl")}
    same = sum(r["response"] == expected[r["id"]] for r in rows)
    assert hf["n"] == 8 and same >= 6, f"{same}/8 answers equal the hf engine's"
