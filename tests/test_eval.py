from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from primekd.core.errors import PrimekdError
from primekd.core.io import read_json, read_jsonl
from primekd.core.models import load
from primekd.evaluate.evaluator import EvalConfig, claim_directory, evaluate
from primekd.evaluate.prompts import DEFAULT_TEMPLATE, load_template, worked_solution

RESULT_FIELDS = {"id", "question", "reference", "gold", "response", "extracted", "correct",
                 "n_tokens", "finish_reason", "found_by", "no_answer", "truncated",
                 "correct_strict", "correct_flexible"}


# --- prompt templates ------------------------------------------------------------------------


def test_default_template_asks_for_steps_and_answer_line() -> None:
    prompt = load_template().build("How many legs do 3 cats have?")
    question = "How many legs do 3 cats have?"
    assert prompt.user == DEFAULT_TEMPLATE.replace("{{ question }}", question)
    assert "step by step" in prompt.user and "The answer is N" in prompt.user
    assert prompt.user.endswith("How many legs do 3 cats have?")


def test_few_shot_uses_worked_train_solutions() -> None:
    template = load_template(few_shot=2)
    user = template.build("What is 2 + 2?").user
    assert user.count("Question:") == 3  # two examples, then the real question
    assert "Natalia sold clips to 48 of her friends" in user  # GSM8K train row 0
    assert "The answer is 72." in user
    assert "<<" not in user and "####" not in user
    assert user.index("The answer is 72.") < user.index("What is 2 + 2?")
    assert template.stop == ("\nQuestion:",) and load_template().stop == ()


def test_worked_solution_rewrites_gsm8k_reference() -> None:
    text = worked_solution("She has 3 + 4 = <<3+4=7>>7 pens.\n#### 7")
    assert text == "She has 3 + 4 = 7 pens.\nThe answer is 7."


def test_custom_template_from_text_and_file(tmp_path: Path) -> None:
    assert load_template("Q: {{ question }}\nA:").build("1+1?").user == "Q: 1+1?\nA:"
    assert load_template("{{ '{literal}' }} {{question}}").build("x").user == "{literal} x"
    path = tmp_path / "prompt.txt"
    path.write_text("Solve: {{ question }}\nEnd with 'The answer is N'.", encoding="utf-8")
    assert load_template(str(path)).build("3*3?").user.startswith("Solve: 3*3?")


@pytest.mark.parametrize("template, message", [
    ("Q: {{ questoin }}", r"unknown variable\(s\) questoin"),
    ("{{ question }} and {{ answer }}", r"unknown variable\(s\) answer"),
    ("no placeholder at all", r"no \{\{ question \}\} placeholder"),
    ("Q: {{ question", "template error"),
    ("missing.txt", "does not exist"),
    # The str.format spelling (the old --prompt language) is refused with the Jinja one.
    ("Q: {question}", r"^prompt template: \{question\} is str.format syntax; templates are "
                      r"Jinja, write \{\{ question \}\} instead$"),
])
def test_bad_templates_are_clear_errors(template: str, message: str) -> None:
    with pytest.raises(PrimekdError, match=message):
        load_template(template)


# --- evaluation, resumability ----------------------------------------------------------------



@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(str(tiny_model_dir))


def _config(model_dir: Path, out: Path, **overrides) -> EvalConfig:
    settings = dict(model=str(model_dir), out=out, limit=6, batch_size=2, max_new_tokens=8)
    return EvalConfig(**(settings | overrides))


def test_eval_writes_results_and_summary(tiny, tiny_model_dir, tmp_path: Path) -> None:
    summary = evaluate(_config(tiny_model_dir, tmp_path), progress=False, loaded=tiny)
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert [r["id"] for r in rows] == [f"test-{i:05d}" for i in range(6)]
    assert all(set(r) == RESULT_FIELDS for r in rows)
    assert all(r["n_tokens"] == 8 and r["finish_reason"] == "length" for r in rows)
    assert rows[0]["gold"] == 18.0 and rows[0]["reference"].endswith("#### 18")
    assert read_json(tmp_path / "summary.json") == json.loads(json.dumps(summary))
    assert summary["n"] == 6 and summary["correct"] == sum(r["correct"] for r in rows)
    assert summary["generation"]["max_new_tokens"] == 8 and summary["generation"]["greedy"]
    assert summary["generated_tokens"] == 48 and summary["tokens_per_s"] > 0
    assert summary["prompt_template"] == DEFAULT_TEMPLATE
    assert len(summary["tokenizer_fingerprint"]) == 16 and summary["primekd_version"]
    assert len(summary["ci95"]) == 2


