"""The experiment runner: config validation, overrides, stage hashing and caching, the report
renderer. Fast: nothing here loads a model (the end-to-end run is in test_run_e2e.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from primekd.cli import app
from primekd.core import options
from primekd.core.errors import PrimekdError
from primekd.experiment import report
from primekd.experiment.config import (
    PRESETS,
    STAGE_CONFIGS,
    DataSlice,
    ExperimentConfig,
    ReportSection,
    load_config,
    preset_text,
)
from primekd.experiment.report import record_path
from primekd.experiment.runner import run_experiment, run_lock, run_stage
from primekd.experiment.stages import Stage, plan, stage_config, stage_hash

# --- presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_plan(preset: str, tmp_path: Path) -> None:
    config = load_config(preset=preset)
    stages = plan(config, tmp_path)
    names = [s.name for s in stages]
    assert names[-1] == "report"
    assert {f"eval/{e}" for e in config.experiments} <= set(names)
    assert len({s.hash for s in stages}) == len(stages)


def test_paper_preset_lists_every_key() -> None:
    """`--print-config --preset paper` is the complete reference: every settable key."""
    raw = yaml.safe_load(preset_text("paper"))
    for section, kind in (("teacher", "teacher"), ("distill", "distill"), ("eval", "eval"),
                          ("attention", "attention")):
        missing = set(options.settable(STAGE_CONFIGS[kind])) - set(raw[section])
        assert not missing, f"paper.yaml `{section}` lacks {sorted(missing)}"
    top = {f for f in ExperimentConfig.__dataclass_fields__}
    assert top == set(raw)
    assert set(raw["data"]["test"]) == set(DataSlice.__dataclass_fields__)
    assert set(raw["report"]) == set(ReportSection.__dataclass_fields__)
    paper = load_config(preset="paper")
    assert paper.data.test.sample is None and paper.data.test.limit is None  # full test set
    assert (paper.distill["lora_r"], paper.distill["lora_alpha"]) == (4, 8)
    assert paper.distill["lora_dropout"] == 0.1
    assert set(paper.strategies) >= {"none", "teacher", "ground_truth", "confidence"}


def test_print_config_is_the_commented_preset() -> None:
    result = CliRunner().invoke(app, ["run", "--print-config", "--preset", "paper"])
    assert result.exit_code == 0, result.output
    assert result.output == preset_text("paper")
    assert "# the paper's LoRA" in result.output
    resolved = CliRunner().invoke(app, ["run", "--print-config", "--set", "eval.few_shot=2"])
    assert resolved.exit_code == 0, resolved.output
    assert yaml.safe_load(resolved.output)["eval"]["few_shot"] == 2
    unknown = CliRunner().invoke(app, ["run", "--print-config", "--preset", "nope"])
    assert isinstance(unknown.exception, PrimekdError)  # main() prints it on one line, exit 2
    assert "unknown preset 'nope'; choose one of quick, small" in str(unknown.exception)


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.alhpa=0.3", "unknown config key `distill.alhpa` (did you mean 'alpha'?)"),
        ("distill.alpha=high", "config key `distill.alpha` is 'high'; expected a number"),
        ("eval.model=other", "`eval.model` is set by the experiment itself"),
        ("data.test.sampel=3", "unknown config key `data.test.sampel` (did you mean 'sample'?)"),
        ("data.test.sample=0", "`data.test.sample` must be at least 1"),
        ("controls=[base,teacher]", "`controls` has 'teacher'"),
        ("strategies=[none,nonsense]", "unknown strategy `nonsense`"),
        ("strategies.none.system=hi", "sets system/prefill without `user`"),
        ("teacher.top_k=true", "`teacher.top_k` is True; expected an integer"),
        ("strategies.none.distill.lr=fast", "`strategies.none.distill.lr` is 'fast'"),
        ("attention.enabled=maybe", "`attention.enabled` must be true or false"),
        ("report.colour=red", "unknown config key `report.colour`"),
        ("models=llama", "`models` must be a mapping"),
        ("nonsense", "write it as dotted.key=value"),
        ("name.first=x", "`name` is a value, not a section"),
    ],
)
def test_bad_config_names_the_key(override: str, message: str) -> None:
    with pytest.raises(PrimekdError, match=None) as error:
        load_config(preset="quick", overrides=[override])
    assert message in str(error.value)


def test_bad_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PrimekdError, match="does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("teacher: [unclosed\n")
    with pytest.raises(PrimekdError, match="not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(PrimekdError, match="YAML mapping"):
        load_config(listed)


def test_cli_error_is_one_line(monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from primekd.cli import main

    monkeypatch.setattr(sys, "argv", ["primekd", "run", "--dry-run", "--set",
                                      "distill.alhpa=0.3"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "unknown config key `distill.alhpa`" in " ".join(err.split())


# --- overrides ----------------------------------------------------------------------------------


def test_file_on_preset_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nstrategies: [teacher]\ndistill: {alpha: 0.2}\n")
    config = load_config(path, preset="quick", overrides=[
        "distill.max_steps=3", "strategies.teacher.teacher.temperature=0.7",
        "data.test.sample=null", "data.test.limit=7", "controls=base",
    ])
    assert config.name == "mine"
    assert list(config.strategies) == ["teacher"]
    assert config.distill["alpha"] == 0.2 and config.distill["max_steps"] == 3
    assert config.distill["lora_r"] == 8  # from the preset
    assert config.distill["lr"] == 1e-3
    assert config.strategies["teacher"].teacher == {"temperature": 0.7}
    assert (config.data.test.sample, config.data.test.limit) == (None, 7)
    assert config.experiments == ["base", "kd-teacher"]


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(preset="quick", overrides=["seed=3", "strategies.none.eval.few_shot=1"])
    assert config.distill["seed"] == 3 and config.teacher["seed"] == 3  # the experiment's seed
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    again = load_config(path)
    assert again == config
    assert [s.hash for s in plan(again, tmp_path)] == [s.hash for s in plan(config, tmp_path)]


def test_custom_strategy(tmp_path: Path) -> None:
    config = load_config(preset="quick", overrides=[
        "strategies.careful.user=Check twice. {{ question }}",
        "strategies.careful.prefill=Let's check.",
    ])
    stage = next(s for s in plan(config, tmp_path) if s.name == "teacher/careful")
    teach_config = stage_config(stage)
    assert teach_config.strategy == "careful"
    assert teach_config.strategies_file.endswith("careful.yaml")
    with pytest.raises(PrimekdError, match="is a built-in"):
        load_config(preset="quick", overrides=["strategies.none.user={{ question }}"])


def test_custom_strategy_templates_are_checked_when_the_config_loads() -> None:
    """A bad template fails `run --dry-run`, not the teacher stage after other stages ran."""
    with pytest.raises(PrimekdError, match=r"strategies.mine`, field 'user': \{question\} "
                       r"is str.format syntax"):
        load_config(preset="quick", overrides=["strategies.mine.user=Solve {question}"])
    with pytest.raises(PrimekdError, match="question"):
        load_config(preset="quick", overrides=["strategies.mine.user=Solve it."])
    with pytest.raises(PrimekdError, match="strategies.mine`, field 'system'"):
        load_config(preset="quick", overrides=["strategies.mine.user={{ question }}",
                                               "strategies.mine.system={{ nope }}"])


# --- hashing: what a change invalidates ---------------------------------------------------------


def _changed(tmp_path: Path, *overrides: str) -> set[str]:
    before = {s.name: s.hash for s in plan(load_config(preset="quick"), tmp_path)}
    after = {s.name: s.hash
             for s in plan(load_config(preset="quick", overrides=list(overrides)), tmp_path)}
    assert set(before) == set(after)
    return {name for name in before if before[name] != after[name]}


def test_one_strategy_parameter_reruns_only_that_strategy(tmp_path: Path) -> None:
    assert _changed(tmp_path, "strategies.ground_truth.teacher.max_new_tokens=64") == {
        "teacher/ground_truth", "students/kd-ground_truth", "eval/kd-ground_truth",
        "attention", "report"}
    assert _changed(tmp_path, "strategies.none.distill.alpha=0.9") == {
        "students/kd-none", "eval/kd-none", "attention", "report"}
    assert _changed(tmp_path, "strategies.none.eval.few_shot=2") == {
        "eval/kd-none", "attention", "report"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval.max_new_tokens=99", {"eval/base", "eval/sft", "eval/kd-none",
                                    "eval/kd-ground_truth", "attention", "report"}),
        ("sft.lr=0.01", {"students/sft", "eval/sft", "attention", "report"}),
        ("attention.heads_top=2", {"attention", "report"}),
        ("report.examples=3", {"report"}),
        ("teacher.top_k=5", {"teacher/none", "teacher/ground_truth", "students/kd-none",
                             "students/kd-ground_truth", "eval/kd-none",
                             "eval/kd-ground_truth", "attention", "report"}),
        ("data.test.sample=21", {"eval/base", "eval/sft", "eval/kd-none",
                                 "eval/kd-ground_truth", "attention", "report"}),
    ],
)
def test_a_change_invalidates_exactly_its_dependents(
    tmp_path: Path, override: str, expected: set[str]
) -> None:
    assert _changed(tmp_path, override) == expected


def test_student_model_change_keeps_teachers(tmp_path: Path) -> None:
    changed = _changed(tmp_path, "models.student=other/student")
    assert not any(name.startswith("teacher/") for name in changed)
    assert {"students/sft", "eval/base", "attention", "report"} <= changed


# --- the cache state machine --------------------------------------------------------------------


class _Writer:
    """A real (tiny) resumable stage function: writes one file per call, can be 'killed'."""

    def __init__(self) -> None:
        self.calls = 0
        self.kill = False

    def __call__(self, stage: Stage, progress: bool) -> dict:
        self.calls += 1
        from primekd.core.outdir import write_marker

        stage.directory.mkdir(parents=True, exist_ok=True)
        (stage.directory / f"part-{self.calls}.txt").write_text(stage.hash)
        write_marker(stage.directory, "report", set())  # real stages mark what they wrote
        if self.kill:
            raise KeyboardInterrupt
        return {"tokens": 10 * self.calls}


def _stage(tmp_path: Path, value: int) -> Stage:
    stage = Stage("eval/x", "eval", tmp_path / "eval" / "x", {"value": value},
                             run_dir=tmp_path)
    stage.hash = stage_hash("eval", stage.params, [])
    return stage


def test_stage_cached_changed_and_resumed(tmp_path: Path) -> None:
    fn = _Writer()
    stage = _stage(tmp_path, 1)
    assert stage.state() == "new"
    outcome = run_stage(stage, fn)
    assert outcome.ran and stage.state() == "cached"
    record = json.loads(stage.record_path.read_text())
    assert record["status"] == "complete" and record["hash"] == stage.hash
    assert record["summary"] == {"tokens": 10}

    assert not run_stage(stage, fn).ran and fn.calls == 1  # cached: not called again

    changed = _stage(tmp_path, 2)
    assert changed.state() == "changed"
    fn.kill = True
    with pytest.raises(KeyboardInterrupt):
        run_stage(changed, fn)
    assert not (changed.directory / "part-1.txt").exists()  # stale output cleared first
    assert changed.state() == "resume"  # same hash, not complete
    fn.kill = False
    outcome = run_stage(changed, fn)
    assert outcome.state == "resume" and changed.state() == "cached"
    assert (changed.directory / "part-2.txt").exists()  # the resumed call kept earlier work


def test_a_killed_stage_keeps_the_time_it_spent(tmp_path: Path, monkeypatch) -> None:
    """A running stage's record carries its time so far, so an attempt killed mid-way (it
    never reaches "complete") still counts in the stage's wall time once it resumes."""
    import time

    from primekd.experiment import runner

    monkeypatch.setattr(runner, "RECORD_EVERY_S", 0.05)
    stage = _stage(tmp_path, 1)
    seen: list[dict] = []

    def killed(stage: Stage, progress: bool) -> None:
        time.sleep(0.4)
        seen.append(json.loads(stage.record_path.read_text()))
        raise KeyboardInterrupt  # nothing after this line of the stage runs

    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, killed)
    assert seen[0]["status"] == "running" and seen[0]["wall_time_s"] >= 0.25
    left = json.loads(stage.record_path.read_text())
    time.sleep(0.2)
    assert json.loads(stage.record_path.read_text()) == left  # no beat after the stage
    run_stage(stage, _Writer())
    record = json.loads(stage.record_path.read_text())
    assert record["status"] == "complete" and record["wall_time_s"] >= left["wall_time_s"]


