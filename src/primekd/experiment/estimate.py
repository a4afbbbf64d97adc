"""How long each stage of a run should take, from the config's measured rates (`costs`).

A small cost model, one line per stage kind; its inputs are the stage's own settings and the
rates measured on the machine that will run it (docs/run.md, "The pair preset"):

- teacher: questions x samples x min(answer_tokens, max_new_tokens) / teacher_tokens_per_s,
  or, with `target: reference`, (prompt + reference) tokens / score_tokens_per_s; + start_s;
- student: steps x batch x grad_accum x min(prompt + answer, max_length) tokens /
  train_tokens_per_s (sft: the reference instead of the answer); an on-policy student adds
  its rollouts at the eval rate and their scoring at the score rate;
- eval: questions x min(answer_tokens, max_new_tokens) / eval_tokens_per_s + start_s;
- attention, report: fixed.

A stage whose rate is null has no estimate. Stages already complete cost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from primekd.core.data import load_examples
from primekd.experiment.config import (
    STAGE_CONFIGS,
    CostSection,
    DataSlice,
    ExperimentConfig,
    stage_defaults,
)
from primekd.experiment.stages import Stage


@dataclass(frozen=True)
class StageEstimate:
    name: str
    seconds: float | None  # None: its rate is not set
    basis: str  # what the figure counts, in words


def estimate(config: ExperimentConfig, stages: list[Stage]) -> list[StageEstimate]:
    """One estimate per stage; a complete (cached) stage costs 0."""
    counts = {"transfer": questions(config.data.transfer), "test": questions(config.data.test)}
    out = []
    for stage in stages:
        if stage.state() == "cached":
            out.append(StageEstimate(stage.name, 0.0, "cached"))
            continue
        settings = {**stage_defaults(STAGE_CONFIGS[stage.kind]), **stage.params} \
            if stage.kind in STAGE_CONFIGS else dict(stage.params)
        seconds, basis = _ESTIMATORS[stage.kind](config.costs, settings, counts)
        out.append(StageEstimate(stage.name, seconds, basis))
    return out


def total(estimates: list[StageEstimate]) -> float | None:
    """The sum, or None when any stage has no estimate."""
    if any(e.seconds is None for e in estimates):
        return None
    return sum(e.seconds for e in estimates)  # type: ignore[misc]


def questions(slc: DataSlice) -> int:
    return len(load_examples(slc.split, slc.limit, slc.offset, slc.sample, slc.seed))


def _rate(seconds_work: float, rate: float | None, start: float = 0.0) -> float | None:
    return None if rate is None else seconds_work / rate + start


def _teacher(costs: CostSection, s: dict[str, Any], n: dict[str, int]
             ) -> tuple[float | None, str]:
    count = n["transfer"]
    if s.get("shard"):
        count = math.ceil(count / int(str(s["shard"]).split("/")[1]))
    if s.get("target") == "reference":
        tokens = count * (costs.prompt_tokens + costs.reference_tokens)
        return (_rate(tokens, costs.score_tokens_per_s, costs.start_s),
                f"{count} references scored, {tokens:,.0f} tokens")
    answer = min(costs.answer_tokens, s["max_new_tokens"])
    tokens = count * s.get("samples_per_question", 1) * answer
    return (_rate(tokens, costs.teacher_tokens_per_s, costs.start_s),
            f"{count} answers x {answer:.0f} tokens")


def _student(costs: CostSection, s: dict[str, Any], n: dict[str, int]
             ) -> tuple[float | None, str]:
    answer = costs.reference_tokens if s.get("objective") == "sft" else costs.answer_tokens
    length = min(costs.prompt_tokens + answer, s["max_length"])
    if s.get("on_policy"):
        return _on_policy(costs, s, length)
    per_step = s["batch_size"] * s.get("grad_accum", 1)
    steps = s.get("max_steps") or math.ceil(
        (s.get("epochs") or 1) * max(1, n["transfer"] - s.get("val_size", 0)) / per_step)
    tokens = steps * per_step * length
    return (_rate(tokens, costs.train_tokens_per_s),
            f"{steps} steps x {per_step} x {length:.0f} tokens")


def _on_policy(costs: CostSection, s: dict[str, Any], length: float
               ) -> tuple[float | None, str]:
    sequences = s["rounds"] * s["round_size"] * s["samples_per_question"]
    rollout = min(costs.answer_tokens, s["rollout_max_new_tokens"])
    parts = [_rate(sequences * length, costs.train_tokens_per_s),
             _rate(sequences * rollout, costs.eval_tokens_per_s, costs.start_s),
             _rate(sequences * length, costs.score_tokens_per_s, costs.start_s)]
    seconds = None if None in parts else sum(parts)  # type: ignore[arg-type]
    return seconds, f"{sequences} rollouts, scored and trained on"


def _eval(costs: CostSection, s: dict[str, Any], n: dict[str, int]
          ) -> tuple[float | None, str]:
    answer = min(costs.answer_tokens, s["max_new_tokens"])
    return (_rate(n["test"] * answer, costs.eval_tokens_per_s, costs.start_s),
            f"{n['test']} answers x {answer:.0f} tokens")


def _fixed(name: str) -> Any:
    def fixed(costs: CostSection, s: dict[str, Any], n: dict[str, int]
              ) -> tuple[float | None, str]:
        return float(getattr(costs, f"{name}_s")), "fixed"
    return fixed


_ESTIMATORS = {"teacher": _teacher, "distill": _student, "eval": _eval,
               "attention": _fixed("attention"), "report": _fixed("report")}
