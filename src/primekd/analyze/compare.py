"""Compare results files: accuracy with Wilson intervals, and paired tests against a reference.

A results file is JSONL with one row per question: DESIGN.md's `results.jsonl` (`id`,
`question`, `correct`, ...) or any file with `response` and a reference (`answer`,
`reference` or `gold`), which is graded here. Rows are paired across files by `id`, or by
question text where a file has no ids; questions found in only one file are reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from primekd.core import power, stats
from primekd.core.errors import PrimekdError
from primekd.core.grading import check_extractor, grade_row, row_finish_reason
from primekd.core.io import iter_jsonl

MATCH_MODES = ("auto", "id", "question")


@dataclass(frozen=True)
class Row:
    id: str | None
    question: str | None  # whitespace-normalised, for matching
    correct: bool
    no_answer: bool
    correct_strict: bool | None = None  # None: the row does not say (graded elsewhere)
    correct_flexible: bool | None = None
    truncated: bool | None = None  # None: unknown
    no_number: bool = False


@dataclass(frozen=True)
class ResultsFile:
    path: Path
    label: str
    rows: list[Row]
    graded_here: int  # rows without `correct`, graded on load

    def keyed(self, by: str) -> dict[str, Row]:
        """Rows by id or by question text; a key that appears twice is an error."""
        keyed: dict[str, Row] = {}
        for row in self.rows:
            key = row.id if by == "id" else row.question
            if key is None:
                raise PrimekdError(f"{self.path}: a row has no `{by}`, so rows cannot be paired")
            if key in keyed:
                raise PrimekdError(
                    f"{self.path}: {by} {_short(key)!r} appears twice; "
                    "a results file needs one row per question"
                )
            keyed[key] = row
        return keyed

    def has_all(self, attribute: str) -> bool:
        return all(getattr(row, attribute) is not None for row in self.rows)


@dataclass(frozen=True)
class FileSummary:
    label: str
    path: str
    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    no_answer: int
    graded_here: int
    accuracy_strict: float | None = None  # None when a row does not carry it
    accuracy_flexible: float | None = None
    truncated: int | None = None  # None when no row says whether it was cut
    no_number: int = 0


@dataclass(frozen=True)
class PairedComparison:
    """One file against the reference, on the questions both contain."""

    label: str
    reference: str
    matched_by: str
    n_paired: int
    reference_accuracy: float | None  # on the paired questions
    accuracy: float | None
    diff_points: float | None  # accuracy - reference_accuracy, in percentage points
    ci95_points: tuple[float, float] | None  # paired bootstrap
    only_reference_correct: int
    only_file_correct: int
    p_mcnemar: float | None
    p_holm: float | None
    only_in_reference: list[str] = field(default_factory=list)
    only_in_file: list[str] = field(default_factory=list)
    power: power.PowerPlan | None = None  # with --power-diff: at the measured discordance


@dataclass(frozen=True)
class Comparison:
    reference: str
    files: list[FileSummary]
    pairs: list[PairedComparison]
    bootstrap: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_results(path: str | Path, extractor: str = "default", lenient: bool = False
                 ) -> ResultsFile:
    """Read a results file; rows without `correct` are graded with `extractor` (and the
    truncation rule unless `lenient`); a row's own `correct` is kept as it is."""
    path = Path(path)
    if path.is_dir():
        raise PrimekdError(f"{path} is a directory; pass its results.jsonl")
    rows, graded_here = [], 0
    for number, raw in enumerate(iter_jsonl(path, tolerate_torn_tail=False), start=1):
        if not isinstance(raw.get("correct"), bool):
            try:
                raw = grade_row(raw, extractor, lenient)
            except PrimekdError as e:
                raise PrimekdError(
                    f"{path}:{number}: no boolean `correct` field and cannot grade it: {e}"
                ) from None
            graded_here += 1
        rows.append(_to_row(raw))
    if not rows:
        raise PrimekdError(f"{path} has no rows")
    return ResultsFile(path, str(path), rows, graded_here)