def test_a_failing_beat_does_not_stop_the_block() -> None:
    import threading

    from primekd.experiment.heartbeat import every

    beats = threading.Semaphore(0)

    def beat() -> None:
        beats.release()
        raise OSError("disk full")

    with every(0.01, beat):
        assert beats.acquire(timeout=5) and beats.acquire(timeout=5)  # kept on beating


def test_deleted_stage_dir_reruns(tmp_path: Path) -> None:
    fn = _Writer()
    stage = _stage(tmp_path, 1)
    run_stage(stage, fn)
    import shutil

    shutil.rmtree(stage.directory)
    assert stage.state() == "new"
    (tmp_path / "eval" / "y").mkdir(parents=True)
    (tmp_path / "eval" / "y" / "stray.txt").write_text("?")
    unknown = Stage("eval/y", "eval", tmp_path / "eval" / "y", {}, run_dir=tmp_path)
    assert unknown.state() == "changed"  # content without a record is never trusted


def test_one_run_per_directory(tmp_path: Path) -> None:
    with (run_lock(tmp_path), pytest.raises(PrimekdError, match="another"),
          run_lock(tmp_path)):
        pass


# --- report pieces ------------------------------------------------------------------------------


def _results(path: Path, flags: list[bool]) -> None:
    path.mkdir(parents=True)
    rows = [{"id": f"q{i}", "question": f"What is {i}+{i}?", "reference": f"#### {2 * i}",
             "gold": 2 * i, "response": f"The answer is {2 * i if ok else 0}",
             "extracted": 2 * i if ok else 0, "correct": ok, "n_tokens": 5}
            for i, ok in enumerate(flags)]
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"n": len(rows)}))


