"""The experiment report: `report.md`, and `report.html` rendered from it, self-contained.

The Markdown is the single source: the HTML is the same document, rendered by markdown-it-py
(CommonMark + tables), with every image embedded as a base64 data URI and a
Content-Security-Policy that forbids loading anything from outside the file.

The report reads only the run directory's files (the contracts in DESIGN.md): eval
`summary.json` + `results.jsonl`, teacher `manifest.json`, student `train_log.jsonl` +
`summary.json`, the stage records in `.stages/`, `config.yaml`, and the attention directory.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import math
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from primekd.analyze.attention.report import report_section
from primekd.core import stats
from primekd.core.errors import PrimekdError
from primekd.core.grading import looping
from primekd.core.io import atomic_write, atomic_write_text, read_json, read_jsonl
from primekd.core.markdown import cell as _cell
from primekd.core.markdown import percent as _pct
from primekd.core.markdown import table as _table
from primekd.experiment import answer_style, power_note
from primekd.teach import store

FORMAT_VERSION = 2  # 2: the Answer style section
ASSETS = "report_files"
PACKAGES = ("primekd", "torch", "transformers", "peft", "accelerate", "datasets", "numpy",
            "pyarrow", "scipy", "statsmodels", "matplotlib")
SMALL_SAMPLE = 200  # below this many test questions the report warns about the intervals
ALPHA = 0.05  # significance level of the Holm-adjusted paired tests
TRUNCATION_WARNING = 0.10  # above this share of answers cut at the token limit, warn first
RECORDS = ".stages"  # <run>/.stages/<stage name, / as -->.json: what each stage of `run` did


def record_path(run_dir: str | Path, stage_name: str) -> Path:
    """A stage's run record (wall and CPU time, summary), written by `primekd run`."""
    return Path(run_dir) / RECORDS / (stage_name.replace("/", "--") + ".json")


# --- inputs -------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where each stage's outputs are. `evals` is ordered as the results table's rows."""

    run_dir: Path
    teachers: dict[str, Path] = field(default_factory=dict)
    students: dict[str, Path] = field(default_factory=dict)
    evals: dict[str, Path] = field(default_factory=dict)
    attention: Path | None = None
    stages: dict[str, Path] = field(default_factory=dict)  # stage name -> directory

    @classmethod
    def discover(cls, run_dir: str | Path) -> Layout:
        """The layout of a run directory found on disk (for reports outside `primekd run`)."""
        run_dir = Path(run_dir)

        def subdirs(name: str) -> dict[str, Path]:
            root = run_dir / name
            return {p.name: p for p in sorted(root.iterdir()) if p.is_dir()} if root.is_dir() \
                else {}

        evals = subdirs("eval")
        order = sorted(evals, key=lambda n: (n != "base", n != "sft", n != "kd-none", n))
        layout = cls(run_dir, subdirs("teacher"), subdirs("students"),
                     {n: evals[n] for n in order})
        attention = run_dir / "attention"
        layout.attention = attention if attention.is_dir() else None
        layout.stages = {f"teacher/{n}": p for n, p in layout.teachers.items()}
        layout.stages |= {f"students/{n}": p for n, p in layout.students.items()}
        layout.stages |= {f"eval/{n}": p for n, p in layout.evals.items()}
        if layout.attention:
            layout.stages["attention"] = layout.attention
        return layout


@dataclass
class EvalRun:
    name: str
    summary: dict[str, Any]
    rows: dict[str, dict[str, Any]]  # id -> row

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def correct(self) -> int:
        return sum(bool(r.get("correct")) for r in self.rows.values())

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def share(self, field_name: str) -> float | None:
        """The share of rows with a true `field_name` (None when a row does not carry it:
        results written before strict/flexible grading)."""
        values = [r.get(field_name) for r in self.rows.values()]
        if not values or any(not isinstance(v, bool) for v in values):
            return None
        return sum(values) / len(values)

    @property
    def truncated(self) -> int:
        return sum(r.get("finish_reason") == "length" for r in self.rows.values())

    @property
    def looping(self) -> int:
        """Answers cut at the token limit in a repetition loop (no budget would end them)."""
        return sum(r.get("finish_reason") == "length" and looping(str(r.get("response", "")))
                   for r in self.rows.values())

    @property
    def truncation_rate(self) -> float:
        return self.truncated / self.n if self.n else 0.0

    @property
    def max_new_tokens(self) -> int | None:
        return _get(self.summary, "generation.max_new_tokens")


def load_evals(layout: Layout) -> dict[str, EvalRun]:
    runs = {}
    for name, directory in layout.evals.items():
        results = directory / "results.jsonl"
        if not results.exists():
            continue
        rows = {str(r.get("id", i)): r for i, r in enumerate(read_jsonl(results))}
        summary = _read_optional(directory / "summary.json")
        runs[name] = EvalRun(name, summary, rows)
    if not runs:
        raise PrimekdError(f"{layout.run_dir} has no evaluation results (eval/*/results.jsonl)")
    return runs


def _read_optional(path: Path) -> dict[str, Any]:
    try:
        value = read_json(path)
    except PrimekdError:
        return {}
    return value if isinstance(value, dict) else {}


