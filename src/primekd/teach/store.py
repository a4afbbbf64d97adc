"""The teacher store: a directory of `manifest.json` and `part-NNNNN.parquet` shards.

One row per (question, sample): the bare question, the teacher's answer tokens and, for
every answer token, the top-k token ids with their full-vocabulary log-probabilities at
temperature 1 (not renormalised; the mass outside the top k is 1 - sum(exp(topk_logprobs))),
and the answer text with every token's character span in it (`answer_text`,
`token_char_ends`: what a student of another tokenizer aligns on; see teach.spans).

Crash safety: each finished batch becomes one part, written to a temp file and renamed, so a
part is either whole or absent. Every part also records, in its Parquet metadata, all the
(id, sample) keys its batch finished, including rows dropped by `--keep correct`, and the
batch's counts; a batch that kept no rows leaves that record as `part-NNNNN.empty.json`
instead (zero-row Parquet files trip up `datasets`). These batch records are the only source
of truth: a rerun reads the done keys from them, and the manifest's counts are recomputed
from them.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  pa.compute
import pyarrow.parquet as pq

from primekd.core.errors import PrimekdError
from primekd.core.io import atomic_write, read_json, write_json
from primekd.core.outdir import locked as locked_directory
from primekd.teach import coverage

FORMAT = "primekd-teacher-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PART_GLOB = "part-*.parquet"
EMPTY_GLOB = "part-*.empty.json"  # a batch that kept no rows: its record, without a part
_META_KEY = b"primekd.batch"

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("sample", pa.int32()),
        ("question", pa.string()),  # bare, as the student will see it
        ("reference", pa.string()),
        ("gold", pa.float64()),
        ("teacher_prompt", pa.string()),  # the exact text the teacher read, prefill included
        ("response", pa.string()),  # text of token_ids (what came after the prefill)
        ("token_ids", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("finish_reason", pa.string()),  # stop | length | reference
        ("extracted", pa.float64()),
        ("correct", pa.bool_()),  # under the store's grading rule (see grading.grade)
        # how the answer was graded; stores written before these columns read them as null
        ("found_by", pa.string()),  # marker kind, "fallback", or null (no number)
        ("no_answer", pa.string()),  # "no_number" | "truncated" | null
        ("truncated", pa.bool_()),  # null for reference targets
        ("correct_strict", pa.bool_()),
        ("correct_flexible", pa.bool_()),
        # for students of another tokenizer (teach.spans); null in stores written before
        ("answer_text", pa.string()),  # token_ids decoded, specials skipped, no clean-up
        ("token_char_ends", pa.list_(pa.int32())),  # per token: its end offset in answer_text
    ]
)
COLUMNS = tuple(SCHEMA.names)


# ---------------------------------------------------------------- writing


@contextmanager
def locked(directory: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on a store directory (released by the OS if we are killed)."""
    with locked_directory(directory, "teach"):
        yield


def part_files(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob(PART_GLOB))


def clean_temp_files(directory: str | Path) -> None:
    """Remove half-written parts left by a killed writer."""
    for pattern in (".part-*.tmp*", f".{MANIFEST}.*.tmp*"):
        for tmp in Path(directory).glob(pattern):
            tmp.unlink(missing_ok=True)


def next_part_path(directory: str | Path) -> Path:
    names = [p.name for p in [*part_files(directory), *Path(directory).glob(EMPTY_GLOB)]]
    index = max((int(name.split(".")[0].split("-")[-1]) for name in names), default=-1) + 1
    return Path(directory) / f"part-{index:05d}.parquet"