def test_results_table_statistics(tmp_path: Path) -> None:
    from primekd.core import stats

    base = [False] * 30
    kd_none = [i < 6 for i in range(30)]
    kd_gt = [i < 15 for i in range(30)]
    for name, flags in (("base", base), ("kd-none", kd_none), ("kd-ground_truth", kd_gt)):
        _results(tmp_path / "eval" / name, flags)
    runs = report.load_evals(report.Layout.discover(tmp_path))
    rows, references, gain_ref = report.results_rows(runs)
    by_name = {r.name: r for r in rows}
    assert references == ["kd-none", "base"] and gain_ref == "kd-none"
    gt = by_name["kd-ground_truth"]
    assert gt.ci95 == stats.wilson_interval(15, 30)
    raw = [stats.mcnemar_exact_p(kd_none, base), stats.mcnemar_exact_p(kd_none, kd_gt)]
    assert gt.vs["kd-none"][0] == pytest.approx(0.3)
    assert gt.vs["kd-none"][1] == pytest.approx(stats.holm_adjust(raw)[1])
    assert gt.gain == pytest.approx(150.0)  # 50% vs 20%


def test_markdown_to_html_is_self_contained(tmp_path: Path) -> None:
    plt = report._pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    report._save(fig, tmp_path / "img" / "a.png")
    markdown = ("# Title\n\nSome *em* and **bold** and `code|pipe` [out](https://x.org) "
                "[local](img/a.png).\n\n| a | b |\n| --- | ---: |\n| 1 \\| 2 | 3 |\n\n"
                "![a plot](img/a.png)\n\n> quoted **note**\n\n- one\n- two\n\n"
                "```text\n<script>alert(1)</script> | not a table\n```\n")
    html = report.markdown_to_html(markdown, tmp_path, "T")
    assert 'src="data:image/png;base64,' in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<td>1 | 2</td>" in html and '<td class="r">3</td>' in html
    assert '<a href="https://x.org">out</a>' in html and 'href="img/a.png"' not in html
    assert "<em>em</em>" in html and "<strong>bold</strong>" in html
    assert "<code>code|pipe</code>" in html and "<li>two</li>" in html
    assert "Content-Security-Policy" in html and 'id="title"' in html