def test_rerun_after_kill_resumes_without_duplicates(tiny, tiny_model_dir, tmp_path) -> None:
    config = _config(tiny_model_dir, tmp_path)
    evaluate(config, progress=False, loaded=tiny)
    results = tmp_path / "results.jsonl"
    lines = results.read_text(encoding="utf-8").splitlines(keepends=True)
    # A kill: three finished rows, then a batch torn mid-line. Mark a kept row so we can
    # tell it was not regenerated (and that it is regraded at the end).
    kept = json.loads(lines[0])
    kept["response"] = "Eggs... The answer is 18."
    results.write_text(json.dumps(kept) + "\n" + "".join(lines[1:3]) + lines[3][:40],
                       encoding="utf-8")

    summary = evaluate(config, progress=False, loaded=tiny)
    rows = read_jsonl(results)
    assert [r["id"] for r in rows] == [f"test-{i:05d}" for i in range(6)]
    assert rows[0]["response"] == kept["response"] and rows[0]["correct"] is True
    assert rows[1:] == [json.loads(line) for line in lines[1:]]
    assert summary["generated_this_run"] == 3 and summary["n"] == 6
    assert summary["correct"] == sum(r["correct"] for r in rows) >= 1

    again = evaluate(config, progress=False, loaded=tiny)  # nothing left to do
    assert again["generated_this_run"] == 0 and len(read_jsonl(results)) == 6


def test_rerun_with_other_parameters_is_refused(tiny, tiny_model_dir, tmp_path) -> None:
    evaluate(_config(tiny_model_dir, tmp_path, limit=2), progress=False, loaded=tiny)
    with pytest.raises(PrimekdError, match=r"max_new_tokens: 8 -> 9.*new --out"):
        evaluate(_config(tiny_model_dir, tmp_path, limit=2, max_new_tokens=9),
                 progress=False, loaded=tiny)
    with pytest.raises(PrimekdError, match="prompt_template"):
        evaluate(_config(tiny_model_dir, tmp_path, limit=2, prompt="Q: {{ question }}"),
                 progress=False, loaded=tiny)
    # Selection and batch size do not change answers: a larger --limit extends the run.
    summary = evaluate(_config(tiny_model_dir, tmp_path, limit=3, batch_size=3),
                       progress=False, loaded=tiny)
    assert summary["n"] == 3 and summary["generated_this_run"] == 1


def test_custom_data_file_and_duplicate_ids(tiny, tiny_model_dir, tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    rows = [{"id": "b", "question": "What is 2 + 3?", "answer": "5"},
            {"id": "a", "question": "What is 10 - 4?", "answer": "#### 6"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = evaluate(_config(tiny_model_dir, tmp_path / "out", data=str(data), limit=None),
                       progress=False, loaded=tiny)
    results = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["id"] for r in results] == ["b", "a"] and [r["gold"] for r in results] == [5, 6]
    assert summary["n"] == 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:1]), encoding="utf-8")
    with pytest.raises(PrimekdError, match="id 'b' twice"):
        evaluate(_config(tiny_model_dir, tmp_path / "dup", data=str(data), limit=None),
                 progress=False, loaded=tiny)


def test_adapter_eval_and_retrained_adapter_is_refused(tiny_model_dir, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def save_adapter(seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")

    save_adapter(0)
    config = _config(tiny_model_dir, tmp_path / "out", limit=2, adapter=str(tmp_path / "adapter"))
    summary = evaluate(config, progress=False)
    assert summary["n"] == 2 and summary["adapter"] == str(tmp_path / "adapter")
    save_adapter(1)  # retrained in place: the old answers no longer describe it
    with pytest.raises(PrimekdError, match="adapter_sha256"):
        evaluate(config, progress=False)
    with pytest.raises(PrimekdError, match="adapter_config.json"):
        evaluate(_config(tiny_model_dir, tmp_path / "o2", adapter=str(tmp_path)), progress=False)


def test_directory_without_rows_takes_new_parameters(tmp_path: Path) -> None:
    # A first run that failed before its first batch (say, the model did not load)
    # leaves nothing to protect: the corrected command must not be refused.
    claim_directory(tmp_path, {"model": "org/typo", "max_new_tokens": 8})
    claim_directory(tmp_path, {"model": "org/right", "max_new_tokens": 8})
    assert read_json(tmp_path / "eval_config.json")["model"] == "org/right"


def test_cli_reports_bad_input_in_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from primekd.cli import main

    argv = ["primekd", "eval", "--model", str(tiny_model_dir), "--prompt", "Q: {question}",
            "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.strip() == ("error: prompt template: {question} is str.format syntax; "
                              "templates are Jinja, write {{ question }} instead")
    assert "Traceback" not in stderr


@pytest.mark.integration
def test_cli_eval_on_bundled_model(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-c", "from primekd.cli import main; main()", "eval", "--model",
         "smollm2-135m-instruct", "--limit", "4", "--max-new-tokens", "64", "--out", str(out),
         "--json"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    rows = read_jsonl(out / "results.jsonl")
    assert [r["id"] for r in rows] == ["test-00000", "test-00001", "test-00002", "test-00003"]
    assert all(set(r) == RESULT_FIELDS for r in rows)
    assert all(r["response"].strip() and 0 < r["n_tokens"] <= 64 for r in rows)
    assert all(r["finish_reason"] in {"stop", "length"} for r in rows)
    summary = read_json(out / "summary.json")
    assert summary == printed
    for key in ("n", "correct", "accuracy", "ci95", "no_answer", "accuracy_strict",
                "accuracy_flexible", "truncated", "no_number", "grading", "model", "adapter",
                "prompt_template", "generation", "wall_time_s", "tokens_per_s",
                "tokenizer_fingerprint", "primekd_version"):
        assert key in summary
    assert summary["n"] == 4 and summary["model"] == "smollm2-135m-instruct"
    assert summary["generation"]["max_new_tokens"] == 64 and summary["tokens_per_s"] > 0