def write_part(
    directory: str | Path,
    rows: Sequence[dict[str, Any]],
    done_keys: Sequence[tuple[str, int]],
    stats: dict[str, Any],
) -> Path:
    """Write one batch atomically: `rows` (the kept ones), all `done_keys`, and its stats."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = next_part_path(directory)
    meta = {"done": [list(key) for key in done_keys], "stats": stats}
    if not rows:
        empty = path.with_name(path.name.replace(".parquet", ".empty.json"))
        write_json(empty, meta)
        return empty
    table = pa.Table.from_pylist(list(rows), schema=SCHEMA)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    write_json(Path(directory) / MANIFEST, manifest)


# ---------------------------------------------------------------- bookkeeping


def part_metadata(path: str | Path) -> dict[str, Any]:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise PrimekdError(f"{path} is not a readable Parquet part (truncated or corrupt: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           "delete it and rerun the teach command to redo its batch") from None
    if _META_KEY not in metadata:
        raise PrimekdError(f"{path} is not a primekd teacher-store part (no batch metadata)")
    return json.loads(metadata[_META_KEY])


def batch_records(directory: str | Path) -> list[dict[str, Any]]:
    """The {done, stats} record of every finished batch, from parts and empty markers."""
    records = [part_metadata(path) for path in part_files(directory)]
    records += [read_json(path) for path in sorted(Path(directory).glob(EMPTY_GLOB))]
    return records


def done_keys(directory: str | Path) -> set[tuple[str, int]]:
    """Every (id, sample) some batch has finished, kept or dropped."""
    return {(str(i), int(s)) for record in batch_records(directory) for i, s in record["done"]}


def summed_stats(directory: str | Path) -> dict[str, float]:
    """The per-batch stats of all batches, added up."""
    total: dict[str, float] = {}
    for record in batch_records(directory):
        for key, value in record["stats"].items():
            total[key] = total.get(key, 0) + value
    return total


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two `params` dicts (empty when they match)."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    return [
        f"{key}: {_short(old_flat.get(key))} -> {_short(new_flat.get(key))}"
        for key in sorted(set(old_flat) | set(new_flat))
        if old_flat.get(key) != new_flat.get(key)
    ]


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- reading


def stage_stores(directory: str | Path) -> list[Path]:
    """The stores of a teacher stage's directory: itself, or, where it has no manifest of its
    own, its shards (`shard-*` with a manifest, written by `teacher_shards`)."""
    directory = Path(directory)
    shards = sorted(p for p in directory.glob("shard-*") if (p / MANIFEST).exists())
    return [directory] if (directory / MANIFEST).exists() or not shards else shards


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The store's manifest, checked for format and version."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PrimekdError(f"teacher store {directory} does not exist")
    if not (directory / MANIFEST).exists():
        raise PrimekdError(f"{directory} is not a teacher store (no {MANIFEST})")
    manifest = read_json(directory / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PrimekdError(f"{directory / MANIFEST} is not a primekd teacher-store manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PrimekdError(
            f"{directory} has store format version {manifest.get('format_version')}; "
            f"this primekd reads version {FORMAT_VERSION}"
        )
    return manifest


def load_store(
    directories: str | Path | Sequence[str | Path],
    columns: Sequence[str] | None = None,
    require_complete: bool = True,
) -> pa.Table:
    """All rows of one store, or of several shard stores of the same run, as one table.

    `require_complete` (the default): refuse an unfinished store and a shard set with a shard
    missing (a lone shard included), naming what is missing (`primekd.teach.coverage`);
    False reads what is there."""
    dirs = _as_list(directories)
    manifests = [read_manifest(d) for d in dirs]
    check_compatible(dirs, manifests)
    _check_columns(columns)
    if require_complete:
        coverage.require_complete(store_coverage(dirs, manifests))
    read = None if columns is None else \
        [*columns, *(c for c in ("id", "sample") if c not in columns)]
    tables = []
    for d, manifest in zip(dirs, manifests, strict=True):
        parts = [_read_part(p, read) for p in part_files(d)]
        _check_count(d, manifest, sum(t.num_rows for t in parts))
        tables += parts
    if not tables:
        return SCHEMA.empty_table().select(list(columns or COLUMNS))
    table = _with_all_columns(pa.concat_tables(tables, promote_options="default"),
                              columns).replace_schema_metadata(None)
    _check_unique(table, dirs)
    return table if columns is None else table.select(list(columns))


def store_coverage(dirs: Sequence[Path], manifests: Sequence[dict[str, Any]]
                   ) -> coverage.Coverage:
    """The answers the stores hold of those their teach run planned, and what is missing."""
    answered = [summed_stats(d).get("rows") for d in dirs]  # the batch records decide
    return coverage.coverage(dirs, manifests, answered)


def training_coverage(directories: Sequence[str | Path], allow_partial: bool
                      ) -> coverage.Coverage:
    """The coverage of the stores a student trains on: an unfinished store or a missing
    shard is refused unless `allow_partial` (distill's --allow-partial)."""
    dirs = _as_list(directories)
    manifests = [read_manifest(d) for d in dirs]
    check_compatible(dirs, manifests)
    found = store_coverage(dirs, manifests)
    if allow_partial:
        return found
    return coverage.require_complete(found, "or pass --allow-partial to train on the "
                                     "answers there")


def store_directories(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """The store directories a `--teacher-store` value names: one directory, several
    (the shards of one `teach --shard i/n` run), or a glob such as `teacher/shard-*`."""
    specs = [spec] if isinstance(spec, str | Path) else list(spec)
    if not specs:
        raise PrimekdError("no teacher store directories given")
    dirs: list[Path] = []
    for item in map(str, specs):
        if glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item) if Path(m).is_dir())
            if not matches:
                raise PrimekdError(f"teacher store pattern {item} matches no directory")
            dirs += matches
        else:
            dirs.append(Path(item))
    for d in dirs:
        if not d.is_dir():
            raise PrimekdError(f"teacher store {d} does not exist (run `primekd teach` first)")
    return list(dict.fromkeys(dirs))


