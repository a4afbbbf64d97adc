"""`run --dry-run`'s time estimate from the config's measured rates (experiment/estimate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import primekd.cli  # noqa: F401  registers every command on the app
from primekd.cli.app import app
from primekd.core.errors import PrimekdError
from primekd.experiment import estimate
from primekd.experiment.config import load_config
from primekd.experiment.stages import plan

RATES = ["costs.teacher_tokens_per_s=20", "costs.score_tokens_per_s=100",
         "costs.eval_tokens_per_s=40", "costs.train_tokens_per_s=8", "costs.answer_tokens=200",
         "costs.prompt_tokens=100", "costs.reference_tokens=130", "costs.start_s=30"]


def _by_name(config, out: Path) -> dict[str, estimate.StageEstimate]:
    return {e.name: e for e in estimate.estimate(config, plan(config, out))}


def test_each_stage_follows_the_cost_model(tmp_path: Path) -> None:
    config = load_config(preset="quick", overrides=RATES)  # 32 transfer, 20 test questions
    found = _by_name(config, tmp_path)
    # teacher: 32 answers x min(200, 320) tokens at 20/s + a start
    assert found["teacher/none"].seconds == pytest.approx(32 * 200 / 20 + 30)
    # eval: 20 answers x 200 tokens at 40/s + a start
    assert found["eval/base"].seconds == pytest.approx(20 * 200 / 40 + 30)
    # kd student: 8 steps x batch 4 x min(100 + 200, 448) tokens at 8/s
    assert found["students/kd-none"].seconds == pytest.approx(8 * 4 * 300 / 8)
    # sft trains on the references: 100 + 130 tokens
    assert found["students/sft"].seconds == pytest.approx(8 * 4 * 230 / 8)
    assert found["attention"].seconds == 60 and found["report"].seconds == 10
    total = estimate.total(list(found.values()))
    assert total == pytest.approx(sum(e.seconds for e in found.values()))


def test_reference_target_is_one_scoring_pass(tmp_path: Path) -> None:
    config = load_config(preset="quick", overrides=[*RATES, "teacher.target=reference"])
    assert _by_name(config, tmp_path)["teacher/none"].seconds == pytest.approx(
        32 * (100 + 130) / 100 + 30)


def test_a_missing_rate_leaves_the_total_unknown(tmp_path: Path) -> None:
    config = load_config(preset="quick", overrides=RATES[1:])  # no teacher rate
    found = _by_name(config, tmp_path)
    assert found["teacher/none"].seconds is None
    assert found["eval/base"].seconds is not None
    assert estimate.total(list(found.values())) is None


def test_bad_rate_is_refused() -> None:
    with pytest.raises(PrimekdError, match="costs.eval_tokens_per_s"):
        load_config(preset="quick", overrides=["costs.eval_tokens_per_s=0"])


def test_dry_run_prints_the_estimate(tmp_path: Path) -> None:
    runner = CliRunner()
    sets = [arg for rate in RATES for arg in ("--set", rate)]
    result = runner.invoke(app, ["run", "--preset", "quick", "--dry-run", *sets,
                                 "--out", str(tmp_path / "r")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Estimate:" in result.output and "in all, the longest stage" in result.output
    data = json.loads(runner.invoke(app, ["run", "--preset", "quick", "--dry-run", "--json",
                                          *sets, "--out", str(tmp_path / "r")]).stdout)
    assert data["estimate_total_s"] == pytest.approx(
        sum(s["estimate_s"] for s in data["stages"]))
    bare = runner.invoke(app, ["run", "--preset", "quick", "--dry-run",
                               "--out", str(tmp_path / "r")], env={"COLUMNS": "200"})
    assert "Estimate: incomplete" in bare.output
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
