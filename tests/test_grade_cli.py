"""`primekd grade` and `primekd compare` through the CLI, in-process and as a real program."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import primekd.cli  # noqa: F401  registers every command on the app
from primekd.cli.app import app
from primekd.core.errors import PrimekdError
from primekd.core.io import read_jsonl

runner = CliRunner()

ROWS = [
    {"question": "2+2?", "answer": "#### 4", "response": "The answer is 4.", "model": "m"},
    {"question": "3*3?", "answer": "9", "response": "3*3 = 9\n#### 9", "model": "m"},
    {"question": "10-1?", "answer": "#### 9", "response": "It is 8.", "model": "m"},
    {"question": "1+1?", "answer": "#### 2", "response": "no idea", "model": "m"},
]


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    path = tmp_path / "outputs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return path


def test_grade_json_is_exactly_the_summary(outputs: Path) -> None:
    result = runner.invoke(app, ["grade", str(outputs), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary)[:5] == ["n", "correct", "accuracy", "ci95", "no_answer"]
    assert (summary["n"], summary["correct"], summary["accuracy"], summary["no_answer"]) == (
        4, 2, 0.5, 1)
    assert (summary["accuracy_strict"], summary["accuracy_flexible"]) == (0.5, 0.5)
    assert (summary["no_number"], summary["truncation_known"]) == (1, False)
    assert (summary["extractor"], summary["grading"]) == ("default", "default")
    assert 0 < summary["ci95"][0] < 0.5 < summary["ci95"][1] < 1


def test_grade_out_keeps_fields_and_adds_grades(outputs: Path, tmp_path: Path) -> None:
    graded = tmp_path / "graded.jsonl"
    result = runner.invoke(app, ["grade", str(outputs), "--out", str(graded)])
    assert result.exit_code == 0, result.output
    assert "2/4 correct" in result.stdout and "1 without any number" in result.stdout
    assert "truncation unknown for 4 row(s)" in result.stdout
    rows = read_jsonl(graded)
    assert [row["correct"] for row in rows] == [True, True, False, False]
    assert [row["extracted"] for row in rows] == [4.0, 9.0, 8.0, None]
    assert all(row["model"] == "m" and "gold" in row for row in rows)


def test_grade_extractor_option(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(
        {"answer": "6", "response": "Each box has 6 eggs.\nThe answer is 24."}) + "\n")
    default = json.loads(runner.invoke(app, ["grade", str(path), "--json"]).stdout)
    paper = json.loads(
        runner.invoke(app, ["grade", str(path), "--json", "--extractor", "paper"]).stdout)
    assert (default["correct"], paper["correct"]) == (0, 1)
    bad = runner.invoke(app, ["grade", str(path), "--extractor", "fancy"])
    assert isinstance(bad.exception, PrimekdError)
    assert "default, paper, math-verify" in str(bad.exception)


ADVERSARIAL = Path(__file__).parent / "data" / "adversarial_responses.jsonl"


def test_grade_adversarial_file_default_strict_flexible() -> None:
    """Hand-written traps: a truncated ramble whose last number is the gold, corrections,
    mixed numbers, arithmetic in a box, `3 100-gram bags`, `1e3`."""
    summary = json.loads(runner.invoke(app, ["grade", str(ADVERSARIAL), "--json"]).stdout)
    assert (summary["n"], summary["correct"]) == (12, 10)
    assert (summary["correct_strict"], summary["correct_flexible"]) == (7, 11)
    assert (summary["truncated"], summary["truncated_no_marker"], summary["no_number"]) == (
        3, 1, 1)
    lenient = json.loads(
        runner.invoke(app, ["grade", str(ADVERSARIAL), "--json", "--lenient"]).stdout)
    assert lenient["correct"] == 11 and lenient["grading"] == "lenient"


def test_grade_cross_check_lists_math_verify_disagreements() -> None:
    result = runner.invoke(app, ["grade", str(ADVERSARIAL), "--json", "--cross-check"])
    check = json.loads(result.stdout)["cross_check"]
    assert check["extractors"] == ["default", "paper", "math-verify"]
    pairs = {(p["a"], p["b"]): p for p in check["pairs"]}
    assert set(pairs) == {("default", "paper"), ("default", "math-verify"),
                          ("paper", "math-verify")}
    vs_mv = pairs[("default", "math-verify")]
    assert vs_mv["disagree"] == len(vs_mv["examples"]["only_a_correct"]) + len(
        vs_mv["examples"]["only_b_correct"]) > 0
    assert {"t5", "t6", "t8"} <= {e["id"] for e in vs_mv["examples"]["only_a_correct"]}
    # whatever width the console found (80 when stdout is not a terminal)
    table = runner.invoke(app, ["grade", str(ADVERSARIAL), "--cross-check"])
    assert table.exit_code == 0 and "default vs math-verify" in table.stdout


@pytest.mark.integration
def test_grade_public_reference_solutions_as_responses(tmp_path: Path) -> None:
    """GSM8K's human-written solutions, graded as if a model wrote them: every one states its
    answer after `####`, so default and strict agree and each is right."""
    from primekd.core.data import load_examples

    path = tmp_path / "solutions.jsonl"
    examples = load_examples("test", limit=40)
    path.write_text("".join(json.dumps({"id": e.id, "answer": e.answer, "response": e.answer,
                                        "finish_reason": "stop"}) + "\n" for e in examples))
    summary = json.loads(
        runner.invoke(app, ["grade", str(path), "--json", "--cross-check"]).stdout)
    assert summary["correct"] == summary["correct_strict"] == 40
    assert summary["cross_check"]["accuracy"]["default"] == 1.0


def test_compare_cli_json_and_table(outputs: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text("".join(
        json.dumps({**row, "response": "The answer is 4"}) + "\n" for row in ROWS))
    result = runner.invoke(
        app, ["compare", str(outputs), str(other), "--json", "--bootstrap", "200", "--seed", "3"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["reference"] == "outputs.jsonl" and data["bootstrap"] == 200
    assert data["pairs"][0]["diff_points"] == pytest.approx(-25.0)
    table = runner.invoke(app, ["compare", str(outputs), str(other), "--bootstrap", "200"])
    assert table.exit_code == 0 and "McNemar" in table.stdout and "other.jsonl" in table.stdout


def test_help_explains_every_option() -> None:
    for command, options in (("grade", ["--extractor", "--out", "--json", "--lenient",
                                        "--cross-check"]),
                             ("compare", ["--reference", "--match", "--bootstrap", "--seed",
                                          "--extractor", "--json"])):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        for option in options:
            assert option in result.stdout


def test_help_names_option_values_one_way() -> None:
    """Every option's value is named as click does (TEXT, INTEGER, PATH, or a word such as
    KEY=VALUE), not typer's `<str>`/`<list[str]>` on the hand-declared options only."""
    for command in ("run", "grade", "compare", "teach", "eval", "distill", "tune", "attention"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        options = [line for line in result.stdout.splitlines() if line.lstrip().startswith("-")]
        assert result.exit_code == 0 and options
        assert not [line for line in options if "<" in line.strip().split("  ")[0]], command


def _primekd() -> list[str]:
    script = shutil.which("primekd", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c", "from primekd.cli import main; main()"]


def _run_together(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run real `primekd` processes side by side (each start imports the whole CLI)."""
    env = {**os.environ, "COLUMNS": "200"}
    processes = [subprocess.Popen([*_primekd(), *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
                 for args in commands]
    finished = []
    for args, process in zip(commands, processes, strict=True):
        stdout, stderr = process.communicate(timeout=120)
        finished.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    return finished


@pytest.mark.slow  # each process start imports every command module
def test_real_program_fails_cleanly_on_bad_input(tmp_path: Path) -> None:
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"question": "q?"}) + "\n")
    missing, bad = _run_together(["grade", str(tmp_path / "missing.jsonl"), "--json"],
                                 ["grade", str(malformed)])
    for result in (missing, bad):
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error:") and result.stderr.strip().count("\n") == 0
        assert result.stdout == ""
    assert "missing.jsonl does not exist" in missing.stderr
    assert "malformed.jsonl:2" in bad.stderr and "response" in bad.stderr


def test_compare_shows_strict_flexible_and_truncation(tmp_path: Path) -> None:
    graded = tmp_path / "graded.jsonl"
    runner.invoke(app, ["grade", str(ADVERSARIAL), "--out", str(graded)])
    data = json.loads(runner.invoke(
        app, ["compare", str(ADVERSARIAL), str(graded), "--json", "--bootstrap", "200"]).stdout)
    for file in data["files"]:  # graded on load (the first) or by `grade` (the second)
        assert (file["correct"], file["truncated"], file["no_number"]) == (10, 3, 1)
        assert file["accuracy_strict"] == pytest.approx(7 / 12)
        assert file["accuracy_flexible"] == pytest.approx(11 / 12)
    lenient = json.loads(runner.invoke(
        app, ["compare", str(ADVERSARIAL), "--json", "--lenient"]).stdout)
    assert lenient["files"][0]["correct"] == 11
    table = runner.invoke(app, ["compare", str(ADVERSARIAL), str(graded), "--bootstrap", "200"],
                          env={"COLUMNS": "200"})
    assert "strict" in table.stdout and "flexible" in table.stdout and "truncated" in table.stdout