def test_engine_section_reaches_teacher_and_eval_stages(tmp_path: Path) -> None:
    def stages(*overrides: str) -> dict[str, Stage]:
        return {s.name: s for s in plan(load_config(overrides=list(overrides)), tmp_path)}

    hf = stages()
    vllm = stages("engine.name=vllm", "engine.options={max_model_len: 1024}")
    served = stages("engine.name=vllm", "engine.options={max_model_len: 1024}",
                    "engine.base_url=http://127.0.0.1:8000")
    for name in ("teacher/none", "eval/base", "eval/kd-none"):
        assert stage_config(vllm[name]).engine == "vllm"
        assert stage_config(vllm[name]).engine_options == {"max_model_len": 1024}
    # base_url is the teacher's server: it never reaches an eval stage (issue 25 C)
    assert stage_config(served["teacher/none"]).base_url == "http://127.0.0.1:8000"
    assert stage_config(served["eval/base"]).base_url is None
    changed = {n for n in hf if hf[n].hash != vllm[n].hash}
    assert "teacher/none" in changed and "eval/base" in changed
    assert "students/sft" not in changed  # training does not generate
    assert served["teacher/none"].hash != vllm["teacher/none"].hash  # who answers is an input
    assert served["eval/base"].hash == vllm["eval/base"].hash
    with pytest.raises(PrimekdError, match="engine.*unknown vllm engine option"):
        load_config(overrides=["engine.name=vllm", "engine.options={max_len: 5}"])
    with pytest.raises(PrimekdError, match="`teacher.engine` is set by the experiment"):
        load_config(overrides=["teacher.engine=vllm"])


# --- sharded teachers and `run --only` ----------------------------------------------------------