def _get(mapping: dict[str, Any], key: str) -> Any:
    """`mapping[key]`, reaching into nested dicts for a dotted key; None where absent."""
    node: Any = mapping
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# --- the results table --------------------------------------------------------------------------


@dataclass
class ResultRow:
    name: str
    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    vs: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # ref -> (Δ, p_holm)
    gain: float | None = None  # relative gain in % over the gain reference
    ci_vs: dict[str, tuple[float, float]] = field(default_factory=dict)  # ref -> bootstrap CI

    def significant(self, ref: str) -> bool:
        p = self.vs.get(ref, (None, None))[1]
        return p is not None and p < ALPHA


def results_rows(runs: dict[str, EvalRun]) -> Table:
    """Rows with Wilson intervals, paired differences against `kd-none` and `base` (McNemar
    exact p, Holm-adjusted within each reference's family), relative gain over `kd-none`."""
    rows = {name: ResultRow(name, run.n, run.correct, run.accuracy,
                            stats.wilson_interval(run.correct, run.n))
            for name, run in runs.items()}
    references = [r for r in ("kd-none", "base") if r in runs]
    for ref in references:
        others = [name for name in runs if name != ref]
        pairs = [stats.paired_comparison(*_paired(runs[ref], runs[name]), n_resamples=2000)
                 for name in others]
        holm = stats.holm_within([pair.p if pair else None for pair in pairs])
        for name, pair, p in zip(others, pairs, holm, strict=True):
            rows[name].vs[ref] = (pair.diff if pair else 0.0, p)
            if pair:
                rows[name].ci_vs[ref] = pair.ci95
    gain_ref = references[0] if references else None
    if gain_ref:
        base_acc = runs[gain_ref].accuracy
        for row in rows.values():
            if row.name != gain_ref and base_acc > 0:
                row.gain = (row.accuracy - base_acc) / base_acc * 100
    return list(rows.values()), references, gain_ref


# results_rows' value: the rows, the references they are compared with, the gain reference.
# build_markdown computes it once (each paired bootstrap takes a while) for every section.
Table = tuple[list[ResultRow], list[str], str | None]


def _paired(a: EvalRun, b: EvalRun) -> tuple[list[bool], list[bool]]:
    ids = [i for i in a.rows if i in b.rows]
    return ([bool(a.rows[i].get("correct")) for i in ids],
            [bool(b.rows[i].get("correct")) for i in ids])


# --- Markdown sections --------------------------------------------------------------------------


