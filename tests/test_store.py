from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from primekd.core.errors import PrimekdError
from primekd.teach import store


def _row(id_: str, sample: int = 0, n: int = 3, k: int = 2) -> dict:
    return {
        "id": id_, "sample": sample, "question": f"q {id_}", "reference": "x\n#### 1",
        "gold": 1.0, "teacher_prompt": f"primed q {id_}", "response": "1",
        "token_ids": list(range(n)),
        "topk_ids": [[t, t + 1][:k] for t in range(n)],
        "topk_logprobs": [[-0.1, -3.0][:k] for _ in range(n)],
        "finish_reason": "stop", "extracted": 1.0, "correct": True,
        "found_by": "fallback", "no_answer": None, "truncated": False, "correct_strict": False,
        "correct_flexible": True, "answer_text": "1", "token_char_ends": [1] * n,
    }


def _manifest(shard=None, top_k: int = 2, kept: int = 0, complete: bool = False) -> dict:
    params = {"teacher": "t", "strategy": {"name": "none"}, "top_k": top_k, "shard": shard}
    return {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, "params": params,
            "counts": {"kept": kept}, "complete": complete}


def _store(directory, rows, shard=None, dropped=()) -> None:
    keys = [(r["id"], r["sample"]) for r in rows] + list(dropped)
    store.write_part(directory, rows, keys, {"rows": len(keys), "kept": len(rows)})
    store.write_manifest(directory, _manifest(shard, kept=len(rows), complete=True))


def test_parts_roundtrip_with_schema_and_bookkeeping(tmp_path) -> None:
    first = store.write_part(tmp_path, [_row("a"), _row("b")], [("a", 0), ("b", 0), ("c", 0)],
                             {"rows": 3, "kept": 2, "seconds": 1.5})
    second = store.write_part(tmp_path, [_row("d")], [("d", 0)], {"rows": 1, "kept": 1})
    store.write_manifest(tmp_path, _manifest(kept=3, complete=True))
    assert (first.name, second.name) == ("part-00000.parquet", "part-00001.parquet")
    assert store.done_keys(tmp_path) == {("a", 0), ("b", 0), ("c", 0), ("d", 0)}
    assert store.summed_stats(tmp_path) == {"rows": 4, "kept": 3, "seconds": 1.5}
    table = store.load_store(tmp_path)
    assert table.schema.equals(store.SCHEMA)
    assert table["id"].to_pylist() == ["a", "b", "d"]
    assert table.slice(0, 1).to_pylist()[0] == {**_row("a"), "topk_logprobs": [
        pytest.approx([-0.1, -3.0])] * 3}
    assert store.load_store(tmp_path, columns=["id"]).column_names == ["id"]
    assert [r["id"] for r in store.iter_store_rows(tmp_path, columns=["id"])] == ["a", "b", "d"]
    store.validate_store(tmp_path)


