"""The report's Answer style section: programs and written outputs counted per model."""

from __future__ import annotations

import json
from pathlib import Path

from primekd.experiment import answer_style, report
from primekd.teach import store

PROGRAM = ("Let's compute it.\n```python\nprint(4 * 125 - 2 + 125)\n```\n```output\n500\n```\n"
           "The answer is 500.")
PROSE = "4 * 125 - 2 = 498, and 498 + 125 = 623.\nThe answer is 623."


def test_programs_and_written_outputs_are_told_apart() -> None:
    assert answer_style.has_program(PROGRAM) and answer_style.has_written_output(PROGRAM)
    assert not answer_style.has_program(PROSE) and not answer_style.has_written_output(PROSE)
    code_only = "```py\nx = 1\n```\nSo x is 1."
    assert answer_style.has_program(code_only) and not answer_style.has_written_output(code_only)
    # a fence named in running text is not a block
    assert not answer_style.has_program("I could write ```python but will not.")


def test_counts_split_accuracy_by_style() -> None:
    rows = [{"response": PROGRAM, "correct": False}, {"response": PROGRAM, "correct": True},
            {"response": PROSE, "correct": True}, {"response": PROSE, "correct": True},
            {"response": PROSE, "correct": False}]
    counts = answer_style.count(rows)
    assert (counts.answers, counts.programs, counts.written_outputs) == (5, 2, 2)
    assert counts.accuracy_with_program == 0.5
    assert abs(counts.accuracy_without_program - 2 / 3) < 1e-9
    assert answer_style.count([]).accuracy_with_program is None


def _eval(path: Path, responses: list[str]) -> None:
    path.mkdir(parents=True)
    rows = [{"id": f"q{i}", "question": "q", "reference": "#### 623", "gold": 623,
             "response": text, "extracted": 623, "correct": text == PROSE, "n_tokens": 20,
             "finish_reason": "stop"} for i, text in enumerate(responses)]
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"n": len(rows)}))


def _teacher_store(path: Path, responses: list[str], shard: list[int] | None = None) -> None:
    rows = [{"id": f"t{i}", "sample": 0, "question": "q", "reference": "r", "gold": 623.0,
             "teacher_prompt": "p", "response": text, "token_ids": [1], "topk_ids": [[1]],
             "topk_logprobs": [[-0.1]], "finish_reason": "stop", "extracted": 623.0,
             "correct": text == PROSE, "found_by": "marker", "no_answer": None,
             "truncated": False, "correct_strict": text == PROSE,
             "correct_flexible": text == PROSE, "answer_text": "623", "token_char_ends": [1]}
            for i, text in enumerate(responses)]
    if shard:
        rows = [{**row, "id": f"{row['id']}-{shard[0]}"} for row in rows]
    store.write_part(path, rows, [(r["id"], 0) for r in rows], {"rows": len(rows)})
    store.write_manifest(path, {"format": store.FORMAT, "format_version": store.FORMAT_VERSION,
                                "params": {"teacher": "t", "strategy": {"name": "none"},
                                           "shard": shard},
                                "counts": {"rows": len(rows), "kept": len(rows)},
                                "complete": True})


def test_report_shows_where_a_students_programs_came_from(tmp_path: Path) -> None:
    _teacher_store(tmp_path / "teacher" / "none", [PROGRAM] * 3 + [PROSE])
    _teacher_store(tmp_path / "teacher" / "ground_truth", [PROSE] * 4)
    _eval(tmp_path / "eval" / "base", [PROSE] * 2 + [PROGRAM] * 2)
    _eval(tmp_path / "eval" / "kd-none", [PROGRAM] * 4)
    report.write_report(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "[Answer style](#answer-style)" in markdown
    section = markdown.split("## Answer style", 1)[1].split("\n## ", 1)[0]
    lines = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("|")}
    assert lines["| teacher `none`"].split(" | ")[1:4] == ["4", "75% (3)", "75% (3)"]
    assert lines["| teacher `ground_truth`"].split(" | ")[2] == "0% (0)"
    assert lines["| `kd-none`"].split(" | ")[2:5] == ["100% (4)", "100% (4)", "0.0%"]
    assert lines["| `base`"].rstrip(" |").split(" | ")[-1] == "100.0%"


def test_report_leaves_the_section_out_when_no_answer_has_code(tmp_path: Path) -> None:
    _eval(tmp_path / "eval" / "base", [PROSE] * 4)
    _eval(tmp_path / "eval" / "kd-none", [PROSE] * 4)
    report.write_report(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "Answer style" not in markdown


def test_a_sharded_teachers_answers_are_all_counted(tmp_path: Path) -> None:
    _teacher_store(tmp_path / "shard-0", [PROGRAM, PROSE], shard=[0, 2])
    _teacher_store(tmp_path / "shard-1", [PROGRAM, PROGRAM], shard=[1, 2])
    counts = answer_style.count(answer_style.teacher_rows(tmp_path))
    assert (counts.answers, counts.programs) == (4, 3)
