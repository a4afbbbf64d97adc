"""Issue 26: a full disk under eval, teach, distill and a run stage is one line and exit 2,
naming the path, the free space and the stage's estimate; a stage that clearly cannot fit
is refused before it starts; after space is freed the rerun completes with the results of
an undisturbed run (nothing half-written is trusted).

Each test mounts a small tmpfs (root and `mount` needed, as in CI; skipped elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from primekd.core import diskspace

PRIMEKD = [sys.executable, "-c", "from primekd.cli import main; main()"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class SmallDisk:
    """A tmpfs at `path`: `leave(n)` fills it until about n bytes are free; `grow()` frees."""

    def __init__(self, path: Path, size_kb: int):
        self.path, self.filler = path, path / "filler"
        path.mkdir(parents=True, exist_ok=True)
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                                str(path)], capture_output=True, text=True)
        if mount.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}")

    def leave(self, free: int) -> None:
        self.filler.unlink(missing_ok=True)
        fill = max(diskspace.free_bytes(self.path) - free, 0)
        with open(self.filler, "wb") as f:
            if fill:
                os.posix_fallocate(f.fileno(), 0, fill)
        assert abs(diskspace.free_bytes(self.path) - free) <= 8192

    def grow(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def disk(tmp_path):
    disks: list[SmallDisk] = []

    def make(size_kb: int = 4096) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"fs{len(disks)}", size_kb))
        return disks[-1]

    yield make
    for d in disks:
        d.unmount()


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*PRIMEKD, *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith(("generating", "teacher"))]  # progress bars left behind
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def _no_temp_files(directory: Path) -> None:
    """No half-written file is left where a rerun would look (atomic writers' temp names)."""
    left = [p for p in directory.rglob("*") if ".tmp" in p.name]
    assert not left, left


# --- eval ------------------------------------------------------------------------------------


def _eval(model: Path, out: Path) -> list[str]:
    return ["eval", "-m", str(model), "--data", "train", "--limit", "12", "--out", str(out),
            "--max-new-tokens", "160", "--batch-size", "1", "--device", "cpu"]


def _eval_need(out: Path) -> diskspace.Need:
    from primekd.core.data import load_examples
    from primekd.evaluate.evaluator import EvalConfig, results_need

    config = EvalConfig(model="m", out=out, data="train", limit=12, max_new_tokens=160)
    return results_need(config, load_examples("train", 12), out)


@pytest.mark.slow
def test_eval_on_a_full_disk(tiny_model_dir, tmp_path, disk):
    whole = tmp_path / "whole"
    assert _cli(*_eval(tiny_model_dir, whole)).returncode == 0

    fs = disk()
    out = fs.path / "eval"
    fs.leave(0)  # to the brim: refused before anything is written
    line = _one_line(_cli(*_eval(tiny_model_dir, out)))
    assert line.startswith(f"error: not enough space for {out}: ")
    assert "eval (12 answers x up to 160 tokens) needs about" in line
    assert not out.exists()

    need = _eval_need(out)
    fs.leave(need.floor + 4096)  # starts, and runs out of space part of the way
    line = _one_line(_cli(*_eval(tiny_model_dir, out)))
    assert "error: no space left on device writing " + str(out) in line
    assert " free there; eval (" in line and "rerun the same command" in line
    _no_temp_files(out)

    fs.grow()
    again = _cli(*_eval(tiny_model_dir, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "results.jsonl").read_bytes() == (whole / "results.jsonl").read_bytes()


# --- teach -----------------------------------------------------------------------------------


def _teach(model: Path, out: Path) -> list[str]:
    return ["teach", "-m", str(model), "--out", str(out), "--limit", "8", "--batch-size", "1",
            "--max-new-tokens", "64", "--top-k", "4", "--device", "cpu"]


@pytest.mark.slow
def test_teach_on_a_full_disk(tiny_model_dir, tmp_path, disk):
    from primekd.teach import store

    whole = tmp_path / "whole"
    assert _cli(*_teach(tiny_model_dir, whole)).returncode == 0

    fs = disk()
    out = fs.path / "store"
    fs.leave(0)
    line = _one_line(_cli(*_teach(tiny_model_dir, out)))
    assert line.startswith(f"error: not enough space for {out}: ")
    assert "teach (8 answers x up to 64 tokens x top-4) needs about" in line
    assert not out.exists()

    # room above the floor (answers of 16 tokens) for about three of the 8 parts the tiny
    # model writes (all 64 tokens each), in tmpfs's 4 KiB pages, plus the manifest
    part = max(p.stat().st_size for p in store.part_files(whole))
    fs.leave(max(3 * (part // 4096 + 1) * 4096, 8 * (16 * (4 * 7 + 23) + 1024)) + 8192)
    line = _one_line(_cli(*_teach(tiny_model_dir, out)))
    assert "error: no space left on device writing " + str(out) in line
    assert "teach (8 answers" in line
    _no_temp_files(out)
    assert 0 < len(store.part_files(out)) < 8  # the finished parts are kept, whole

    fs.grow()
    again = _cli(*_teach(tiny_model_dir, out))
    assert again.returncode == 0, again.stderr[-3000:]
    rows = store.load_store(out).sort_by([("id", "ascending")]).to_pylist()
    assert rows == store.load_store(whole).sort_by([("id", "ascending")]).to_pylist()


# --- distill ---------------------------------------------------------------------------------


def _distill(model: Path, st: Path, out: Path) -> list[str]:
    return ["distill", "-m", str(model), "-s", str(st), "--out", str(out), "--max-steps", "3",
            "--save-steps", "1", "--batch-size", "2", "--device", "cpu", "--quiet"]


@pytest.mark.slow
def test_distill_on_a_full_disk(tiny_model_dir, tmp_path, disk):
    import torch
    from safetensors.torch import load_file

    from primekd.distill.footprint import CHECKPOINT_EXTRA, tokenizer_bytes

    st = tmp_path / "store"
    assert _cli(*_teach(tiny_model_dir, st)).returncode == 0
    whole = tmp_path / "whole"
    done = _cli(*_distill(tiny_model_dir, st, whole))
    assert done.returncode == 0, done.stderr[-3000:]

    fs = disk()
    out = fs.path / "student"
    fs.leave(0)  # refused once the student is built, before it trains
    line = _one_line(_cli(*_distill(tiny_model_dir, st, out)))
    assert f"not enough space for {out}: " in line and "distill (the adapter: " in line
    assert "3 checkpoint(s)) needs about" in line

    adapter = sum(p.stat().st_size for p in whole.glob("adapter_model.safetensors"))
    floor = adapter + tokenizer_bytes(tiny_model_dir) + CHECKPOINT_EXTRA
    fs.leave(floor + 16384)  # the final adapter fits, its checkpoints do not
    line = _one_line(_cli(*_distill(tiny_model_dir, st, out)))
    assert "error: no space left on device writing " + str(out) in line
    assert "rerun it with --resume" in line
    _no_temp_files(out)
    checkpoints = out / "checkpoints"
    for checkpoint in checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else []:
        assert (checkpoint / "primekd_run_totals.json").exists()  # only whole ones stay

    fs.grow()
    again = _cli(*_distill(tiny_model_dir, st, out), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# --- a run stage -----------------------------------------------------------------------------


def _run_config(model: Path) -> str:
    return f"""
name: tiny
models: {{teacher: {model}, student: {model}}}
data:
  transfer: {{split: train, limit: 6}}
  test: {{split: test, limit: 6}}
strategies: [none]
controls: []
teacher: {{max_new_tokens: 64, batch_size: 1, top_k: 4}}
distill: {{max_steps: 1, batch_size: 2, lora_r: 2, lora_alpha: 4}}
eval: {{max_new_tokens: 96, batch_size: 1}}
attention: {{enabled: false}}
"""


@pytest.mark.slow
def test_a_run_stage_on_a_full_disk(tiny_model_dir, tmp_path, disk):
    config = tmp_path / "tiny.yaml"
    config.write_text(_run_config(tiny_model_dir))
    whole = tmp_path / "whole"
    done = _cli("run", str(config), "--out", str(whole))
    assert done.returncode == 0, done.stderr[-3000:]

    fs = disk(2048)
    out = fs.path / "run"
    fs.leave(32 << 10)  # config and data fit, the teacher's parts run out of room
    line = _one_line(_cli("run", str(config), "--out", str(out)))
    assert line.startswith("error: teacher/none: no space left on device writing ")
    assert "teach (6 answers" in line and "rerun the same command" in line
    _no_temp_files(out)

    fs.grow()
    again = _cli("run", str(config), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("eval/kd-none/results.jsonl", "eval/kd-none/summary.json"):
        a, b = (json.loads(line) for line in ((whole / name).read_text(),
                                               (out / name).read_text())) \
            if name.endswith(".json") else ((whole / name).read_bytes(), (out / name).read_bytes())
        if isinstance(a, dict):
            assert (a["n"], a["correct"]) == (b["n"], b["correct"])
        else:
            assert a == b
    shutil.rmtree(out)


# --- the writers and the detection -----------------------------------------------------------


def test_writers_leave_nothing_half_written_on_a_full_disk(disk):
    import errno

    from primekd.core.io import append_jsonl, atomic_write_text, read_jsonl

    fs = disk(256)
    results, record = fs.path / "results.jsonl", fs.path / "summary.json"
    append_jsonl(results, [{"id": "a", "response": "x"}])
    atomic_write_text(record, "old\n")
    fs.leave(0)
    with pytest.raises(OSError) as appended:
        append_jsonl(results, [{"id": str(i), "response": "y" * 4000} for i in range(64)])
    assert appended.value.errno == errno.ENOSPC and appended.value.filename == str(results)
    assert read_jsonl(results) == [{"id": "a", "response": "x"}]  # truncated back
    with pytest.raises(OSError) as written:
        atomic_write_text(record, "new\n" * 100_000)
    assert written.value.filename == str(record)
    assert record.read_text() == "old\n"
    assert sorted(p.name for p in fs.path.iterdir()) == ["filler", "results.jsonl",
                                                          "summary.json"]
    line = diskspace.message(written.value)
    assert line.startswith(f"no space left on device writing {record}: ")
    assert " free there; free some space" in line


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    OSError(122, "Disk quota exceeded"),
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left"),
    Exception("(sqlite3.OperationalError) database or disk is full"),
])
def test_full_disk_errors_are_recognised(error):
    assert diskspace.is_full(error)
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = error
    assert diskspace.is_full(wrapped)


def test_other_errors_are_not_taken_for_a_full_disk():
    assert not diskspace.is_full(OSError(13, "Permission denied"))
    assert not diskspace.is_full(ValueError("28 questions"))


def test_quota_is_named_as_such():
    error = OSError(122, "Disk quota exceeded", "/x/y")
    assert diskspace.message(error).startswith("disk quota exceeded writing /x/y")
