"""The `small` preset (issue 14): its bounds, its fixed test subset, its plan; the restatement
count of teacher answers and the report's table in the paper's layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from primekd.cli.app import app
from primekd.core.data import load_examples
from primekd.core.grading import answer_line_span, working_text
from primekd.experiment import report
from primekd.experiment.config import load_config
from primekd.experiment.stages import plan
from primekd.teach.teacher import RESTATE_MAX_TOKENS, restated_count, working_tokens

# sha256 of the 400 test ids (one per line, in the sampled order), fixed when the preset was
# written, before any result of it existed: a change of sampler or data must fail here.
TEST_IDS_SHA256 = "09c11007749abd68af1aa4b3991d44ed914c9c593fa3daee9052b46b59f5b23a"


@pytest.fixture(scope="module")
def small():
    return load_config(preset="small")


def _ids(selection) -> list[str]:
    return [e.id for e in load_examples(selection.split, selection.limit, selection.offset,
                                        selection.sample, selection.seed)]


def test_small_preset_meets_the_issue_bounds(small) -> None:
    assert small.models.teacher == small.models.student == "smollm2-135m-instruct"
    assert {"none", "teacher", "ground_truth"} <= set(small.strategies)
    assert set(small.controls) == {"base", "sft"}
    transfer, test = _ids(small.data.transfer), _ids(small.data.test)
    assert len(transfer) >= 256 and len(set(transfer)) == len(transfer)
    assert len(test) >= 400 and all(i.startswith("test-") for i in test)
    assert small.teacher["stop_at_answer"] and small.eval["stop_at_answer"]


def test_small_test_subset_is_the_fixed_one(small) -> None:
    digest = hashlib.sha256("\n".join(_ids(small.data.test)).encode()).hexdigest()
    assert digest == TEST_IDS_SHA256


def test_every_student_trains_with_the_same_steps_order_and_seed(small) -> None:
    """No strategy or the sft control overrides what makes students comparable."""
    shared = ("max_steps", "epochs", "batch_size", "grad_accum", "seed", "val_size", "lr",
              "keep")
    for name, spec in small.strategies.items():
        overrides = spec.get("distill", {}) if isinstance(spec, dict) else {}
        assert not set(overrides) & set(shared), name
    assert not set(small.sft) & set(shared)
    assert small.distill["max_steps"] is not None  # steps fixed, not epochs of kept rows
    assert small.distill["keep"] == "all"


def test_small_preset_plans_every_stage(small, tmp_path: Path) -> None:
    names = [stage.name for stage in plan(small, tmp_path)]
    for strategy in ("none", "teacher", "ground_truth"):
        assert f"teacher/{strategy}" in names and f"eval/kd-{strategy}" in names
    assert {"students/sft", "eval/base", "eval/sft", "attention", "report"} <= set(names)
    # eval/base right after the teachers: on the vllm engine it reuses their server
    first_student = min(i for i, n in enumerate(names) if n.startswith("students/"))
    assert names.index("eval/base") == first_student - 1
    assert all(n.startswith("teacher/") for n in names[:names.index("eval/base")])
    result = CliRunner().invoke(app, ["run", "--preset", "small", "--dry-run",
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "teacher/ground_truth" in result.output


# --- restating the answer without working -------------------------------------------------------


def test_working_text_leaves_out_the_answer_line() -> None:
    text = "She has 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = 18 dollars.\nThe answer is 18."
    start, end = answer_line_span(text)
    assert text[start:end] == "The answer is 18."
    assert working_text(text) == "She has 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = 18 dollars."
    assert working_text("The answer is 18.\nSo she makes 18 dollars a day.") == \
        "So she makes 18 dollars a day."  # working after the answer line still counts
    assert working_text("#### 18") == ""
    assert working_text("She makes 18 dollars.") is None  # no answer line: not a restatement
    assert answer_line_span("The answer is what?") is None


def test_restated_count_uses_the_token_threshold(tiny_model_dir: Path) -> None:
    from primekd.core.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    working = "Janet sells 16 - 3 - 4 = 9 eggs a day at $2 each, so she makes 9 * 2 = 18."
    assert working_tokens(working + "\nThe answer is 18.", tok) >= RESTATE_MAX_TOKENS
    rows = [{"response": "The answer is 18.", "finish_reason": "stop"},
            {"response": "Given 18.\nThe answer is 18.", "finish_reason": "stop"},
            {"response": working + "\nThe answer is 18.", "finish_reason": "stop"},
            {"response": "Eighteen", "finish_reason": "length"},
            {"response": "#### 18", "finish_reason": "reference"}]
    assert restated_count(rows, tok) == 2


def test_teacher_manifest_counts_restatements(tiny_model_dir: Path, tmp_path: Path) -> None:
    from primekd.teach.teacher import TeachConfig, teach

    manifest = teach(TeachConfig(teacher=str(tiny_model_dir), out=str(tmp_path / "s"),
                                 limit=2, max_new_tokens=8, top_k=4, device="cpu"),
                     progress=False)
    assert manifest["restate_max_tokens"] == RESTATE_MAX_TOKENS
    assert isinstance(manifest["restated"], int) and 0 <= manifest["restated"] <= 2
    assert manifest["restated_rate"] == manifest["restated"] / 2


# --- the report in the paper's layout -----------------------------------------------------------


def _results(path: Path, flags: list[bool]) -> None:
    path.mkdir(parents=True)
    rows = [{"id": f"q{i}", "question": "q", "reference": "#### 1", "gold": 1,
             "response": "The answer is 1", "extracted": 1 if ok else 0, "correct": ok,
             "n_tokens": 5, "finish_reason": "stop"} for i, ok in enumerate(flags)]
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"n": len(rows)}))


def _student(path: Path, data: dict) -> None:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"data": data}))


def test_report_has_the_paper_layout_table(tmp_path: Path) -> None:
    n = 60
    _results(tmp_path / "eval" / "base", [i < 6 for i in range(n)])
    _results(tmp_path / "eval" / "sft", [i < 9 for i in range(n)])
    _results(tmp_path / "eval" / "kd-none", [i < 10 for i in range(n)])
    _results(tmp_path / "eval" / "kd-ground_truth", [i < 30 for i in range(n)])
    _student(tmp_path / "students" / "sft", {"source": "references", "kept_rows": 240})
    _student(tmp_path / "students" / "kd-none",
             {"source": "teacher_store", "keep": "all", "store_rows": 256, "kept_rows": 256})
    _student(tmp_path / "students" / "kd-ground_truth",
             {"source": "teacher_store", "keep": "correct", "store_rows": 256,
              "kept_rows": 31})
    teacher = tmp_path / "teacher" / "ground_truth"
    teacher.mkdir(parents=True)
    (teacher / "manifest.json").write_text(json.dumps(
        {"teacher_accuracy": 0.5, "restated": 64, "restated_rate": 0.25,
         "restate_max_tokens": 16, "counts": {"rows": 256, "kept": 256}}))
    report.write_report(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    table = markdown.split("## Results in the paper's layout", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    labels = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert labels == ["No distillation", "Fine-tuned (SFT on references)",
                      "KD without priming", "KD, `ground_truth` priming"]
    gt = lines[-1]
    assert "50.0%" in gt and "**+33.3**" in gt and "+200.0%" in gt  # (30-10)/10
    assert "31/256 teacher answers (graded correct only)" in gt
    assert "256 teacher answers (all)" in lines[4] and "240 reference solutions" in lines[3]
    assert "untrained" in lines[2]
    # the bootstrap interval of Δ excludes 0 where McNemar is significant
    low = float(gt.split(" | ")[5].split(" to ")[0])
    assert low > 0
    teachers = markdown.split("## Teachers", 1)[1].split("\n## ", 1)[0]
    assert "restates without working" in teachers and "25% (64)" in teachers
    assert "N is 16" in teachers


# --- repetition loops ---------------------------------------------------------------------------

LOOP = "To solve this problem, I will break it down step by step:\n\n" + "".join(
    f"Step {i}: {'Calculate' if i % 2 else 'Determine'} the number of stickers used by Mary's "
    "journal.\n\n" for i in range(1, 29))
WORKED = ("Janet's ducks lay 16 eggs per day. She eats 3 for breakfast and bakes muffins with "
          "4, so she uses 3 + 4 = 7 eggs. That leaves 16 - 7 = 9 eggs to sell. She sells each "
          "egg for $2, so she makes 9 * 2 = $18 every day at the farmers' market. To check: "
          "7 eggs used plus 9 sold is 16, all of them. Each of the 9 eggs brings $2, and nine "
          "twos are eighteen. Over a week she would make 7 * 18 = $126, but the question asks "
          "about one day only, so the daily amount is what we want here, not the weekly one. ")


def test_looping_tells_a_repetition_loop_from_long_working() -> None:
    from primekd.core.grading import looping

    assert looping(LOOP)
    assert not looping(WORKED * 1)
    assert not looping("The answer is 18.")  # too short to judge


def test_report_says_a_looping_model_is_not_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "eval" / "base"
    path.mkdir(parents=True)
    rows = [{"id": f"q{i}", "question": "q", "reference": "#### 1", "gold": 1,
             "response": LOOP if i < 4 else "The answer is 1", "extracted": None if i < 4
             else 1, "correct": i >= 4, "n_tokens": 5,
             "finish_reason": "length" if i < 5 else "stop"} for i in range(20)]
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"n": 20}))
    report.write_report(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "25% (5; 4 looping)" in markdown
    assert "4 of them are repetition loops" in markdown and "the budget cut 5%" in markdown
    assert "Raise `eval.max_new_tokens`" not in markdown