def _read_part(path: Path, columns: Sequence[str] | None) -> pa.Table:
    try:
        if columns is not None:  # a part written before a column existed lacks it
            present = set(pq.read_schema(path).names)
            columns = [c for c in columns if c in present]
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise PrimekdError(f"{path} is not a readable Parquet part (truncated or corrupt: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           "delete it and rerun the teach command to redo its batch") from None


def _check_count(directory: Path, manifest: dict[str, Any], rows: int) -> None:
    """A complete store's parts hold exactly the rows its manifest counted (a part lost or
    copied in twice changes that)."""
    kept = (manifest.get("counts") or {}).get("kept")
    if manifest.get("complete") and kept is not None and kept != rows:
        raise PrimekdError(f"{directory / MANIFEST} counts {kept} rows but the parts in "
                           f"{directory} hold {rows}: a part is missing or duplicated")


def iter_store_rows(
    directories: str | Path | Sequence[str | Path],
    columns: Sequence[str] | None = None,
    batch_size: int = 256,
) -> Iterator[dict[str, Any]]:
    """Rows one at a time as dicts, reading one record batch of one part at a time."""
    dirs = _as_list(directories)
    check_compatible(dirs, [read_manifest(d) for d in dirs])
    _check_columns(columns)
    for d in dirs:
        for path in part_files(d):
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
                yield from batch.to_pylist()


def check_compatible(dirs: Sequence[Path], manifests: Sequence[dict[str, Any]]) -> None:
    """Several stores load together only as shards of one run (same params but the shard)."""
    if len(manifests) < 2:
        return
    first = _unsharded_params(manifests[0])
    for d, manifest in zip(dirs[1:], manifests[1:], strict=True):
        changes = identity_changes(first, _unsharded_params(manifest))
        if changes:
            raise PrimekdError(
                f"{d} and {dirs[0]} are not shards of the same teach run "
                f"({'; '.join(changes)})"
            )
    shards = [json.dumps(m["params"].get("shard")) for m in manifests]
    if len(set(shards)) != len(shards):
        raise PrimekdError("the same shard was given twice: " + ", ".join(map(str, dirs)))
    _check_chat_dates(dirs, manifests)


def _check_chat_dates(dirs: Sequence[Path], manifests: Sequence[dict[str, Any]]) -> None:
    """Shards started on different days pinned different dates; that matters only where the
    teacher's chat template writes the date into its prompts (Llama 3.x)."""
    dates = {m.get("chat_date") for m in manifests} - {None}
    if len(dates) < 2:
        return
    for directory, manifest in zip(dirs, manifests, strict=True):
        date, parts = manifest.get("chat_date"), part_files(directory)
        if not date or not parts:
            continue
        prompts = _read_part(parts[0], ["teacher_prompt"]).column("teacher_prompt")
        if any(date in (text or "") for text in prompts.to_pylist()[:8]):
            raise PrimekdError(
                f"the shards' teacher prompts carry different dates ({', '.join(sorted(dates))}"
                f"): the teacher's chat template writes the day each shard started; redo the "
                f"shards whose date differs from {directory}'s (delete them and rerun)")


def validate_store(directory: str | Path) -> dict[str, Any]:
    """Check a store end to end (manifest, schema, shapes, counts); return its manifest."""
    manifest = read_manifest(directory)
    table = load_store(directory, require_complete=False)
    top_k = manifest["params"]["top_k"]
    for row in table.select(["id", "token_ids", "topk_ids", "topk_logprobs"]).to_pylist():
        n = len(row["token_ids"])
        if len(row["topk_ids"]) != n or len(row["topk_logprobs"]) != n:
            raise PrimekdError(f"{directory}: row {row['id']} has top-k for "
                               f"{len(row['topk_ids'])} of {n} answer tokens")
        if any(len(ids) != top_k for ids in row["topk_ids"]):
            raise PrimekdError(f"{directory}: row {row['id']} has a position without {top_k} ids")
    keys = list(zip(table["id"].to_pylist(), table["sample"].to_pylist(), strict=True))
    if len(set(keys)) != len(keys):
        raise PrimekdError(f"{directory}: duplicate (id, sample) rows")
    if manifest.get("complete") and manifest["counts"]["kept"] != len(keys):
        raise PrimekdError(f"{directory}: manifest counts {manifest['counts']['kept']} kept "
                           f"rows but the parts hold {len(keys)}")
    return manifest


def merged_manifest(directories: Sequence[str | Path]) -> dict[str, Any]:
    """One manifest for the shards of a teach run: counts and compute summed, rates and
    accuracy recomputed over all rows. A single directory's manifest is returned unchanged."""
    dirs = [Path(d) for d in directories]
    manifests = [read_manifest(d) for d in dirs]
    if len(manifests) == 1:
        return manifests[0]
    check_compatible(dirs, manifests)
    merged = {k: v for k, v in manifests[0].items() if k != "shard"}
    merged["params"] = _unsharded_params(manifests[0])
    counts: dict[str, int] = {}
    for manifest in manifests:
        for key, value in manifest.get("counts", {}).items():
            if isinstance(value, int):
                counts[key] = counts.get(key, 0) + value
    merged["counts"] = counts
    rows = counts.get("rows", 0)
    tokens = sum((m.get("mean_answer_tokens") or 0) * m["counts"].get("rows", 0)
                 for m in manifests)
    seconds = sum(m.get("compute_seconds") or 0 for m in manifests)
    merged["mean_answer_tokens"] = tokens / rows if rows else None
    merged["compute_seconds"] = round(seconds, 3)
    merged["tokens_per_s"] = round(tokens / seconds, 2) if seconds else None
    if manifests[0].get("teacher_accuracy") is not None:
        merged["teacher_accuracy"] = counts.get("correct", 0) / rows if rows else None
    for key in ("truncated", "no_number", "restated", "looping"):  # absent in older stores
        if all(isinstance(m.get(key), int) for m in manifests):
            merged[key] = sum(m[key] for m in manifests)
    for key in ("teacher_accuracy_strict", "teacher_accuracy_flexible", "truncation_rate",
                "restated_rate"):
        if rows and all(m.get(key) is not None for m in manifests):
            merged[key] = sum(m[key] * m["counts"].get("rows", 0) for m in manifests) / rows
    merged["complete"] = store_coverage(dirs, manifests).complete
    merged["shards"] = [str(d) for d in dirs]
    return merged


def _unsharded_params(manifest: dict[str, Any]) -> dict[str, Any]:
    params = dict(manifest["params"])
    params.pop("shard", None)
    return params


def _check_unique(table: pa.Table, dirs: Sequence[Path]) -> None:
    counts = table.group_by(["id", "sample"]).aggregate([([], "count_all")])
    if counts.num_rows != table.num_rows:
        first = counts.filter(pa.compute.greater(counts["count_all"], 1)).slice(0, 1)
        key = (first["id"][0].as_py(), first["sample"][0].as_py())
        raise PrimekdError(f"duplicate (id, sample) rows, e.g. {key}, in "
                           + ", ".join(map(str, dirs)) + ": a part was copied in twice")


def _with_all_columns(table: pa.Table, columns: Sequence[str] | None) -> pa.Table:
    """Parts written before a column existed lack it: add it as nulls (and put the columns
    back in the schema's order, which concatenating such parts does not keep)."""
    for name in columns or COLUMNS:
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows,
                                                                     SCHEMA.field(name).type))
    return table if columns is not None else table.select(list(COLUMNS))


def _check_columns(columns: Sequence[str] | None) -> None:
    unknown = sorted(set(columns or ()) - set(COLUMNS))
    if unknown:
        raise PrimekdError(f"unknown store column(s) {', '.join(unknown)}; "
                           f"columns: {', '.join(COLUMNS)}")


def _as_list(directories: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(directories, str | Path):
        return [Path(directories)]
    if not directories:
        raise PrimekdError("no teacher store directories given")
    return [Path(d) for d in directories]