def _pts(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def _p(x: float | None) -> str:
    if x is None:
        return "–"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _num(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 100):
        return f"{int(x):,}"
    return f"{x:,.{digits}f}"


def section_results(runs: dict[str, EvalRun], table: Table, assets: Path) -> str:
    rows, references, gain_ref = table
    headers = ["experiment", "accuracy", "correct/total", "95% CI (Wilson)", "strict",
               "flexible", "truncated"]
    for ref in references:
        headers += [f"Δ vs {ref} (pts)", "p (Holm)"]
    if gain_ref:
        headers.append(f"rel. gain vs {gain_ref}")
    body = []
    for row in rows:
        run = runs[row.name]
        cells = [f"`{row.name}`", _pct(row.accuracy), f"{row.correct}/{row.n}",
                 f"{_pct(row.ci95[0])} – {_pct(row.ci95[1])}", _pct(run.share("correct_strict")),
                 _pct(run.share("correct_flexible")), _truncation_cell(
                     run.truncation_rate, run.truncated, run.looping)]
        for ref in references:
            diff, p = row.vs.get(ref, (None, None))
            mark = "**" if row.significant(ref) else ""  # emphasis only where it is earned
            cells += ([f"{mark}{_pts(diff)}{mark}", _p(p)] if ref != row.name else ["ref.", ""])
        if gain_ref:
            cells.append("ref." if row.name == gain_ref else
                         ("–" if row.gain is None else f"{row.gain:+.1f}%"))
        body.append(cells)
    chart = accuracy_chart(rows, assets / "accuracy.png")
    n = max(r.n for r in rows)
    notes = [
        _table(headers, body),
        "",
        f"Accuracy is graded by the default rule: an answer cut at the token limit counts "
        f"only if it stated its answer (`The answer is`, `####`, `\\boxed{{}}`, ...). Strict "
        f"counts stated answers only; flexible takes the last number anywhere, as "
        f"lm-evaluation-harness's flexible-extract does. Truncated: answers that hit "
        f"`max_new_tokens` (looping: of those, answers caught in a repetition loop, which "
        f"no budget would have let finish). Differences are in percentage points on the "
        f"questions both runs answered; p-values are exact McNemar tests on the paired "
        f"questions, Holm-adjusted within each reference's column ({len(rows) - 1} "
        f"comparisons each); a difference in bold is significant at {ALPHA}.",
    ]
    if gain_ref and runs[gain_ref].accuracy == 0:
        notes += ["", f"Relative gain is undefined here: `{gain_ref}` answered none correctly."]
    widest = max((r.ci95[1] - r.ci95[0]) / 2 for r in rows)
    if n < SMALL_SAMPLE:
        notes += ["", f"> **Small sample.** Each model answered {n} test questions, so a 95% "
                      f"interval is up to ±{100 * widest:.0f} points wide: differences smaller "
                      f"than that are not evidence of an effect. Read this run as a "
                      f"demonstration of the pipeline, not as a measurement."]
    notes += ["", f"![Accuracy with 95% Wilson intervals]({ASSETS}/{chart.name})"]
    return "## Results\n\n" + "\n".join(notes) + "\n"


PAPER_CONTROLS = {"base": "No distillation", "sft": "Fine-tuned (SFT on references)"}


def paper_label(name: str) -> str:
    """A results row as the paper's table names it."""
    if name in PAPER_CONTROLS:
        return PAPER_CONTROLS[name]
    if name == "kd-none":
        return "KD without priming"
    if name.startswith("kd-"):
        return f"KD, `{name[3:]}` priming"
    if name.startswith("op-"):  # `run`'s default name of an on-policy student
        return f"On-policy KD, `{name[3:]}` priming"
    return f"`{name}`"


def section_paper_table(runs: dict[str, EvalRun], table: Table, layout: Layout) -> str:
    """The paper's results table (Goyal et al. 2024, Table 1): no distillation, fine-tuned,
    KD per strategy, and each KD strategy's relative gain over KD without priming; here
    with Wilson intervals, the paired-bootstrap interval of the difference from `kd-none`
    and its Holm-adjusted McNemar p."""
    rows, _, _ = table
    order = sorted(rows, key=lambda r: (r.name not in PAPER_CONTROLS,
                                        list(PAPER_CONTROLS).index(r.name)
                                        if r.name in PAPER_CONTROLS else 0,
                                        r.name != "kd-none", r.name))
    ref = "kd-none" if "kd-none" in runs else None
    body = []
    for row in order:
        cells = [paper_label(row.name), f"`{row.name}`", _pct(row.accuracy),
                 f"{_pct(row.ci95[0])} – {_pct(row.ci95[1])}"]
        if ref:
            cells += _versus(row, ref)
        cells.append(_trained_on(layout, row.name))
        body.append(cells)
    headers = ["method", "experiment", "accuracy", "95% CI (Wilson)"]
    if ref:
        headers += ["Δ vs KD without priming (pts)", "95% CI of Δ (paired bootstrap)",
                    "p (McNemar, Holm)", "relative gain vs KD without priming"]
    headers.append("trained on")
    text = ["## Results in the paper's layout\n",
            _table(headers, body), "",
            "As in the paper's table: the untrained student, the student fine-tuned on the "
            "reference solutions, and one KD student per priming strategy (on-policy ones "
            "train on their own answers, scored by the primed teacher), with each "
            "strategy's relative gain over KD without priming ((acc − acc_kd-none) / "
            "acc_kd-none). Δ is in percentage points on the paired test questions; its "
            "interval is a paired bootstrap (2,000 resamples), its p an exact McNemar test "
            "Holm-adjusted over the column. Bold marks a difference significant at "
            f"{ALPHA} after Holm."]
    if not ref:
        text += ["", "There is no `kd-none` student, so no gain over KD without priming."]
    return "\n".join(text) + "\n"


def _versus(row: ResultRow, ref: str) -> list[str]:
    if row.name == ref:
        return ["ref.", "", "", "ref."]
    diff, p = row.vs.get(ref, (None, None))
    lo_hi = row.ci_vs.get(ref)
    mark = "**" if row.significant(ref) else ""
    gain = "–" if row.gain is None else f"{row.gain:+.1f}%"
    if row.name in PAPER_CONTROLS:
        gain = ""  # the paper's relative gain is of KD strategies only
    return [f"{mark}{_pts(diff)}{mark}",
            "–" if lo_hi is None else f"{_pts(lo_hi[0])} to {_pts(lo_hi[1])}", _p(p), gain]


def _trained_on(layout: Layout, name: str) -> str:
    """What a student trained on: all teacher answers, or (`--keep correct`) only those
    graded correct, from its distill summary."""
    if name == "base":
        return "untrained"
    directory = layout.students.get(name)
    summary = _read_optional(directory / "summary.json") if directory else {}
    data = summary.get("data", {})
    if not isinstance(data, dict) or not data:
        return "–"
    if data.get("source") == "on_policy":
        return _trained_on_policy(summary.get("on_policy") or {})
    kept, total = data.get("kept_rows"), data.get("store_rows")
    if data.get("source") == "references":
        return f"{kept} reference solutions" if kept is not None else "reference solutions"
    partial = (f"; PARTIAL store: {data.get('answered_rows')} of {data.get('planned_rows')} "
               "planned answers" if data.get("partial") else "")
    if data.get("keep") == "correct":
        return f"{kept}/{total} teacher answers (graded correct only{partial})"
    if total is None:
        return f"teacher answers (all{partial})"
    return f"{total} teacher answers (all{partial})"


def _trained_on_policy(info: dict[str, Any]) -> str:
    rounds = info.get("rounds") or []
    own = sum(r.get("on_sequences") or 0 for r in rounds)
    mixed = sum(r.get("off_sequences") or 0 for r in rounds)
    text = (f"{own} own answers in {len(rounds)} rounds, scored by the "
            f"`{info.get('strategy')}` teacher")
    return text + (f", + {mixed} teacher answers" if mixed else "")


def accuracy_chart(rows: list[ResultRow], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(rows) + 1.2))
    names = [r.name for r in rows][::-1]
    acc = [100 * r.accuracy for r in rows][::-1]
    # clamped: at 0% or 100% the closed-form interval can miss the estimate by float noise
    lo = [max(0.0, 100 * (r.accuracy - r.ci95[0])) for r in rows][::-1]
    hi = [max(0.0, 100 * (r.ci95[1] - r.accuracy)) for r in rows][::-1]
    colors = ["#9aa5b1" if n in ("base", "sft") else "#3b75af" for n in names]
    ax.barh(names, acc, xerr=[lo, hi], color=colors, capsize=4, ecolor="#333333")
    for y, value in enumerate(acc):
        ax.text(value + 1, y + 0.25, f"{value:.1f}%", fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("GSM8K test accuracy (%), 95% Wilson interval")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def section_teachers(layout: Layout) -> str:
    if not layout.teachers:
        return "## Teachers\n\nNo teacher stage in this run.\n"
    body = []
    for name, directory in layout.teachers.items():
        m = _teacher_manifest(directory)
        body.append([
            f"`{name}`",
            _pct(m.get("teacher_accuracy")),
            _pct(m.get("teacher_accuracy_strict")),
            _teacher_truncation(m),
            _restated(m),
            _kept(m),
            _num(m.get("mean_answer_tokens")),
            _num(m.get("tokens_per_s")),
            _num(m.get("compute_seconds")),
            _cell(m.get("target", "–")),
        ])
    headers = ["strategy", "teacher accuracy", "strict", "truncated",
               "restates without working", "kept answers",
               "mean answer tokens", "tokens/s", "compute (s)", "target"]
    return ("## Teachers\n\nThe teacher answered the transfer set once under each priming "
            "strategy; the student later sees only the bare question. Teacher accuracy uses "
            "the same grading rule as the results above; truncated answers hit the teacher's "
            "`max_new_tokens`. Restates without working: answers that state a final answer "
            "with fewer than N tokens of working outside that line (N is "
            f"{_restate_n(layout)}), the failure a teacher shown the ground truth is prone "
            "to: its student learns the answer, not the reasoning. Kept answers: those the "
            "store kept (`teach --keep correct` keeps only the correct ones); the results "
            "table above says what each student trained on.\n\n" + _table(headers, body)
            + "\n")


def _teacher_truncation(manifest: dict[str, Any]) -> str:
    rate, count = manifest.get("truncation_rate"), manifest.get("truncated")
    if rate is None:
        return "–"
    return _truncation_cell(rate, count, manifest.get("looping"))


def _truncation_cell(rate: float, count: Any, loops: Any) -> str:
    if loops:
        return f"{_pct(rate, 0)} ({count}; {loops} looping)"
    return f"{_pct(rate, 0)} ({count})"


def _restated(manifest: dict[str, Any]) -> str:
    rate, count = manifest.get("restated_rate"), manifest.get("restated")
    return "–" if rate is None else f"{_pct(rate, 0)} ({count})"


def _restate_n(layout: Layout) -> str:
    values = {_teacher_manifest(d).get("restate_max_tokens") for d in
              layout.teachers.values()} - {None}
    return ", ".join(str(v) for v in sorted(values)) if values else "not recorded"


def _teacher_manifest(directory: Path) -> dict[str, Any]:
    """A teacher stage's manifest; for a sharded teacher (`teacher_shards`), its shards'
    manifests merged."""
    stores = store.stage_stores(directory)
    if stores == [directory]:
        return _read_optional(directory / "manifest.json")
    try:
        return store.merged_manifest(stores)
    except PrimekdError:
        return {}


def _kept(manifest: dict[str, Any]) -> str:
    # answers, not questions: with several samples per question the rows outnumber them
    kept, rows = _get(manifest, "counts.kept"), _get(manifest, "counts.rows")
    return "–" if kept is None or rows is None else f"{kept}/{rows}"


def section_training(layout: Layout, assets: Path) -> str:
    if not layout.students:
        return "## Training curves\n\nNo student was trained in this run.\n"
    parts = ["## Training curves\n", "Loss per logged step: the total loss, its cross-entropy "
             "part (answer tokens) and its KD part (divergence from the teacher), and the "
             "validation loss where logged. SFT has no KD part.\n"]
    for name, directory in layout.students.items():
        log = _train_log(directory)
        if not log:
            parts.append(f"**{name}**: no training log found.\n")
            continue
        image = training_chart(name, log, assets / f"curves-{name}.png")
        parts.append(f"![Training curves of {name}]({ASSETS}/{image.name})\n")
    return "\n".join(parts)


def _train_log(directory: Path) -> list[dict[str, Any]]:
    path = directory / "train_log.jsonl"
    if not path.exists():
        return []
    return read_jsonl(path)


def training_chart(name: str, log: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for key, style in (("loss", "-"), ("ce", "--"), ("kd", ":"), ("val_loss", "-o")):
        points = [(r.get("step"), r.get(key)) for r in log
                  if isinstance(r.get(key), int | float) and r.get("step") is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, style, label=key, markersize=4)
    ax.set_title(name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def section_examples(runs: dict[str, EvalRun], table: Table, count: int, max_chars: int
                     ) -> str:
    if count == 0:
        return ""
    best, why = _example_student(runs, table)
    shown = [n for n in ("base", "kd-none") if n in runs] + ([best] if best else [])
    ids = [i for i in runs[shown[0]].rows if all(i in runs[n].rows for n in shown)]
    if not ids:
        return "## Worked examples\n\nNo question was answered by every model shown.\n"

    def interest(i: str) -> tuple[int, int]:
        lead = runs[best or shown[-1]].rows[i].get("correct")
        base = runs[shown[0]].rows[i].get("correct")
        return (0 if lead and not base else 1 if lead else 2, ids.index(i))

    parts = ["## Worked examples\n",
             f"The same test question answered by {', '.join(f'`{n}`' for n in shown)}"
             + (f" (`{best}` {why})" if best else "")
             + f". Questions where `{best or shown[-1]}` is right and `{shown[0]}` wrong are "
             "shown first.\n"]
    for number, i in enumerate(sorted(ids, key=interest)[:count], start=1):
        first = runs[shown[0]].rows[i]
        gold = first.get("gold")
        parts.append(f"### Example {number}: `{i}`\n")
        parts.append("> " + " ".join(str(first.get("question", "")).split()) + "\n")
        parts.append(f"Reference answer: **{_answer(gold)}**\n")
        for name in shown:
            row = runs[name].rows[i]
            mark = "correct" if row.get("correct") else "wrong"
            if row.get("no_answer") == "truncated":
                mark += ": cut at the token limit without a stated answer"
            parts.append(f"**{name}**: extracted {_answer(row.get('extracted'))} ({mark})\n")
            parts.append(_fence(_clip(str(row.get("response", "")), max_chars)) + "\n")
    return "\n".join(parts)


def _example_student(runs: dict[str, EvalRun], table: Table) -> tuple[str | None, str]:
    """The third model of the worked examples: the most accurate trained student that differs
    significantly from a reference; without one, the first primed student in the table's
    order, so that a lead that is not significant is never put forward."""
    trained = [n for n in runs if n not in ("base", "kd-none", "sft")] + \
        [n for n in runs if n == "sft"]  # primed students before the plain fine-tuning
    rows, references, _ = table
    significant = [r for r in rows if r.name in trained
                   and any(ref != r.name and r.significant(ref) for ref in references)]
    if significant:
        best = max(significant, key=lambda r: r.accuracy)
        return best.name, ("is the most accurate trained student with a significant "
                           "difference in the Results section")
    if not trained:
        return None, ""
    return trained[0], ("comes first in the results table; it is not chosen by its score, "
                        "as no trained student differs significantly from a reference")


def _answer(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " […]"


def _fence(text: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}"


def section_compute(layout: Layout) -> str:
    body, total_wall, total_cpu, total_tokens = [], 0.0, 0.0, 0
    for name, directory in layout.stages.items():
        record = _read_optional(record_path(layout.run_dir, name))
        wall, cpu = record.get("wall_time_s"), record.get("cpu_time_s")
        tokens = _stage_tokens(name, directory, record)
        total_wall += wall or 0.0
        total_cpu += cpu or 0.0
        total_tokens += tokens or 0
        rate = tokens / wall if tokens and wall else None
        body.append([f"`{name}`", _num(wall), _num(cpu), _num(tokens, 0), _num(rate),
                     _cell(record.get("completed_at"))])
    body.append(["**total**", _num(total_wall), _num(total_cpu), _num(total_tokens, 0), "", ""])
    return ("## Compute\n\nWall time and process CPU time (all threads) of each stage, summed "
            "over resumed attempts, and the tokens it processed: answer tokens the teacher "
            "generated or scored, tokens the student trained on, answer tokens generated in "
            "evaluation. The report stage itself is not listed." + _server_cpu_note(layout)
            + "\n\n"
            + _table(["stage", "wall time (s)", "CPU time (s)", "tokens", "tokens/s",
                      "completed"], body)
            + "\n" + _on_policy_costs(layout))


def _server_cpu_note(layout: Layout) -> str:
    engine = _get(_read_yaml(layout.run_dir / "config.yaml") or {}, "engine.name")
    if engine != "vllm":
        return ""
    return (" On the vLLM engine the CPU time of teacher and evaluation stages is primekd's "
            "own process only: the generation runs in the vLLM server, a separate process "
            "not counted here.")


def _on_policy_costs(layout: Layout) -> str:
    """The cost split of on-policy students: rollout, teacher scoring and training time."""
    rows = []
    for name, directory in layout.students.items():
        summary = _read_optional(directory / "summary.json")
        info = summary.get("on_policy")
        if not isinstance(info, dict):
            continue
        rounds = info.get("rounds") or []
        cost = info.get("cost_s") or {}
        tokens = summary.get("tokens")
        total = sum(float(cost.get(k) or 0.0) for k in ("rollout_s", "score_s", "train_s"))
        per_1k = total / tokens * 1000 if tokens else None
        last = rounds[-1].get("student_accuracy") if rounds else None
        rows.append([f"`{name}`", info.get("strategy"), _num(info.get("lmbda"), 2),
                     str(len(rounds)), _num(cost.get("rollout_s")), _num(cost.get("score_s")),
                     _num(cost.get("train_s")), _num(tokens, 0), _num(per_1k, 2),
                     _pct(last) if last is not None else "–"])
    if not rows:
        return ""
    return ("\nOn-policy students: seconds spent on the student's rollouts, the primed "
            "teacher's scoring of them and training, summed over rounds; seconds per 1,000 "
            "training tokens (all three); the student's accuracy on its last round's "
            "rollouts (training questions).\n\n"
            + _table(["student", "strategy", "lmbda", "rounds", "rollout (s)", "scoring (s)",
                      "training (s)", "train tokens", "s / 1k tokens", "last-round accuracy"],
                     rows) + "\n")


def _stage_tokens(name: str, directory: Path, record: dict[str, Any]) -> int | None:
    summary = record.get("summary") if isinstance(record.get("summary"), dict) else {}
    if name.startswith("teacher/"):
        m = _read_optional(directory / "manifest.json")  # what teacher.py's manifest holds
        mean, rows = m.get("mean_answer_tokens"), _get(m, "counts.rows")
        value = round(mean * rows) if mean is not None and rows is not None else None
    elif name.startswith("students/"):
        s = _read_optional(directory / "summary.json") or summary
        value = s.get("tokens")  # distill's summary.json
    elif name.startswith("eval/"):
        results = directory / "results.jsonl"
        value = sum(int(r.get("n_tokens") or 0) for r in read_jsonl(results)) \
            if results.exists() else None
    else:
        value = None  # attention and report generate no tokens
    return int(value) if isinstance(value, int | float) else None


def section_attention(layout: Layout) -> str:
    heading = "## Attention heads\n\n"
    if layout.attention is None:
        return heading + "The attention analysis was not run (`attention.enabled: false`).\n"
    if not (layout.attention / "summary.json").exists():
        return heading + "The attention analysis has not finished; rerun to complete it.\n"
    text = report_section(layout.attention, relative_to=layout.run_dir).strip()
    if not text.startswith("#"):
        text = heading + text
    return text + "\n"


def section_reproduce(layout: Layout) -> str:
    config = layout.run_dir / "config.yaml"
    text = config.read_text(encoding="utf-8") if config.exists() else "(config.yaml missing)"
    versions = [[f"`{p}`", _version(p)] for p in PACKAGES]
    versions.append(["python", platform.python_version()])
    versions.append(["platform", platform.platform()])
    return ("## Reproduce\n\nRerun this experiment (finished stages are reused from the run "
            "directory):\n\n"
            + _fence(f"primekd run {layout.run_dir / 'config.yaml'} --out {layout.run_dir}")
            + "\n\nResolved config:\n\n" + _fence(text.rstrip()).replace("```text", "```yaml", 1)
            + "\n\nPackage versions:\n\n" + _table(["package", "version"], versions, "ll")
            + "\n")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def section_overview(layout: Layout, runs: dict[str, EvalRun], table: Table, title: str,
                     power_diff: float | None = None, with_style: bool = False) -> str:
    config = _read_yaml(layout.run_dir / "config.yaml")
    models = config.get("models", {}) if isinstance(config, dict) else {}
    teacher, student = models.get("teacher", "?"), models.get("student", "?")
    n = max(r.n for r in runs.values())
    strategies = ", ".join(f"`{s}`" for s in layout.teachers) or "none"
    lines = [f"# {title}\n", headline(table) + "\n"]
    if primary := power_note.primary(list(runs)):
        diff = power_diff or _get(config if isinstance(config, dict) else {},
                                  "report.power_diff") or 8  # run's config, else 8 points
        lines.append(power_note.sentence(primary, *_paired(runs["kd-none"], runs[primary]),
                                         diff, len(runs) - 1, ALPHA) + "\n")
    lines += [w + "\n" for w in truncation_warnings(layout, runs)]
    lines += [f"Teacher `{teacher}`, student `{student}`"
             + (" (self-distillation: the same model primed and unprimed)"
                if teacher == student else "") + ". "
             f"Priming strategies: {strategies}. Every model answered the same {n} test "
             f"questions.\n",
             "Sections: [Results](#results) · [Teachers](#teachers) · "
             + ("[Answer style](#answer-style) · " if with_style else "") +
             "[Training curves](#training-curves) · [Worked examples](#worked-examples) · "
             "[Compute](#compute) · [Attention heads](#attention-heads) · "
             "[Reproduce](#reproduce)\n"]
    return "\n".join(lines)


def headline(table: Table) -> str:
    """The report's first paragraph: which differences are significant after Holm's
    correction, in words, with their intervals; plainly "none" when none is."""
    rows, references, _ = table
    found, tested = [], 0
    for row in rows:
        for ref in references:
            if ref == row.name or row.vs.get(ref, (None, None))[1] is None:
                continue
            tested += 1
            if row.significant(ref) and not _said_in_later_family(row.name, ref, references):
                found.append(_claim(row, ref))
    n = max(r.n for r in rows)
    if not tested:
        return f"Only one model was evaluated ({n} test questions); there is nothing to compare."
    if not found and len({r.accuracy for r in rows}) == 1:
        return (f"**No difference between models is significant**: every model answered "
                f"{_pct(rows[0].accuracy)} of the {n} test questions correctly.")
    if not found:
        best = max(rows, key=lambda r: r.accuracy)
        return (f"**No difference between models is significant** (exact McNemar tests on "
                f"{n} paired test questions, Holm-adjusted over the {tested} comparisons, "
                f"alpha {ALPHA}). The highest point estimate, `{best.name}` at "
                f"{_pct(best.accuracy)} (95% CI {_pct(best.ci95[0])}–{_pct(best.ci95[1])}), "
                f"is not evidence that it is better: {_strongest(rows, references)}.")
    return (f"Significant after Holm's correction (alpha {ALPHA}, {tested} comparisons on "
            f"{n} paired test questions): " + "; ".join(found) + ". Every other difference "
            "is not significant.")


def _said_in_later_family(name: str, ref: str, references: list[str]) -> bool:
    """Two references (kd-none, base) are tested against each other in both families: the
    headline says it once, from the later family ("`kd-none` ... than `base`")."""
    return name in references and references.index(name) > references.index(ref)


def _claim(row: ResultRow, ref: str) -> str:
    diff, p = row.vs[ref]
    low, high = row.ci_vs.get(ref, (math.nan, math.nan))
    direction = "more" if diff > 0 else "less"
    return (f"`{row.name}` is {direction} accurate than `{ref}` by {abs(100 * diff):.1f} "
            f"points (95% CI {_pts(low)} to {_pts(high)}, Holm p {_p(p)})")


def _strongest(rows: list[ResultRow], references: list[str]) -> str:
    """The smallest Holm p among the comparisons, said with its difference and interval."""
    tested = [(row.vs[ref][1], row, ref) for row in rows for ref in references
              if ref != row.name and row.vs.get(ref, (None, None))[1] is not None]
    p, row, ref = min(tested, key=lambda t: t[0])
    diff = row.vs[ref][0]
    low, high = row.ci_vs.get(ref, (math.nan, math.nan))
    return (f"the largest-evidence comparison, `{row.name}` vs `{ref}`, differs by "
            f"{_pts(diff)} points (95% CI {_pts(low)} to {_pts(high)}), Holm p {_p(p)}, "
            "not significant")


def truncation_warnings(layout: Layout, runs: dict[str, EvalRun]) -> list[str]:
    """A warning per model (student or teacher) with more than TRUNCATION_WARNING of its
    answers cut at the token limit, naming the cap to raise."""
    warnings = []
    for name, run in runs.items():
        if run.truncation_rate > TRUNCATION_WARNING and \
                (run.truncated - run.looping) / run.n <= TRUNCATION_WARNING:
            warnings.append(
                f"> **Note: `{name}` hit the token limit on {run.truncated} of {run.n} "
                f"answers ({_pct(run.truncation_rate, 0)}), but {run.looping} of them are "
                f"repetition loops**, which no budget would end: those answers are wrong, not "
                f"cut short; the budget cut {_pct((run.truncated - run.looping) / run.n, 0)}.")
        elif run.truncation_rate > TRUNCATION_WARNING:
            cap = run.max_new_tokens
            warnings.append(
                f"> **Warning: `{name}` hit the token limit on {run.truncated} of {run.n} "
                f"answers ({_pct(run.truncation_rate, 0)}).** Raise `eval.max_new_tokens` "
                f"(now {cap if cap is not None else '?'})"
                + ("" if _get(run.summary, "generation.stop_at_answer")
                   else " or set `eval.stop_at_answer: true`")
                + "; truncated answers without a stated answer are graded wrong.")
    for name, directory in layout.teachers.items():
        m = _teacher_manifest(directory)
        rate, rows = m.get("truncation_rate"), _get(m, "counts.rows")
        loops = m.get("looping") or 0
        if rate is not None and rate > TRUNCATION_WARNING and rows and \
                rate - loops / rows <= TRUNCATION_WARNING:
            warnings.append(
                f"> **Note: the `{name}` teacher hit the token limit on {m.get('truncated')} "
                f"of {rows} answers ({_pct(rate, 0)}), but {loops} of them are repetition "
                f"loops**, which no budget would end; the budget cut "
                f"{_pct(rate - loops / rows, 0)}. Its students learn from those loops.")
        elif rate is not None and rate > TRUNCATION_WARNING:
            cap = _get(m, "generation.max_new_tokens")
            warnings.append(
                f"> **Warning: the `{name}` teacher hit the token limit on "
                f"{m.get('truncated')} of {_get(m, 'counts.rows')} answers "
                f"({_pct(rate, 0)}).** Raise `teacher.max_new_tokens` (now {cap})"
                + ("" if _get(m, "generation.stop_at_answer")
                   else " or set `teacher.stop_at_answer: true`")
                + ": its students learn from unfinished answers.")
    return warnings


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


# --- writing ------------------------------------------------------------------------------------


def build_markdown(layout: Layout, title: str | None = None, examples: int = 1,
                   max_response_chars: int = 1200, power_diff: float | None = None) -> str:
    runs = load_evals(layout)
    assets = layout.run_dir / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    config = _read_yaml(layout.run_dir / "config.yaml")
    title = title or f"primekd experiment: {config.get('name', layout.run_dir.name)}"
    table = results_rows(runs)
    style = answer_style.section(
        {name: answer_style.teacher_rows(d) for name, d in layout.teachers.items()},
        {name: run.rows.values() for name, run in runs.items()})
    sections = [
        section_overview(layout, runs, table, title, power_diff, bool(style)),
        section_paper_table(runs, table, layout),
        section_results(runs, table, assets),
        section_teachers(layout),
        style,
        section_training(layout, assets),
        section_examples(runs, table, examples, max_response_chars),
        section_compute(layout),
        section_attention(layout),
        section_reproduce(layout),
    ]
    return "\n".join(s for s in sections if s).rstrip() + "\n"


def write_report(run_dir: str | Path, layout: Layout | None = None, title: str | None = None,
                 examples: int = 1, max_response_chars: int = 1200,
                 power_diff: float | None = None) -> dict[str, Any]:
    """Write `report.md` and `report.html` into the run directory; returns their paths."""
    run_dir = Path(run_dir)
    layout = layout or Layout.discover(run_dir)
    markdown = build_markdown(layout, title, examples, max_response_chars, power_diff)
    document_title = markdown.splitlines()[0].lstrip("# ").strip()
    atomic_write_text(run_dir / "report.md", markdown)
    atomic_write_text(run_dir / "report.html", markdown_to_html(markdown, run_dir,
                                                                document_title))
    for name in ("report.md", "report.html"):
        (run_dir / name).chmod(0o644)  # a report is for sharing
    return {"report_md": str(run_dir / "report.md"), "report_html": str(run_dir / "report.html"),
            "sections": [line[3:] for line in markdown.splitlines() if line.startswith("## ")]}


# --- plots --------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    _pyplot().close(fig)
    return path


# --- Markdown -> self-contained HTML ------------------------------------------------------------

_CSS = """
body{font:15px/1.5 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
max-width:1100px;margin:2rem auto;padding:0 1.2rem}
h1{font-size:1.8rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
h2{font-size:1.4rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem;margin-top:2.2rem}
h3{font-size:1.1rem}
table{border-collapse:collapse;margin:1rem 0;font-size:14px;display:block;overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:4px 9px}th{background:#f6f8fa}
tr:nth-child(even) td{background:#fbfcfd}
td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f2f4f6;padding:1px 4px;border-radius:4px;font-size:90%}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:10px;overflow-x:auto;
white-space:pre-wrap;font-size:13px}pre code{background:none;padding:0}
blockquote{border-left:4px solid #d0d7de;margin:1rem 0;padding:.2rem 1rem;color:#444}
img{max-width:100%;height:auto;display:block;margin:.8rem 0}
"""


def markdown_to_html(markdown: str, base_dir: str | Path, title: str) -> str:
    """Convert the report's Markdown to one HTML file with every image embedded."""
    body = _markdown_parser().render(markdown, {"base": Path(base_dir)})
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )


def _markdown_parser() -> Any:
    """CommonMark + GFM tables (markdown-it-py), raw HTML escaped, with three local rules:
    headings get ids, right-aligned cells a class, and images and links stay inside the file."""
    from markdown_it import MarkdownIt  # lazy: ~70 modules that only `run`'s report uses

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    parser.core.ruler.push("primekd_self_contained", _self_contained)
    parser.add_render_rule("image", _render_image)
    return parser


def _self_contained(state: Any) -> None:
    tokens = state.tokens
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            token.attrSet("id", _slug(tokens[i + 1].content))
        elif token.type in ("th_open", "td_open") and "right" in str(token.attrGet("style")):
            token.attrs.pop("style")
            token.attrSet("class", "r")
        elif token.type == "inline" and token.children:
            token.children = _drop_local_links(token.children)


def _drop_local_links(children: list[Any]) -> list[Any]:
    """A link to a local file would not open from a shared HTML file: keep only its text."""
    kept, dropping = [], []
    for child in children:
        if child.type == "link_open":
            href = str(child.attrGet("href") or "")
            dropping.append(not (href.startswith("#") or re.match(r"^https?://", href)))
            if dropping[-1]:
                continue
        elif child.type == "link_close" and dropping.pop():
            continue
        kept.append(child)
    return kept


def _render_image(renderer: Any, tokens: list[Any], idx: int, options: Any, env: Any) -> str:
    token = tokens[idx]
    alt = renderer.renderInlineAsText(token.children or [], options, env)
    return _image(alt, str(token.attrGet("src")), env["base"])


def _image(alt: str, src: str, base: Path) -> str:
    if src.startswith("data:"):
        return f'<img alt="{html.escape(alt)}" src="{html.escape(src)}">'
    path = (base / src) if not Path(src).is_absolute() else Path(src)
    if not path.is_file():
        return f"<em>[missing image: {html.escape(src)}]</em>"
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
            ".svg": "image/svg+xml", ".gif": "image/gif"}.get(path.suffix.lower(), "image/png")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{data}">'


def _slug(text: str) -> str:
    text = re.sub(r"<[^>]+>|[`*]", "", text).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")
