"""The report's headline claims match its p-values; truncation is shown and warned about."""

from __future__ import annotations

import json
from pathlib import Path

from primekd.experiment import report


def _results(path: Path, flags: list[bool], truncated: int = 0, cap: int = 64,
             stop_at_answer: bool = False) -> None:
    path.mkdir(parents=True)
    rows = [{"id": f"q{i}", "question": f"What is {i}+{i}?", "reference": f"#### {2 * i}",
             "gold": 2 * i, "response": f"The answer is {2 * i if ok else 0}",
             "extracted": 2 * i if ok else 0, "correct": ok, "correct_strict": ok,
             "correct_flexible": ok, "n_tokens": 5,
             "finish_reason": "length" if i < truncated else "stop"}
            for i, ok in enumerate(flags)]
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    generation = {"max_new_tokens": cap, "stop_at_answer": stop_at_answer}
    (path / "summary.json").write_text(json.dumps({"n": len(rows), "generation": generation}))


def _teacher(path: Path, truncated: int, rows: int = 16, cap: int = 128) -> None:
    path.mkdir(parents=True)
    manifest = {"teacher_accuracy": 0.25, "teacher_accuracy_strict": 0.125,
                "truncated": truncated, "truncation_rate": truncated / rows,
                "counts": {"rows": rows, "kept": rows}, "generation": {"max_new_tokens": cap}}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _markdown(run: Path) -> str:
    report.write_report(run)
    return (run / "report.md").read_text()


def _first_paragraph(markdown: str) -> str:
    return markdown.split("\n\n")[1]


def test_no_significant_difference_is_said_plainly_without_emphasis(tmp_path: Path) -> None:
    """Issue 11: 3/20 against 0/20 was headlined as "the most accurate student"."""
    _results(tmp_path / "eval" / "base", [False] * 20)
    _results(tmp_path / "eval" / "kd-none", [False] * 20)
    _results(tmp_path / "eval" / "kd-ground_truth", [i < 3 for i in range(20)])
    markdown = _markdown(tmp_path)
    first = _first_paragraph(markdown)
    assert first.startswith("**No difference between models is significant**")
    assert "`kd-ground_truth` at 15.0%" in first and "not significant" in first
    assert "Holm p 0.500" in first and "95% CI" in first
    assert "most accurate" not in markdown
    results = markdown.split("## Results", 1)[1].split("## Teachers", 1)[0]
    assert "**+" not in results  # no difference is set in bold


def test_equal_accuracies_name_no_model(tmp_path: Path) -> None:
    """All models at 0/20: no model has "the highest point estimate"."""
    for name in ("base", "sft", "kd-none"):
        _results(tmp_path / "eval" / name, [False] * 20)
    first = _first_paragraph(_markdown(tmp_path))
    assert first.startswith("**No difference between models is significant**")
    assert "every model answered 0.0% of the 20 test questions" in first
    assert "highest point estimate" not in first


def test_truncation_warning_offers_stop_at_answer_only_when_it_is_off(tmp_path: Path) -> None:
    _results(tmp_path / "eval" / "base", [False] * 20, truncated=5, stop_at_answer=True)
    _results(tmp_path / "eval" / "kd-none", [False] * 20, truncated=5)
    head = _markdown(tmp_path).split("## Results", 1)[0]
    base = next(line for line in head.splitlines() if "`base` hit" in line)
    other = next(line for line in head.splitlines() if "`kd-none` hit" in line)
    assert "stop_at_answer" not in base and "stop_at_answer: true" in other


def test_a_significant_difference_is_named_with_its_interval(tmp_path: Path) -> None:
    _results(tmp_path / "eval" / "base", [False] * 40)
    _results(tmp_path / "eval" / "kd-none", [i < 30 for i in range(40)])
    markdown = _markdown(tmp_path)
    first = _first_paragraph(markdown)
    assert first.startswith("Significant after Holm's correction")
    assert "`kd-none` is more accurate than `base` by 75.0 points" in first
    assert "Holm p <0.001" in first
    results = markdown.split("## Results", 1)[1]
    assert "**+75.0**" in results
    # the pair is tested in both references' families; the headline says it once
    assert "`base` is less accurate than `kd-none`" not in first
    assert first.count("accurate than") == 1