def compare_files(
    paths: list[str | Path],
    reference: str | Path | None = None,
    extractor: str = "default",
    match: str = "auto",
    bootstrap: int = 10_000,
    seed: int = 0,
    lenient: bool = False,
    power_diff: float | None = None,
    target_power: float = 0.8,
) -> Comparison:
    """Summarise every file and compare each non-reference file with the reference.

    With `power_diff` (percentage points), each pair also gets its `power.PowerPlan`: the
    measured discordance, the power at its n and the n needed for `target_power`, at alpha
    0.05 over Holm's first step across the pairs."""
    if match not in MATCH_MODES:
        raise PrimekdError(f"unknown match mode {match!r}; choose one of {', '.join(MATCH_MODES)}")
    check_extractor(extractor)
    if bootstrap < 100:
        raise PrimekdError("--bootstrap must be at least 100 resamples")
    if power_diff is not None and not 0 < power_diff < 100:
        raise PrimekdError(f"--power-diff must be between 0 and 100 points, not {power_diff:g}")
    if not 0 < target_power < 1:
        raise PrimekdError(f"--power must be between 0 and 1, not {target_power:g}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise PrimekdError("give at least one results file")
    reference_index = _reference_index(paths, reference)
    if reference_index < 0:
        paths.insert(0, Path(reference))  # type: ignore[arg-type]
        reference_index = 0
    files = _with_labels([load_results(p, extractor, lenient) for p in paths])
    ref = files[reference_index]
    others = [f for i, f in enumerate(files) if i != reference_index]
    pairs = _with_holm([_pair(ref, other, match, bootstrap, seed) for other in others])
    if power_diff is not None:
        pairs = [_with_power(pair, power_diff / 100, target_power, len(pairs)) for pair in pairs]
    return Comparison(ref.label, [_summary(f) for f in files], pairs, bootstrap, seed)


def render_comparison(comparison: Comparison) -> Group:
    """Two rich tables (accuracy per file; each file against the reference) and notes on
    questions that could not be paired."""
    accuracy = Table(title="accuracy", title_justify="left")
    for header in ("file", "n", "correct", "accuracy", "95% CI", "strict", "flexible",
                   "truncated", "no number"):
        accuracy.add_column(header, justify="left" if header == "file" else "right")
    for summary in comparison.files:
        accuracy.add_row(*_summary_cells(summary))
    parts: list[Any] = [accuracy]
    if comparison.pairs:
        paired = Table(title=f"against {comparison.reference} (paired questions)",
                       title_justify="left")
        for header in ("file", "paired", "Δ points", "95% CI", "McNemar p", "Holm p"):
            paired.add_column(header, justify="left" if header == "file" else "right")
        for pair in comparison.pairs:
            paired.add_row(*_pair_cells(pair))
        parts.append(paired)
        planned = [pair for pair in comparison.pairs if pair.power is not None]
        if planned:
            parts.append(_power_table(planned))
    parts += [Text(note, style="yellow") for note in _unmatched_notes(comparison.pairs)]
    parts.append(Text(
        "accuracy: the file's own `correct` (default rule: a truncated answer needs a stated "
        "answer); strict: stated answers only; flexible: last number anywhere; truncated: cut "
        "at the token limit (? unknown).\n"
        f"Δ = file - reference; paired bootstrap ({comparison.bootstrap} resamples, seed "
        f"{comparison.seed}); exact McNemar; Holm over {len(comparison.pairs)} comparison(s).",
        style="dim",
    ))
    return Group(*parts)


# --- loading --------------------------------------------------------------------------------


def _to_row(raw: dict[str, Any]) -> Row:
    question = raw.get("question")
    return Row(
        id=None if raw.get("id") is None else str(raw["id"]),
        question=" ".join(question.split()) if isinstance(question, str) else None,
        correct=raw["correct"],
        no_answer=raw.get("no_answer") is not None if "no_answer" in raw
        else "extracted" in raw and raw["extracted"] is None,
        correct_strict=_flag(raw.get("correct_strict")),
        correct_flexible=_flag(raw.get("correct_flexible")),
        truncated=_flag(raw.get("truncated")) if "truncated" in raw
        else (None if row_finish_reason(raw) is None else row_finish_reason(raw) == "length"),
        no_number="extracted" in raw and raw["extracted"] is None,
    )


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _reference_index(paths: list[Path], reference: str | Path | None) -> int:
    if reference is None:
        return 0
    wanted = Path(reference).resolve()
    return next((i for i, p in enumerate(paths) if p.resolve() == wanted), -1)


def _with_labels(files: list[ResultsFile]) -> list[ResultsFile]:
    """Label each file by the shortest path suffix that tells it apart from the others
    (`base/results.jsonl`, `kd/results.jsonl`)."""
    parts = [f.path.parts for f in files]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            break
    else:
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return [ResultsFile(f.path, label, f.rows, f.graded_here) for f, label in zip(
        files, labels, strict=True)]


def _summary(f: ResultsFile) -> FileSummary:
    s = stats.summarize([row.correct for row in f.rows], sum(row.no_answer for row in f.rows))
    return FileSummary(f.label, str(f.path), s["n"], s["correct"], s["accuracy"],
                       tuple(s["ci95"]), s["no_answer"], f.graded_here,
                       _share(f.rows, "correct_strict"), _share(f.rows, "correct_flexible"),
                       _count(f.rows, "truncated"), sum(row.no_number for row in f.rows))


def _share(rows: list[Row], attribute: str) -> float | None:
    values = [getattr(row, attribute) for row in rows]
    return None if any(v is None for v in values) else sum(values) / len(values)


def _count(rows: list[Row], attribute: str) -> int | None:
    values = [getattr(row, attribute) for row in rows]
    return None if all(v is None for v in values) else sum(bool(v) for v in values)


# --- pairing --------------------------------------------------------------------------------


def _pair(
    ref: ResultsFile, other: ResultsFile, match: str, bootstrap: int, seed: int
) -> PairedComparison:
    by = _match_key(ref, other, match)
    ref_rows, other_rows = ref.keyed(by), other.keyed(by)
    if by == "id":
        _check_same_questions(ref, other, ref_rows, other_rows)
    keys = [key for key in ref_rows if key in other_rows]
    pair = stats.paired_comparison([ref_rows[key].correct for key in keys],
                                   [other_rows[key].correct for key in keys], bootstrap, seed)
    unmatched = {
        "only_in_reference": [k for k in ref_rows if k not in other_rows],
        "only_in_file": [k for k in other_rows if k not in ref_rows],
    }
    if pair is None:
        return PairedComparison(other.label, ref.label, by, 0, None, None, None, None,
                                0, 0, None, None, **unmatched)
    return PairedComparison(
        label=other.label,
        reference=ref.label,
        matched_by=by,
        n_paired=pair.n,
        reference_accuracy=pair.accuracy_a,
        accuracy=pair.accuracy_b,
        diff_points=100 * pair.diff,
        ci95_points=(100 * pair.ci95[0], 100 * pair.ci95[1]),
        only_reference_correct=pair.only_a,
        only_file_correct=pair.only_b,
        p_mcnemar=pair.p,
        p_holm=None,
        **unmatched,
    )


def _match_key(ref: ResultsFile, other: ResultsFile, match: str) -> str:
    if match != "auto":
        return match
    if ref.has_all("id") and other.has_all("id"):
        return "id"
    if ref.has_all("question") and other.has_all("question"):
        return "question"
    raise PrimekdError(
        f"cannot pair {other.path} with {ref.path}: give every row an `id` or a `question`"
    )


def _check_same_questions(
    ref: ResultsFile, other: ResultsFile, ref_rows: dict[str, Row], other_rows: dict[str, Row]
) -> None:
    """Equal ids must mean equal questions, or the pairing would be silently wrong."""
    for key, row in ref_rows.items():
        twin = other_rows.get(key)
        if twin and row.question and twin.question and row.question != twin.question:
            raise PrimekdError(
                f"id {key!r} has different questions in {ref.path} and {other.path}; "
                "were they run on different data? Use --match question to pair by text"
            )


def _with_power(pair: PairedComparison, diff: float, target: float, comparisons: int
                ) -> PairedComparison:
    if pair.n_paired == 0:
        return pair
    discordance = (pair.only_reference_correct + pair.only_file_correct) / pair.n_paired
    return replace(pair, power=power.plan(discordance, diff, pair.n_paired,
                                          power=target, comparisons=comparisons))


def _with_holm(pairs: list[PairedComparison]) -> list[PairedComparison]:
    holm = stats.holm_within([pair.p_mcnemar for pair in pairs])
    return [replace(pair, p_holm=p) for pair, p in zip(pairs, holm, strict=True)]


# --- rendering ------------------------------------------------------------------------------


def _summary_cells(s: FileSummary) -> list[str]:
    return [s.label, str(s.n), str(s.correct), _pct(s.accuracy),
            f"{_pct(s.ci95[0])}–{_pct(s.ci95[1])}",
            "–" if s.accuracy_strict is None else _pct(s.accuracy_strict),
            "–" if s.accuracy_flexible is None else _pct(s.accuracy_flexible),
            "?" if s.truncated is None else str(s.truncated), str(s.no_number)]


def _pair_cells(pair: PairedComparison) -> list[str]:
    if pair.n_paired == 0:
        return [pair.label, "0", "no overlap", "", "", ""]
    low, high = pair.ci95_points  # type: ignore[misc]
    return [pair.label, str(pair.n_paired), f"{pair.diff_points:+.1f}",
            f"{low:+.1f} to {high:+.1f}", _p(pair.p_mcnemar), _p(pair.p_holm)]


def _power_table(pairs: list[PairedComparison]) -> Table:
    first = pairs[0].power
    table = Table(title=f"power to detect {100 * abs(first.diff):g} points (exact McNemar, "
                  f"alpha {first.alpha:g}/{first.comparisons}: Holm's first step)",
                  title_justify="left")
    for header in ("file", "discordant", "paired", "power", f"n for {first.target_power:.0%}"):
        table.add_column(header, justify="left" if header == "file" else "right")
    for pair in pairs:
        plan = pair.power
        table.add_row(pair.label, f"{pair.only_reference_correct + pair.only_file_correct} "
                      f"({_pct(plan.discordance)})", str(plan.n), _pct(plan.power_at_n),
                      "unreachable" if plan.n_needed is None else f"{plan.n_needed:,}")
    return table


def _unmatched_notes(pairs: list[PairedComparison]) -> list[str]:
    notes = []
    for pair in pairs:
        for keys, where in ((pair.only_in_reference, f"only in {pair.reference}"),
                            (pair.only_in_file, f"only in {pair.label}")):
            if keys:
                examples = ", ".join(_short(k) for k in keys[:3])
                notes.append(f"{pair.label} vs {pair.reference}: {len(keys)} question(s) "
                             f"{where}, left out of the paired test (e.g. {examples})")
    return notes


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _p(p: float | None) -> str:
    return "" if p is None else f"{p:.3g}"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
