"""The `pair` preset (issue 23): a 1.5B teacher and a 0.5B student; its fixed test subset,
the comparability of its students, and the time estimate `run --dry-run` prints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import primekd.cli  # noqa: F401  registers every command on the app
from primekd.cli.app import app
from primekd.core import power
from primekd.core.data import load_examples
from primekd.core.errors import PrimekdError
from primekd.experiment import estimate
from primekd.experiment.config import load_config
from primekd.experiment.stages import plan

# sha256 of the test ids (one per line, in the sampled order), fixed when the preset was
# written, before any result of it existed: a change of sampler or data must fail here.
TEST_IDS_SHA256 = "efd05674aaa8262b5b580044a73c2f3ca95e0e41b25cb41075d81333b3732946"
STAGE_LIMIT_S = 90 * 60  # no stage over 90 minutes, so an interrupted run resumes cheaply


@pytest.fixture(scope="module")
def pair():
    return load_config(preset="pair")


def _ids(selection) -> list[str]:
    return [e.id for e in load_examples(selection.split, selection.limit, selection.offset,
                                        selection.sample, selection.seed)]


def test_pair_preset_has_the_design_of_issue_23(pair) -> None:
    assert pair.models.teacher == "qwen2.5-coder-1.5b-instruct"
    assert pair.models.student == "qwen2.5-coder-0.5b-instruct"
    assert {"none", "ground_truth"} <= set(pair.strategies)
    assert set(pair.controls) == {"base", "sft"}
    assert pair.engine.options["dtype"] == "float32" and pair.distill["dtype"] == "float32"
    assert pair.teacher["stop_at_answer"] and pair.eval["stop_at_answer"]


def test_pair_test_subset_is_the_fixed_one(pair) -> None:
    ids = _ids(pair.data.test)
    assert len(set(ids)) == len(ids) and all(i.startswith("test-") for i in ids)
    assert hashlib.sha256("\n".join(ids).encode()).hexdigest() == TEST_IDS_SHA256
    # random.sample's prefix property: the small preset's 400 questions come first
    small = load_config(preset="small")
    assert ids[:400] == _ids(small.data.test)


def test_every_student_trains_with_the_same_steps_order_and_seed(pair) -> None:
    shared = ("max_steps", "epochs", "batch_size", "grad_accum", "seed", "val_size", "lr",
              "keep")
    for name, spec in pair.strategies.items():
        assert not set(spec.distill) & set(shared), name
    assert not set(pair.sft) & set(shared)
    assert pair.distill["max_steps"] is not None and pair.distill["keep"] == "all"


def test_test_size_gives_the_planned_power(pair) -> None:
    """The sizing docs/run.md states: the primary comparison, Holm over the 3 comparisons in
    kd-none's column, 8 points, at the planning discordance 27% (the 1.5B against the 0.5B on
    30 questions, issue 23)."""
    n = len(_ids(pair.data.test))
    comparisons = len(pair.experiments) - 1
    assert comparisons == 3
    assert power.mcnemar_power(n, 0.27, 0.08, comparisons=comparisons) >= 0.8


def test_dry_run_prints_a_complete_estimate_within_the_stage_limit(pair, tmp_path: Path
                                                                    ) -> None:
    stages = plan(pair, tmp_path / "r")
    found = estimate.estimate(pair, stages)
    assert all(e.seconds is not None for e in found)  # every rate of the preset is set
    assert max(e.seconds for e in found) <= STAGE_LIMIT_S, found
    result = CliRunner().invoke(app, ["run", "--preset", "pair", "--dry-run", "--json",
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["estimate_total_s"] == pytest.approx(estimate.total(found))
    assert {s["stage"] for s in data["stages"]} >= {"teacher/ground_truth", "eval/base",
                                                    "students/kd-ground_truth", "report"}


def test_unfetched_models_are_refused_before_any_stage(tmp_path: Path, monkeypatch) -> None:
    """Without the teacher the run stops at once, not after the stages before its first use;
    `--dry-run` says which models are missing; `--only` needs only its stages' models."""
    monkeypatch.setenv("PRIMEKD_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    out = tmp_path / "r"
    result = runner.invoke(app, ["run", "--preset", "pair", "--out", str(out)])
    assert isinstance(result.exception, PrimekdError)  # `primekd`: one line, exit 2
    assert "models not fetched yet: qwen2.5-coder-0.5b-instruct, " \
        "qwen2.5-coder-1.5b-instruct; run `make models`" in str(result.exception)
    assert not out.exists()  # nothing written, no stage started
    dry = runner.invoke(app, ["run", "--preset", "pair", "--dry-run", "--json", "--out",
                              str(out)])
    assert json.loads(dry.stdout)["models_not_fetched"] == [
        "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
    student = runner.invoke(app, ["run", "--preset", "pair", "--only", "eval/base", "--out",
                                  str(out)])
    assert "not fetched yet: qwen2.5-coder-0.5b-instruct;" in str(student.exception)


def test_dry_run_refuses_what_the_run_would(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--preset", "pair", "--dry-run", "--set",
                                      "eval.max_new_tokens=-3", "--out", str(tmp_path)])
    assert isinstance(result.exception, PrimekdError)
    assert "eval/base: --max-new-tokens must be at least 1, not -3" in str(result.exception)