def test_readable_by_datasets(tmp_path) -> None:
    from datasets import load_dataset

    _store(tmp_path, [_row("a"), _row("b", n=5)])
    empty = store.write_part(tmp_path, [], [("c", 0)], {"rows": 1, "kept": 0})  # all dropped
    assert empty.name == "part-00001.empty.json"
    assert ("c", 0) in store.done_keys(tmp_path)
    assert store.next_part_path(tmp_path).name == "part-00002.parquet"
    dataset = load_dataset("parquet", data_files=str(tmp_path / store.PART_GLOB),
                           split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert dataset["id"] == ["a", "b"]
    assert dataset[1]["topk_logprobs"][4] == pytest.approx([-0.1, -3.0])


def test_a_killed_writer_leaves_no_visible_part(tmp_path) -> None:
    (tmp_path / ".part-00000.parquet.tmp").write_bytes(b"half a file")
    assert store.part_files(tmp_path) == []
    store.clean_temp_files(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_several_shard_stores_load_as_one(tmp_path) -> None:
    a, b = tmp_path / "s0", tmp_path / "s1"
    _store(a, [_row("a"), _row("c")], shard={"index": 0, "count": 2})
    _store(b, [_row("b")], shard={"index": 1, "count": 2})
    assert sorted(store.load_store([a, b])["id"].to_pylist()) == ["a", "b", "c"]
    with pytest.raises(PrimekdError, match="same shard was given twice"):
        store.load_store([a, a])
    other = tmp_path / "other"
    _store(other, [_row("z")], shard={"index": 1, "count": 2})
    manifest = json.loads((other / store.MANIFEST).read_text())
    manifest["params"]["top_k"] = 5
    store.write_manifest(other, manifest)
    with pytest.raises(PrimekdError, match=r"not shards of the same teach run \(top_k: 2 -> 5\)"):
        store.load_store([a, other])


def test_manifest_and_shape_errors_are_clear(tmp_path) -> None:
    with pytest.raises(PrimekdError, match="does not exist"):
        store.read_manifest(tmp_path / "nope")
    with pytest.raises(PrimekdError, match="not a teacher store"):
        store.read_manifest(tmp_path)
    store.write_manifest(tmp_path, {**_manifest(), "format_version": 99})
    with pytest.raises(PrimekdError, match="format version 99"):
        store.read_manifest(tmp_path)
    store.write_manifest(tmp_path, _manifest(top_k=3))
    store.write_part(tmp_path, [_row("a")], [("a", 0)], {})
    with pytest.raises(PrimekdError, match="without 3 ids"):
        store.validate_store(tmp_path)
    with pytest.raises(PrimekdError, match="unknown store column"):
        store.load_store(tmp_path, columns=["logits"])
    with pytest.raises(PrimekdError, match="incomplete"):
        store.load_store(tmp_path, require_complete=True)


def test_foreign_parquet_is_not_taken_for_a_part(tmp_path) -> None:
    import pyarrow as pa

    pq.write_table(pa.table({"x": [1]}), tmp_path / "part-00000.parquet")
    with pytest.raises(PrimekdError, match="not a primekd teacher-store part"):
        store.done_keys(tmp_path)


def test_second_writer_is_refused(tmp_path) -> None:
    with store.locked(tmp_path), pytest.raises(PrimekdError, match="another"), \
            store.locked(tmp_path):
        pass


def test_identity_changes_name_the_nested_key() -> None:
    old = {"generation": {"temperature": 0.0, "max_new_tokens": 8}, "top_k": 20}
    new = {"generation": {"temperature": 0.7, "max_new_tokens": 8}, "top_k": 20}
    assert store.identity_changes(old, new) == ["generation.temperature: 0.0 -> 0.7"]
    assert store.identity_changes(old, old) == []


def test_a_missing_shard_is_refused_and_shards_merge_their_manifests(tmp_path) -> None:
    dirs = [tmp_path / f"s{i}" for i in range(3)]
    for i, d in enumerate(dirs):
        _store(d, [_row(f"q{i}"), _row(f"r{i}")], shard={"index": i, "count": 3})
        manifest = json.loads((d / store.MANIFEST).read_text())
        manifest["counts"] |= {"rows": 2, "correct": i, "questions": 2}
        manifest |= {"mean_answer_tokens": 10.0 * (i + 1), "compute_seconds": 1.0,
                     "teacher_accuracy": i / 2}
        store.write_manifest(d, manifest)
    with pytest.raises(PrimekdError, match=r"shard\(s\) 1/3 of this 3-shard teach run"):
        store.load_store([dirs[0], dirs[2]])
    merged = store.merged_manifest(dirs)
    assert merged["counts"] == {"kept": 6, "rows": 6, "correct": 3, "questions": 6}
    assert merged["teacher_accuracy"] == 0.5
    assert merged["mean_answer_tokens"] == pytest.approx(20.0)
    assert merged["tokens_per_s"] == pytest.approx(40.0)  # 120 tokens in 3 s
    assert merged["complete"] and "shard" not in merged["params"]


GRADING_COLUMNS = ["found_by", "no_answer", "truncated", "correct_strict", "correct_flexible"]


def test_parts_written_before_the_grading_columns_still_load(tmp_path) -> None:
    import pyarrow.parquet as pq

    old = store.write_part(tmp_path, [_row("a")], [("a", 0)], {"rows": 1, "kept": 1})
    table = pq.read_table(old)
    pq.write_table(table.drop_columns(GRADING_COLUMNS), old)  # keeps the batch metadata
    store.write_part(tmp_path, [_row("b")], [("b", 0)], {"rows": 1, "kept": 1})
    store.write_manifest(tmp_path, _manifest(kept=2, complete=True))
    loaded = store.load_store(tmp_path)
    assert loaded.schema.equals(store.SCHEMA)
    assert loaded["found_by"].to_pylist() == [None, "fallback"]
    assert store.load_store(tmp_path, columns=["correct_strict"])[
        "correct_strict"].to_pylist() == [None, False]


def test_merged_shard_manifests_sum_truncation_and_weigh_strict_accuracy(tmp_path) -> None:
    dirs = [tmp_path / f"s{i}" for i in range(2)]
    for i, d in enumerate(dirs):
        _store(d, [_row(f"q{i}"), _row(f"r{i}")], shard={"index": i, "count": 2})
        manifest = json.loads((d / store.MANIFEST).read_text())
        manifest["counts"] |= {"rows": 2 + 2 * i}
        manifest |= {"truncated": i + 1, "no_number": i, "truncation_rate": (i + 1) / (2 + 2 * i),
                     "teacher_accuracy_strict": 0.5 * i, "teacher_accuracy_flexible": 1.0}
        store.write_manifest(d, manifest)
    merged = store.merged_manifest(dirs)
    assert (merged["truncated"], merged["no_number"]) == (3, 1)
    assert merged["truncation_rate"] == pytest.approx(3 / 6)
    assert merged["teacher_accuracy_strict"] == pytest.approx(2 / 6)
    assert merged["teacher_accuracy_flexible"] == pytest.approx(1.0)
