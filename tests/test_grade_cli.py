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
from primekd.errors import PrimekdError
from primekd.io import read_jsonl

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
    assert list(summary) == ["n", "correct", "accuracy", "ci95", "no_answer"]
    assert (summary["n"], summary["correct"], summary["accuracy"], summary["no_answer"]) == (
        4, 2, 0.5, 1)
    assert 0 < summary["ci95"][0] < 0.5 < summary["ci95"][1] < 1


def test_grade_out_keeps_fields_and_adds_grades(outputs: Path, tmp_path: Path) -> None:
    graded = tmp_path / "graded.jsonl"
    result = runner.invoke(app, ["grade", str(outputs), "--out", str(graded)])
    assert result.exit_code == 0, result.output
    assert "2/4 correct" in result.stdout and "1 without an answer" in result.stdout
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
    assert isinstance(bad.exception, PrimekdError) and "default, paper" in str(bad.exception)


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
    for command, options in (("grade", ["--extractor", "--out", "--json"]),
                             ("compare", ["--reference", "--match", "--bootstrap", "--seed",
                                          "--extractor", "--json"])):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        for option in options:
            assert option in result.stdout


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
