"""The hf and vllm engines side by side: tokens/s and agreement on the same questions.

Three jobs, each on the same GSM8K questions, prompt and budget, one engine after the other:

- eval generation: greedy answers to the zero-shot eval prompt (generated tokens/s);
- teacher generation with top-k: greedy answers plus the top-k log-probs of every answer
  token (hf: generation, then its teacher-forced pass; vllm: `logprobs` on the generation);
- teacher-forced scoring: top-k log-probs of every token of the reference solutions
  (scored answer tokens/s; prompt tokens are not counted).

The vllm engine starts its own server (default CPU options: bfloat16, eager) unless
--base-url is given; its start-up time is printed apart from the rates.

    python bench/engines.py --n 64 --max-new-tokens 256 --top-k 20
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from primekd.core.data import load_examples
from primekd.core.grading import grade
from primekd.core.models import BUNDLED_ALIAS
from primekd.engines import EngineSpec, SamplingParams, collect, encode_chats, get_engine
from primekd.engines.hf import HFEngine
from primekd.evaluate.prompts import load_template


def timed(job: Callable[[], list[Any]]) -> tuple[list[Any], float]:
    started = time.perf_counter()
    results = job()
    return results, time.perf_counter() - started


def generation_row(name: str, engines: dict[str, Any], prompts: list[list[int]],
                   sampling: SamplingParams, answers: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"job": name}
    outputs = {}
    for label, engine in engines.items():
        outputs[label], seconds = timed(
            lambda e=engine: collect(e.generate(prompts, sampling), len(prompts)))
        tokens = sum(g.n_tokens for g in outputs[label])
        row[f"{label}_tokens_per_s"] = round(tokens / seconds, 1)
        row[f"{label}_seconds"] = round(seconds, 1)
        row[f"{label}_accuracy"] = np.mean([grade(g.text, a).correct
                                            for g, a in zip(outputs[label], answers,
                                                            strict=True)]).round(3)
    pairs = list(zip(outputs["hf"], outputs["vllm"], answers, strict=True))
    identical = sum(a.token_ids == b.token_ids for a, b, _ in pairs)
    same = sum(grade(a.text, r).extracted == grade(b.text, r).extracted for a, b, r in pairs)
    row["identical_answers"] = f"{identical}/{len(prompts)}"
    row["same_extracted"] = f"{same}/{len(prompts)}"
    return row


def scoring_row(engines: dict[str, Any], prompts: list[list[int]],
                references: list[list[int]], k: int) -> dict[str, Any]:
    row: dict[str, Any] = {"job": f"teacher-forced scoring, top-{k}"}
    outputs = {}
    tokens = sum(len(r) for r in references)
    for label, engine in engines.items():
        outputs[label], seconds = timed(
            lambda e=engine: collect(e.score(prompts, references, k), len(prompts)))
        row[f"{label}_tokens_per_s"] = round(tokens / seconds, 1)
        row[f"{label}_seconds"] = round(seconds, 1)
    top1 = np.concatenate([a.ids[:, 0] == b.ids[:, 0]
                           for a, b in zip(outputs["hf"], outputs["vllm"], strict=True)])
    diff = np.concatenate([np.abs(a.logprobs[:, 0] - b.logprobs[:, 0])
                           for a, b in zip(outputs["hf"], outputs["vllm"], strict=True)])
    row["top1_agreement"] = round(float(top1.mean()), 4)
    row["top1_logprob_abs_diff_mean"] = round(float(diff.mean()), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED_ALIAS)
    parser.add_argument("--data", default="test", help="split or JSONL of questions")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="hf batch size")
    parser.add_argument("--base-url", default=None, help="a running vLLM server")
    parser.add_argument("--engine-option", action="append", default=[],
                        help="vllm engine option key=value (repeatable)")
    parser.add_argument("--jobs", default="eval,teacher,score",
                        help="comma-separated subset of eval,teacher,score")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from primekd.engines import parse_options

    hf = HFEngine.load(args.model, batch_size=args.batch_size)
    started = time.perf_counter()
    vllm = get_engine(args.model, EngineSpec("vllm", args.base_url,
                                             parse_options(args.engine_option)))
    startup = time.perf_counter() - started
    engines = {"hf": hf, "vllm": vllm}
    examples = load_examples(args.data, limit=args.n)
    template = load_template()
    prompts = encode_chats(hf.tokenizer, [template.build(e.question) for e in examples])
    answers = [e.answer for e in examples]
    for engine in engines.values():  # warm-up
        collect(engine.generate(prompts[:1], SamplingParams(max_new_tokens=4)), 1)

    rows, jobs = [], args.jobs.split(",")
    if "eval" in jobs:
        rows.append(generation_row("eval generation", engines, prompts,
                                   SamplingParams(args.max_new_tokens), answers))
    if "teacher" in jobs:
        rows.append(generation_row(f"teacher generation, top-{args.top_k}", engines, prompts,
                                   SamplingParams(args.max_new_tokens, logprobs=args.top_k),
                                   answers))
    if "score" in jobs:
        references = [hf.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
        rows.append(scoring_row(engines, prompts, references, args.top_k))
    for row in rows:
        row["ratio"] = round(row["vllm_tokens_per_s"] / row["hf_tokens_per_s"], 2)
    vllm.close()
    import torch

    result = {"model": args.model, "n": len(prompts), "max_new_tokens": args.max_new_tokens,
              "hf_batch_size": args.batch_size, "hf_threads": torch.get_num_threads(),
              "vllm_concurrency": vllm.concurrency, "vllm_startup_s": round(startup, 1),
              "vllm_options": parse_options(args.engine_option), "rows": rows}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['n']} questions, max {args.max_new_tokens} new tokens; hf batch "
          f"{args.batch_size}, {result['hf_threads']} torch threads; vllm {vllm.concurrency} "
          f"requests in flight, server start {startup:.1f} s")
    print(f"{'job':34} {'hf tok/s':>9} {'vllm tok/s':>11} {'ratio':>6}  agreement")
    for row in rows:
        agreement = (f"identical {row['identical_answers']}, same answer "
                     f"{row['same_extracted']}" if "identical_answers" in row else
                     f"top-1 {row['top1_agreement']:.1%}, "
                     f"|d logprob| {row['top1_logprob_abs_diff_mean']:.3f}")
        print(f"{row['job']:34} {row['hf_tokens_per_s']:>9.1f} {row['vllm_tokens_per_s']:>11.1f}"
              f" {row['ratio']:>5.2f}x  {agreement}")


if __name__ == "__main__":
    main()