def test_compute_says_the_vllm_servers_cpu_is_not_counted(tmp_path: Path) -> None:
    _results(tmp_path / "eval" / "base", [False] * 20)
    (tmp_path / "config.yaml").write_text("engine:\n  name: vllm\n")
    assert "not counted here" in _markdown(tmp_path).split("## Compute", 1)[1]
    (tmp_path / "config.yaml").write_text("engine:\n  name: hf\n")
    assert "not counted here" not in _markdown(tmp_path)


def test_truncation_is_shown_and_warned_about_first(tmp_path: Path) -> None:
    _results(tmp_path / "eval" / "base", [False] * 20, truncated=1)
    _results(tmp_path / "eval" / "kd-none", [False] * 20, truncated=5, cap=160)
    _teacher(tmp_path / "teacher" / "none", truncated=1)
    _teacher(tmp_path / "teacher" / "ground_truth", truncated=12)
    markdown = _markdown(tmp_path)
    head = markdown.split("Teacher `", 1)[0]
    assert "`kd-none` hit the token limit on 5 of 20 answers (25%)" in head
    assert "`eval.max_new_tokens` (now 160)" in head
    assert "`ground_truth` teacher hit the token limit on 12 of 16" in head
    assert "`base` hit" not in head and "`none` teacher" not in head  # 5% and 6%: under 10%
    results = markdown.split("## Results", 1)[1].split("## Teachers", 1)[0]
    assert "| truncated |" in results and "25% (5)" in results and "5% (1)" in results
    teachers = markdown.split("## Teachers", 1)[1].split("## Training", 1)[0]
    assert "| strict | truncated |" in teachers and "75% (12)" in teachers


def test_teacher_kept_answers_count_against_rows_not_questions(tmp_path: Path) -> None:
    _results(tmp_path / "eval" / "base", [False] * 4)
    path = tmp_path / "teacher" / "none"
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(
        {"counts": {"questions": 64, "rows": 256, "kept": 200}}))  # 4 samples per question
    teachers = _markdown(tmp_path).split("## Teachers", 1)[1].split("## Training", 1)[0]
    assert "200/256" in teachers and "200/64" not in teachers


def test_worked_examples_do_not_put_forward_a_lead_that_is_not_significant(
        tmp_path: Path) -> None:
    """kd-teacher leads kd-gt by a margin that is not significant: the examples show the
    student that comes first in the table and say it was not chosen by its score."""
    _results(tmp_path / "eval" / "base", [False] * 20)
    _results(tmp_path / "eval" / "kd-ground_truth", [i < 1 for i in range(20)])
    _results(tmp_path / "eval" / "kd-teacher", [i < 3 for i in range(20)])
    examples = _markdown(tmp_path).split("## Worked examples", 1)[1].split("## Compute", 1)[0]
    assert "`kd-ground_truth` comes first in the results table" in examples
    assert "not chosen by its score" in examples and "kd-teacher" not in examples


def test_worked_examples_show_a_significantly_better_student(tmp_path: Path) -> None:
    _results(tmp_path / "eval" / "base", [False] * 40)
    _results(tmp_path / "eval" / "kd-ground_truth", [False] * 40)
    _results(tmp_path / "eval" / "kd-teacher", [i < 20 for i in range(40)])
    examples = _markdown(tmp_path).split("## Worked examples", 1)[1].split("## Compute", 1)[0]
    assert "`kd-teacher` is the most accurate trained student with a significant" in examples


def test_an_on_policy_student_is_labelled_by_what_it_trained_on(tmp_path: Path) -> None:
    """It trains on its own answers scored by the primed teacher, not on teacher answers."""
    _results(tmp_path / "eval" / "kd-none", [False] * 8)
    _results(tmp_path / "eval" / "op-ground_truth", [False] * 8)
    student = tmp_path / "students" / "op-ground_truth"
    student.mkdir(parents=True)
    rounds = [{"round": i, "on_sequences": 32, "off_sequences": 0} for i in range(2)]
    (student / "summary.json").write_text(json.dumps({
        "tokens": 1000, "data": {"source": "on_policy", "teacher_store": None},
        "on_policy": {"strategy": "ground_truth", "lmbda": 1.0, "rounds": rounds,
                      "cost_s": {"rollout_s": 1.0, "score_s": 1.0, "train_s": 1.0}}}))
    table = _markdown(tmp_path).split("## Results in the paper's layout", 1)[1].split("## ")[0]
    row = next(line for line in table.splitlines() if "`op-ground_truth`" in line)
    assert row.startswith("| On-policy KD, `ground_truth` priming |")
    assert "64 own answers in 2 rounds, scored by the `ground_truth` teacher" in row
    assert "teacher answers (all)" not in row
