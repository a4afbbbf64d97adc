from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from primekd.core.chat import encode_prompts
from primekd.core.errors import PrimekdError
from primekd.core.models import load
from primekd.teach import store
from primekd.teach.teacher import TeachConfig, teach

CLI = [sys.executable, "-c", "from primekd.cli import main; main()"]


def _teach(model_dir: Path, out: Path, **overrides) -> dict:
    options = {"limit": 3, "max_new_tokens": 12, "batch_size": 2, **overrides}
    return teach(TeachConfig(teacher=str(model_dir), out=out, **options), progress=False)



@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(str(tiny_model_dir))


def _full_logprobs(model, tokenizer, row: dict) -> torch.Tensor:
    """A direct, unbatched forward pass: log_softmax at the positions predicting each answer
    token (the logit at position p predicts token p + 1)."""
    prompt = encode_prompts(tokenizer, [row["teacher_prompt"]])[0]
    ids = torch.tensor([prompt + row["token_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    start = len(prompt) - 1
    return logits[start:start + len(row["token_ids"])].log_softmax(-1)


def _check_alignment(table, tiny, top_k: int) -> None:
    model, tokenizer = tiny
    for row in table.to_pylist():
        full = _full_logprobs(model, tokenizer, row)
        ids = torch.tensor(row["topk_ids"], dtype=torch.long)
        stored = torch.tensor(row["topk_logprobs"])
        assert ids.shape == (len(row["token_ids"]), top_k)
        # the stored values are the full-vocabulary log-softmax at the stored ids ...
        torch.testing.assert_close(stored, full.gather(1, ids), atol=1e-4, rtol=0)
        # ... and they are the top k of it, in order
        torch.testing.assert_close(stored, full.topk(top_k, dim=-1).values, atol=1e-4, rtol=0)
        # the mass outside the top k is recoverable and lies in [0, 1]
        rest = 1 - stored.exp().sum(-1)
        assert ((rest >= -1e-5) & (rest <= 1)).all()
        outside = full.exp().sum(-1) - full.exp().gather(1, ids).sum(-1)
        torch.testing.assert_close(rest, outside, atol=1e-4, rtol=0)


def test_generated_target_is_aligned_with_a_direct_forward_pass(tmp_path, tiny_model_dir,
                                                                tiny) -> None:
    manifest = _teach(tiny_model_dir, tmp_path / "s", top_k=5, strategy="teacher")
    table = store.load_store(tmp_path / "s")
    _check_alignment(table, tiny, top_k=5)
    for row in table.to_pylist():
        # greedy decoding picked the top-1 token at every step (up to float ties)
        top1 = np.array(row["topk_logprobs"])[:, 0]
        chosen = [dict(zip(ids, lps, strict=True)).get(tok, -np.inf) for ids, lps, tok in
                  zip(row["topk_ids"], row["topk_logprobs"], row["token_ids"], strict=True)]
        np.testing.assert_allclose(chosen, top1, atol=1e-4)
        clear = top1 - np.array(row["topk_logprobs"])[:, 1] > 1e-3
        assert (np.array(row["topk_ids"])[clear, 0] == np.array(row["token_ids"])[clear]).all()
        assert row["response"] == tiny[1].decode(row["token_ids"], skip_special_tokens=True)
    assert manifest["complete"] and manifest["counts"]["rows"] == 3


def test_reference_target_scores_the_reference_solution(tmp_path, tiny_model_dir,
                                                        tiny) -> None:
    manifest = _teach(tiny_model_dir, tmp_path / "s", target="reference", top_k=4,
                      strategy="ground_truth")
    table = store.load_store(tmp_path / "s")
    _check_alignment(table, tiny, top_k=4)
    _, tokenizer = tiny
    for row in table.to_pylist():
        assert row["token_ids"][-1] == tokenizer.eos_token_id
        assert row["finish_reason"] == "reference"
        assert "<<" not in row["response"]
        assert row["response"].endswith(row["reference"].rsplit("####", 1)[-1].strip())
        assert row["correct"]
    assert manifest["teacher_accuracy"] is None
    assert manifest["generation"]["temperature"] is None


def test_store_keeps_the_bare_question_and_the_primed_prompt(tmp_path,
                                                             tiny_model_dir) -> None:
    strategies = tmp_path / "s.yaml"
    strategies.write_text("strategies:\n  primed:\n    system: Be brief.\n"
                          "    user: 'Answer is {{ answer }}. {{ question }}'\n"
                          "    prefill: 'Step 1:'\n")
    manifest = _teach(tiny_model_dir, tmp_path / "s", strategy="primed",
                      strategies_file=strategies)
    row = store.load_store(tmp_path / "s").to_pylist()[0]
    assert row["question"].startswith("Natalia sold clips") and "Answer is" not in row["question"]
    assert f"Answer is 72. {row['question']}" in row["teacher_prompt"]
    assert "Be brief." in row["teacher_prompt"]
    assert row["teacher_prompt"].endswith("<|im_start|>assistant\nStep 1:")
    assert not row["response"].startswith("Step 1:")
    assert manifest["strategy"] == {"name": "primed", "description": "", "system": "Be brief.",
                                    "user": "Answer is {{ answer }}. {{ question }}",
                                    "prefill": "Step 1:"}


def test_keep_correct_drops_rows_but_counts_them(tmp_path, tiny_model_dir) -> None:
    manifest = _teach(tiny_model_dir, tmp_path / "s", keep="correct")
    counts = manifest["counts"]
    assert counts["rows"] == 3 and counts["kept"] == counts["correct"] == 0
    assert manifest["teacher_accuracy"] == 0.0 and manifest["complete"]
    assert store.load_store(tmp_path / "s").num_rows == 0
    again = _teach(tiny_model_dir, tmp_path / "s", keep="correct")  # nothing left to do
    assert again["counts"] == counts


def test_samples_shards_and_datasets(tmp_path, tiny_model_dir) -> None:
    from datasets import load_dataset

    options = {"limit": 5, "samples_per_question": 2, "temperature": 1.0, "max_new_tokens": 6}
    for i in range(2):
        _teach(tiny_model_dir, tmp_path / f"s{i}", shard=f"{i}/2", **options)
    table = store.load_store([tmp_path / "s0", tmp_path / "s1"])
    keys = sorted(zip(table["id"].to_pylist(), table["sample"].to_pylist(), strict=True))
    assert keys == [(f"train-{q:05d}", s) for q in range(5) for s in range(2)]
    alone = store.load_store(tmp_path / "s0", require_complete=False)  # one shard, on purpose
    assert sorted(alone["id"].unique().to_pylist()) == [
        "train-00000", "train-00002", "train-00004"]
    files = [str(p) for d in ("s0", "s1") for p in store.part_files(tmp_path / d)]
    dataset = load_dataset("parquet", data_files=files, split="train",
                           cache_dir=str(tmp_path / "hf-cache"))
    assert len(dataset) == 10 and len(dataset[0]["topk_ids"][0]) == 20


def test_a_part_is_written_when_the_interval_passes(tmp_path, tiny_model_dir,
                                                    monkeypatch) -> None:
    """Answers that finish after PART_INTERVAL_S are saved then, not when batch_size of
    them have finished: a killed vLLM teacher with many answers in flight loses at most that
    much. The rows are the same as one part's."""
    from primekd.teach import teacher

    whole = _teach(tiny_model_dir, tmp_path / "whole", limit=4, batch_size=8)
    monkeypatch.setattr(teacher, "PART_INTERVAL_S", 0.0)
    timed = _teach(tiny_model_dir, tmp_path / "timed", limit=4, batch_size=8)
    assert len(store.part_files(tmp_path / "whole")) == 1
    assert len(store.part_files(tmp_path / "timed")) == 4
    assert timed["complete"] and timed["counts"] == whole["counts"]
    columns = ["id", "token_ids", "topk_ids"]

    def rows(name: str) -> list[dict]:  # parts hold answers in the order they finished
        table = store.load_store(tmp_path / name, columns=columns).to_pylist()
        return sorted(table, key=lambda row: row["id"])

    assert rows("timed") == rows("whole")


def test_changed_parameters_are_refused(tmp_path, tiny_model_dir) -> None:
    _teach(tiny_model_dir, tmp_path / "s", limit=2)
    with pytest.raises(PrimekdError, match=r"different parameters \(top_k: 20 -> 5\)"):
        _teach(tiny_model_dir, tmp_path / "s", limit=2, top_k=5)
    with pytest.raises(PrimekdError, match=r"strategy.name: \"none\" -> \"teacher\""):
        _teach(tiny_model_dir, tmp_path / "s", limit=2, strategy="teacher")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PrimekdError, match="not empty and was not written by `primekd teach`"):
        _teach(tiny_model_dir, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"target": "logits"}, "--target"),
        ({"samples_per_question": 2}, "--temperature above 0"),
        ({"target": "reference", "samples_per_question": 2, "temperature": 1.0}, "one reference"),
        ({"shard": "2/2"}, "--shard '2/2'"),
        ({"shard": "x"}, "--shard"),
        ({"keep": "best"}, "--keep"),
    ],
)
def test_bad_configs_are_clear_errors(tmp_path, tiny_model_dir, overrides, message) -> None:
    with pytest.raises(PrimekdError, match=message):
        _teach(tiny_model_dir, tmp_path / "s", **overrides)


