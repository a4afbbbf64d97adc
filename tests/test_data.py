from __future__ import annotations

import json

import pytest

from primekd.core.data import load_examples
from primekd.core.errors import PrimekdError


def test_bundled_splits_have_gsm8k_sizes() -> None:
    assert len(load_examples("test")) == 1319
    assert len(load_examples("train")) == 7473


def test_ids_are_stable_and_gold_parsed() -> None:
    first = load_examples("test", limit=2)
    assert [e.id for e in first] == ["test-00000", "test-00001"]
    assert first[0].gold == 18.0
    assert load_examples("test", offset=1, limit=1)[0] == first[1]


def test_sample_is_seeded() -> None:
    a = load_examples("test", sample=5, seed=3)
    assert a == load_examples("test", sample=5, seed=3)
    assert a != load_examples("test", sample=5, seed=4)


def test_custom_jsonl_and_errors(tmp_path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    (example,) = load_examples(str(path))
    assert example.id == "mine-00000" and example.gold == 2.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x"}) + "\n")
    with pytest.raises(PrimekdError, match="question"):
        load_examples(str(bad))
    with pytest.raises(PrimekdError, match="neither"):
        load_examples(str(tmp_path / "absent.jsonl"))
    with pytest.raises(PrimekdError, match="no questions"):
        load_examples("test", offset=5000)


def test_atomic_write_uses_normal_file_mode(tmp_path) -> None:
    import os

    from primekd.core.io import atomic_write_text, read_json, write_json

    write_json(tmp_path / "m.json", {"a": 1})
    assert read_json(tmp_path / "m.json") == {"a": 1}
    mask = os.umask(0)
    os.umask(mask)
    atomic_write_text(tmp_path / "t.txt", "x")
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_read_yaml_errors_are_one_line(tmp_path) -> None:
    from primekd.core.io import read_yaml

    assert read_yaml(_write(tmp_path / "ok.yaml", "a: 1\n")) == {"a": 1}
    with pytest.raises(PrimekdError, match="strategies file .* does not exist"):
        read_yaml(tmp_path / "absent.yaml", "strategies file")
    with pytest.raises(PrimekdError, match="not valid YAML") as error:
        read_yaml(_write(tmp_path / "bad.yaml", "a: [1,\n  b: {\n"), "config file")
    assert "\n" not in str(error.value)


def _write(path, text: str):
    path.write_text(text)
    return path