def _sharded(tmp_path: Path, shards: int = 2) -> ExperimentConfig:
    return load_config(preset="quick", overrides=[
        f"teacher_shards={shards}", "strategies=[none]", "controls=[]", "attention.enabled=false"])


def test_sharded_teacher_plan_feeds_every_shard_to_the_student(tmp_path: Path) -> None:
    stages = {s.name: s for s in plan(_sharded(tmp_path), tmp_path)}
    shards = ["teacher/none/shard-0-of-2", "teacher/none/shard-1-of-2"]
    assert [n for n in stages if n.startswith("teacher/")] == shards
    assert [stage_config(stages[n]).shard for n in shards] == ["0/2", "1/2"]
    assert stages[shards[0]].hash != stages[shards[1]].hash
    student = stages["students/kd-none"]
    assert student.upstream == tuple(shards)
    assert stage_config(student).teacher_store == [
        str(tmp_path / "teacher" / "none" / f"shard-{i}-of-2") for i in range(2)]
    with pytest.raises(PrimekdError, match="teacher_shards"):
        load_config(preset="quick", overrides=["teacher_shards=0"])


def _fake_functions(calls: list[str]) -> dict:
    def fn(stage: Stage, progress: bool) -> dict:
        calls.append(stage.name)
        stage.directory.mkdir(parents=True, exist_ok=True)
        (stage.directory / ("manifest.json" if stage.kind == "teacher" else "summary.json")
         ).write_text(stage.hash)
        return {}
    return dict.fromkeys(("teacher", "distill", "eval", "attention", "report"), fn)


def test_run_only_runs_the_named_stages_after_their_upstream(tmp_path: Path) -> None:
    config, calls = _sharded(tmp_path), []
    functions = _fake_functions(calls)
    with pytest.raises(PrimekdError, match="students/kd-none needs teacher/none/shard-0-of-2"):
        run_experiment(config, tmp_path, False, stage_functions=functions,
                                  only=["students/*"])
    with pytest.raises(PrimekdError, match="--only teacher/nope names no stage"):
        run_experiment(config, tmp_path, False, stage_functions=functions,
                                  only=["teacher/nope"])
    assert calls == []
    run_experiment(config, tmp_path, False, stage_functions=functions,
                              only=["teacher/none/shard-1-of-2"])
    run_experiment(config, tmp_path, False, stage_functions=functions,
                              only=["teacher/*/shard-0-*", "students/kd-none"])
    assert calls == ["teacher/none/shard-1-of-2", "teacher/none/shard-0-of-2",
                     "students/kd-none"]
    summary = run_experiment(config, tmp_path, False, stage_functions=functions)
    assert [s.name for s in summary.stages if s.ran] == ["eval/kd-none", "report"]


def test_run_only_locks_per_stage(tmp_path: Path) -> None:
    a, b = ["teacher/none/shard-0-of-2"], ["teacher/none/shard-1-of-2"]
    with run_lock(tmp_path, only_stages=a):
        with run_lock(tmp_path, only_stages=b):  # other shards run side by side
            pass
        with pytest.raises(PrimekdError, match="running teacher/none/shard-0-of-2"), \
                run_lock(tmp_path, only_stages=a):
            pass
        with pytest.raises(PrimekdError, match="another `primekd run`"), \
                run_lock(tmp_path):
            pass
    with run_lock(tmp_path), pytest.raises(PrimekdError, match="another"), \
            run_lock(tmp_path, only_stages=b):
        pass


def test_changing_the_shard_count_clears_the_old_layout(tmp_path: Path) -> None:
    calls: list[str] = []
    functions = _fake_functions(calls)
    one = load_config(preset="quick", overrides=[
        "strategies=[none]", "controls=[]", "attention.enabled=false"])
    run_experiment(one, tmp_path, False, stage_functions=functions)
    (tmp_path / "teacher" / "none" / "mine.txt").write_text("the user's")
    assert (tmp_path / "teacher" / "none" / "manifest.json").exists()
    run_experiment(_sharded(tmp_path), tmp_path, False, stage_functions=functions)
    teacher = tmp_path / "teacher" / "none"
    assert sorted(p.name for p in teacher.iterdir()) == [  # the user's file stays
        "mine.txt", "shard-0-of-2", "shard-1-of-2"]
    assert not record_path(tmp_path, "teacher/none").exists()
    run_experiment(_sharded(tmp_path, 3), tmp_path, False, stage_functions=functions)
    assert sorted(p.name for p in teacher.iterdir() if p.is_dir()) == [
        f"shard-{i}-of-3" for i in range(3)]