def test_vllm_engine_without_vllm_is_a_clear_error(tmp_path, tiny_model_dir) -> None:
    with pytest.raises(PrimekdError, match="python /nonexistent/python does not exist"):
        _teach(tiny_model_dir, tmp_path / "s", engine="vllm",
               engine_options={"python": "/nonexistent/python"})


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(tmp_path, tiny_model_dir) -> None:
    out = tmp_path / "store"
    command = [*CLI, "teach", "--teacher", str(tiny_model_dir), "--strategy", "confidence",
               "--limit", "12", "--batch-size", "2", "--max-new-tokens", "32", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "part-00000.parquet").exists():
            assert process.poll() is None, "teach exited before writing its first part"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    written = len(store.part_files(out))
    assert 1 <= written < 6, "the run should have been killed mid-way"
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    result = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["complete"] and manifest["counts"]["rows"] == 12
    table = store.load_store(out)
    keys = list(zip(table["id"].to_pylist(), table["sample"].to_pylist(), strict=True))
    assert sorted(keys) == [(f"train-{q:05d}", 0) for q in range(12)]
    store.validate_store(out)


def test_cli_lists_strategies_and_reports_errors(monkeypatch, capsys) -> None:
    from primekd.cli import main

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["primekd", "teach", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        return exit_.value.code

    assert run("--list-strategies", "--json") == 0
    names = [s["name"] for s in json.loads(capsys.readouterr().out)]
    assert {"none", "teacher", "ground_truth", "confidence", "student_friendly"} <= set(names)
    assert run("--strategy", "none") == 2
    assert "--teacher and --out" in capsys.readouterr().err


@pytest.mark.integration
def test_bundled_teacher_writes_a_valid_store(tmp_path) -> None:
    from typer.testing import CliRunner

    from primekd.cli import app

    out = tmp_path / "store"
    result = CliRunner().invoke(app, ["teach", "--teacher", "smollm2-135m-instruct",
                                      "--strategy", "ground_truth", "--limit", "4",
                                      "--max-new-tokens", "48", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    manifest = store.validate_store(out)
    assert manifest["complete"] and manifest["counts"]["rows"] == 4
    assert manifest["tokenizer_fingerprint"] and manifest["strategy"]["name"] == "ground_truth"
    table = store.load_store(out)
    assert all(max(max(ids) for ids in row) < 49152 for row in table["topk_ids"].to_pylist())
    assert all(row["response"].strip() for row in table.to_pylist())


def test_vllm_logprobs_become_top_k_arrays() -> None:
    from primekd.engines.vllm import topk_arrays

    # vLLM's two JSON shapes: prompt_logprobs {"id": {"logprob", "rank"}} with the scored
    # token added when it fell outside the top k; top_logprobs {"token_id:id": logprob}
    positions = [
        {"9": {"logprob": -6.0, "rank": 40}, "5": {"logprob": -0.5, "rank": 1},
         "7": {"logprob": -1.5, "rank": 2}},
        {"token_id:3": -2.0, "token_id:1": -0.2},
    ]
    topk = topk_arrays(positions, k=2)
    assert topk.ids.tolist() == [[5, 7], [1, 3]]
    np.testing.assert_allclose(topk.logprobs, [[-0.5, -1.5], [-0.2, -2.0]])
    assert topk.ids.dtype == np.int32 and topk.logprobs.dtype == np.float32
    with pytest.raises(PrimekdError, match="max-logprobs"):
        topk_arrays(positions, k=3)


def test_store_grades_with_the_truncation_rule_and_counts_it(tmp_path, tiny_model_dir) -> None:
    """The `correct` column follows the default rule; how each answer was found, strict and
    flexible grades, and truncation are stored and counted in the manifest."""
    strategies = tmp_path / "s.yaml"
    strategies.write_text("strategies:\n  stated:\n    user: '{{ question }}'\n"
                          "    prefill: 'The answer is {{ answer }}.'\n")
    manifest = _teach(tiny_model_dir, tmp_path / "s", strategy="stated",
                      strategies_file=strategies)
    rows = store.load_store(tmp_path / "s").to_pylist()
    truncated = sum(r["finish_reason"] == "length" for r in rows)
    for row in rows:
        assert row["truncated"] == (row["finish_reason"] == "length")
        assert row["found_by"] in {"answer_is", "hashes", "boxed", "answer_colon"}
        assert row["correct"] == row["correct_strict"] and row["no_answer"] is None
    assert manifest["truncated"] == truncated
    assert manifest["truncation_rate"] == truncated / len(rows)
    assert manifest["teacher_accuracy_strict"] == sum(r["correct_strict"] for r in rows) / len(
        rows)
    assert manifest["grading"] == "default"
