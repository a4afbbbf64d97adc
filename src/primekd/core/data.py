"""Question/answer sets: the bundled GSM8K splits or any JSONL with `question` and `answer`."""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from primekd.core.errors import PrimekdError
from primekd.core.grading import reference_number
from primekd.core.io import iter_jsonl
from primekd.core.options import option

BUNDLED_SPLITS = ("train", "test", "test_socratic")
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str  # reference solution (GSM8K style, ending `#### N`) or a bare number
    gold: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def offset_field() -> Any:
    """`--offset`, the same wherever questions are chosen (eval, teach)."""
    return option(0, "Skip this many questions first.", set_by="experiment", ge=0)


def sample_field() -> Any:
    """`--sample`, the same wherever questions are chosen (eval, teach)."""
    return option(None, "Draw this many questions at random (seeded by --seed) before "
                  "--offset/--limit.", set_by="experiment", ge=1)


def strip_calculator(text: str) -> str:
    """GSM8K's `<<48/2=24>>` annotations removed: dataset markup, not language."""
    return _CALCULATOR.sub("", text)


def bundled_path(split: str) -> Path:
    return Path(str(files("primekd") / "datasets" / "gsm8k" / f"{split}.jsonl"))


def resolve_data_path(spec: str) -> tuple[Path, str]:
    """Map `train`, `test`, `test_socratic` or a path to (file, id prefix)."""
    if spec in BUNDLED_SPLITS:
        return bundled_path(spec), spec
    path = Path(spec)
    if not path.exists():
        raise PrimekdError(
            f"data {spec!r} is neither a bundled split ({', '.join(BUNDLED_SPLITS)}) "
            "nor an existing JSONL file"
        )
    return path, path.stem


def load_examples(
    spec: str = "test",
    limit: int | None = None,
    offset: int = 0,
    sample: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """Load a question set; `sample` draws a seeded random subset, `offset`/`limit` slice it.

    Ids are stable: a row's own `id` field, else `<split>-<line index>`, so the same
    question has the same id in every run and results can be paired across runs.
    """
    path, prefix = resolve_data_path(spec)
    examples = [_to_example(row, index, prefix, path) for index, row in
                enumerate(iter_jsonl(path, tolerate_torn_tail=False))]
    if sample is not None:
        if sample < 1:
            raise PrimekdError("--sample must be at least 1")
        if sample > len(examples):
            raise PrimekdError(f"--sample {sample} is more than the {len(examples)} questions "
                               f"in {spec!r}; give at most {len(examples)}, or no --sample")
        rng = random.Random(seed)
        examples = rng.sample(examples, sample)
    if offset < 0:
        raise PrimekdError("--offset must not be negative")
    if limit is not None and limit < 1:
        raise PrimekdError("--limit must be at least 1")
    end = None if limit is None else offset + limit
    selected = examples[offset:end]
    if not selected:
        raise PrimekdError(f"no questions selected from {spec!r} (offset {offset}, limit {limit})")
    return selected


def _brief(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _to_example(row: dict[str, Any], index: int, prefix: str, path: Path) -> Example:
    if "question" not in row or "answer" not in row:
        raise PrimekdError(f"{path}: row {index + 1} needs `question` and `answer` fields")
    answer = str(row["answer"])
    if reference_number(row["answer"]) is None:
        raise PrimekdError(f"{path}:{index + 1}: `answer` {_brief(answer)} holds no number to "
                           "grade against (write a solution ending `#### N`, or a number)")
    return Example(
        id=str(row.get("id", f"{prefix}-{index:05d}")),
        question=str(row["question"]),
        answer=answer,
        gold=reference_number(answer),
    )
