"""Issue 26: an unfinished teacher store, or a shard set short of a shard, is refused by
distill (and so by run and tune) in one line naming the command that finishes it; with
--allow-partial a student trains on what is there and the summary and report say so."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from primekd.core.errors import PrimekdError
from primekd.distill.config import DistillConfig, check_config
from primekd.teach import store
from primekd.teach.teacher import TeachConfig, teach

PRIMEKD = [sys.executable, "-c", "from primekd.cli import main; main()"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*PRIMEKD, *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def _killed_teach(model: Path, out: Path) -> None:
    """`teach --limit 16 --batch-size 2` SIGKILLed once its first part is on disk."""
    process = subprocess.Popen(
        [*PRIMEKD, "teach", "-m", str(model), "--out", str(out), "--limit", "16",
         "--batch-size", "2", "--max-new-tokens", "96", "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "part-00000.parquet").exists() and time.time() < deadline:
        assert process.poll() is None, "teach ended before its first part"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_a_killed_teach_is_refused_then_trained_on_with_allow_partial(tiny_model_dir, tmp_path):
    st = tmp_path / "store"
    _killed_teach(tiny_model_dir, st)
    manifest = json.loads((st / store.MANIFEST).read_text())
    rows = int(store.summed_stats(st)["rows"])  # the manifest may be one part behind
    assert manifest["complete"] is False and 0 < rows < 16

    args = ["distill", "-m", str(tiny_model_dir), "-s", str(st), "--max-steps", "1",
            "--device", "cpu", "--quiet", "--json"]
    refused = _cli(*args, "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert f"{st} is unfinished ({rows} of 16 answers" in lines[0]
    assert manifest["command"] in lines[0] and "--allow-partial" in lines[0]
    assert not (tmp_path / "refused").exists()  # refused before anything was written

    partial = _cli(*args, "--out", str(tmp_path / "partial"), "--allow-partial")
    assert partial.returncode == 0, partial.stderr[-2000:]
    data = json.loads(partial.stdout)["data"]
    assert data["partial"] is True
    assert (data["answered_rows"], data["planned_rows"], data["store_rows"]) == (rows, 16, rows)

    # the command the message names finishes the store
    finish = shlex.split(manifest["command"])
    assert finish[:2] == ["primekd", "teach"]
    done = _cli(*finish[1:])
    assert done.returncode == 0, done.stderr[-2000:]
    assert store.load_store(st).num_rows == 16


def test_a_lone_shard_is_refused_naming_the_missing_shard(tiny_model_dir, tmp_path):
    from primekd.core.models import load_tokenizer
    from primekd.distill.data import build_datasets

    s0 = tmp_path / "shard-0-of-2"
    teach(TeachConfig(teacher=str(tiny_model_dir), out=s0, limit=5, max_new_tokens=4,
                      batch_size=4, shard="0/2"), progress=False)
    config = DistillConfig(out=str(tmp_path / "d"), student=str(tiny_model_dir),
                           teacher_store=str(s0), max_steps=1)
    with pytest.raises(PrimekdError) as refused:
        check_config(config)
    message = str(refused.value)
    assert "shard(s) 1/2 of this 2-shard teach run are missing" in message
    assert f"--out {tmp_path / 'shard-1-of-2'} " in message and "--shard 1/2 " in message
    assert "\n" not in message
    with pytest.raises(PrimekdError, match="shard"):
        store.load_store(s0)  # the reader refuses too unless asked for what is there

    config.allow_partial = True
    check_config(config)
    info = build_datasets(config, load_tokenizer(str(tiny_model_dir))).info
    # shard 0 of 2 of five questions holds three; the run plans five
    assert (info["partial"], info["answered_rows"], info["planned_rows"]) == (True, 3, 5)


def test_a_store_stopped_early_is_refused_by_run_and_tune_readers(tmp_path):
    """The same check guards every reader that trains: run's distill stages and tune's
    validation split go through distill's data, which asks it."""
    from primekd.experiment.tune import TuneConfig, preflight, validation_questions

    st = tmp_path / "s"
    store.write_part(st, [], [("a", 0)], {"rows": 1, "kept": 0})
    store.write_manifest(st, {"format": store.FORMAT, "format_version": store.FORMAT_VERSION,
                              "params": {"shard": None}, "complete": False,
                              "counts": {"rows": 1, "expected_rows": 4, "kept": 0},
                              "command": "primekd teach --teacher t --out s"})
    config = DistillConfig(out=str(tmp_path / "d"), teacher_store=str(st), max_steps=1,
                           val_size=1)
    with pytest.raises(PrimekdError, match=r"1 of 4 answers.*`primekd teach --teacher t"):
        validation_questions(config)
    tune = TuneConfig(teacher_store=str(st), student="s", out=str(tmp_path / "tune"))
    with pytest.raises(PrimekdError, match=r"^incomplete teacher store: .*\(1 of 4 answers"):
        preflight(tune)  # named as the store's fault, before the search space is looked at


def test_the_report_counts_the_answers_of_a_partial_store(tmp_path):
    from primekd.experiment.report import Layout, _trained_on

    student = tmp_path / "students" / "kd-none"
    student.mkdir(parents=True)
    data = {"source": "teacher_store", "keep": "all", "store_rows": 2, "kept_rows": 2,
            "partial": True, "answered_rows": 2, "planned_rows": 16}
    (student / "summary.json").write_text(json.dumps({"data": data}))
    layout = Layout(tmp_path, students={"kd-none": student})
    assert _trained_on(layout, "kd-none") == \
        "2 teacher answers (all; PARTIAL store: 2 of 16 planned answers)"
    data["partial"] = False
    (student / "summary.json").write_text(json.dumps({"data": data}))
    assert _trained_on(layout, "kd-none") == "2 teacher answers (all)"
