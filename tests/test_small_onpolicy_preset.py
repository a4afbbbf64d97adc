"""The `small-onpolicy` preset (issue 15): it loads, validates, and plans the off-policy and
on-policy students of `none` and `ground_truth` at the same training budget."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from primekd.cli.app import app
from primekd.core.data import load_examples
from primekd.experiment.config import PRESETS, load_config
from primekd.experiment.stages import plan

sys.path.insert(0, str(Path(__file__).parent))
from test_small_preset import TEST_IDS_SHA256  # noqa: E402  the small preset's test ids

STRATEGIES = ("none", "ground_truth")


@pytest.fixture(scope="module")
def preset():
    return load_config(preset="small-onpolicy")


def test_preset_is_listed_and_has_kd_and_on_policy_students(preset) -> None:
    assert "small-onpolicy" in PRESETS
    assert preset.models.teacher == preset.models.student == "smollm2-135m-instruct"
    assert tuple(preset.strategies) == STRATEGIES and preset.controls == ["base"]
    assert preset.experiments == ["base", "kd-none", "kd-ground_truth", "op-none",
                                  "op-ground_truth"]
    assert preset.engine.name == "vllm"


def test_preset_uses_the_small_test_subset(preset) -> None:
    test = preset.data.test
    ids = [e.id for e in load_examples(test.split, test.limit, test.offset, test.sample,
                                       test.seed)]
    assert hashlib.sha256("\n".join(ids).encode()).hexdigest() == TEST_IDS_SHA256


def test_preset_plans_the_stage_graph(preset, tmp_path: Path) -> None:
    stages = {s.name: s for s in plan(preset, tmp_path)}
    names = list(stages)
    assert set(names) == {"teacher/none", "teacher/ground_truth", "eval/base",
                          "students/kd-none", "students/kd-ground_truth", "students/op-none",
                          "students/op-ground_truth", "eval/kd-none", "eval/kd-ground_truth",
                          "eval/op-none", "eval/op-ground_truth", "attention", "report"}
    assert names.index("eval/base") < min(names.index(f"students/{e}") for e in
                                          ("kd-none", "op-none"))
    batch = preset.distill["batch_size"]
    transfer = preset.data.transfer.sample
    for strategy in STRATEGIES:
        kd, op = stages[f"students/kd-{strategy}"], stages[f"students/op-{strategy}"]
        assert kd.upstream == (f"teacher/{strategy}",)
        # lmbda 1 and a built-in strategy: no teacher stage, the rollouts are the student's
        assert op.upstream == () and "teacher_store" not in op.paths
        assert op.params["on_policy"] and op.params["lmbda"] == 1.0
        assert op.params["alpha"] == 0.0 and op.params["strategy"] == strategy
        assert op.params["engine"] == "vllm" and op.params["rollout_stop_at_answer"]
        # the same training budget: sequences and steps
        sequences = op.params["rounds"] * op.params["round_size"]
        assert sequences == kd.params["max_steps"] * batch == transfer - kd.params["val_size"]
        assert stages[f"eval/op-{strategy}"].upstream == (f"students/op-{strategy}",)
        assert op.params["top_k"] == preset.teacher["top_k"]
    assert set(stages["report"].upstream) >= {f"eval/{e}" for e in preset.experiments}


def test_preset_dry_run_and_print_config(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--preset", "small-onpolicy", "--dry-run", "--json",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    stages = {s["stage"]: s for s in json.loads(result.output)["stages"]}
    assert stages["students/op-ground_truth"]["state"] == "new"
    assert stages["eval/op-ground_truth"]["upstream"] == ["students/op-ground_truth"]
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    shown = runner.invoke(app, ["run", "--preset", "small-onpolicy", "--print-config"])
    assert shown.exit_code == 0 and "on_policy:" in shown.output
