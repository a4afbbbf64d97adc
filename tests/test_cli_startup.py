"""The CLI must start fast: heavy libraries load only when a command that needs them runs."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "optuna", "matplotlib", "datasets")


def test_importing_the_cli_loads_no_heavy_library() -> None:
    code = (
        "import sys, primekd.cli; "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "", f"importing primekd.cli loaded {loaded}"


def test_importing_the_cli_leaves_pydantic_for_the_commands_that_check_configs() -> None:
    """pydantic (~50 modules, ~0.2 s) loads when a config is checked, not on `--help`."""
    code = "import sys, primekd.cli; print('pydantic' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "False"


def test_grading_runs_without_loading_model_libraries(tmp_path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "q", "answer": "#### 3", "response": "The answer is 3"}\n')
    code = (
        "import sys; import primekd.cli as cli; "
        f"sys.argv = ['primekd', 'grade', {str(rows)!r}, '--json']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert '"correct": 1' in result.stdout, result.stderr
    assert result.stderr.strip() == "", f"primekd grade loaded {result.stderr.strip()}"


def test_every_command_has_help() -> None:
    from typer.testing import CliRunner

    from primekd.cli.app import app

    runner = CliRunner()
    for command in ("eval", "grade", "compare", "teach", "distill", "attention", "tune", "run",
                    "models"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "--" in result.output


def test_errors_are_one_line_even_on_a_narrow_terminal(tmp_path) -> None:
    import os
    import shutil

    env = {**os.environ, "COLUMNS": "40"}
    result = subprocess.run(
        [shutil.which("primekd") or "primekd", "eval", "--model", "no-such-model",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model"), result.stderr
    assert "Traceback" not in result.stderr


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise() -> None:
    """Spinning OpenMP threads made training 7x slower beside a busy process
    (bench/stage_levers.py); the CLI sets OMP_WAIT_POLICY before torch loads."""
    import os

    code = ("import os, sys, primekd.cli as cli; sys.argv = ['primekd', '--help']\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(os.environ['OMP_WAIT_POLICY'], file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env)
    assert result.stderr.strip().splitlines()[-1] == "PASSIVE"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert result.stderr.strip().splitlines()[-1] == "ACTIVE"
