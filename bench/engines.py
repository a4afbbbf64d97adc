"""The hf and vllm engines side by side: tokens/s and agreement on the same questions.

Three jobs, each on the same GSM8K questions, prompt and budget, one engine after the other:

- eval generation: greedy answers to the zero-shot eval prompt (generated tokens/s);
- teacher generation with top-k: greedy answers plus the top-k log-probs of every answer
  token (hf: generation, then its teacher-forced pass; vllm: `logprobs` on the generation);
- teacher-forced scoring: top-k log-probs of every token of the reference solutions
  (scored answer tokens/s; prompt tokens are not counted).

The hf engine runs each job once; then each vllm variant (`--vllm-variant`, repeatable: a
comma-separated list of engine options, "" for the defaults, which on CPU follow the CPU's
bf16 support) starts its own server (unless --base-url) and runs the same jobs. Each row
compares one variant with hf; server start-up is printed apart from the rates.

    python bench/engines.py --n 64 --max-new-tokens 256 --top-k 20
    # the issue-26 measurement: defaults (fp32 here) and bf16 against hf, one thread each
    python bench/engines.py --n 48 --max-new-tokens 192 --jobs eval --threads 1 \
        --vllm-variant "" --vllm-variant dtype=bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from primekd.core.data import load_examples
from primekd.core.grading import grade
from primekd.core.models import BUNDLED_ALIAS
from primekd.engines import EngineSpec, SamplingParams, collect, encode_chats, get_engine
from primekd.engines.cpu_features import cpu_dtype, native_bf16
from primekd.engines.hf import HFEngine
from primekd.evaluate.prompts import load_template


def timed(job: Callable[[], list[Any]]) -> tuple[list[Any], float]:
    started = time.perf_counter()
    results = job()
    return results, time.perf_counter() - started


def run_generation(engine: Any, prompts: list[list[int]], sampling: SamplingParams,
                   answers: list[str]) -> dict[str, Any]:
    outputs, seconds = timed(lambda: collect(engine.generate(prompts, sampling), len(prompts)))
    tokens = sum(g.n_tokens for g in outputs)
    accuracy = np.mean([grade(g.text, a).correct for g, a in zip(outputs, answers, strict=True)])
    return {"outputs": outputs, "tokens_per_s": round(tokens / seconds, 1),
            "seconds": round(seconds, 1), "accuracy": round(float(accuracy), 3)}


def generation_agreement(hf: list[Any], vllm: list[Any], answers: list[str]) -> dict[str, Any]:
    pairs = list(zip(hf, vllm, answers, strict=True))
    identical = sum(a.token_ids == b.token_ids for a, b, _ in pairs)
    same = sum(grade(a.text, r).extracted == grade(b.text, r).extracted for a, b, r in pairs)
    return {"identical_answers": f"{identical}/{len(pairs)}",
            "same_extracted": f"{same}/{len(pairs)}"}


def run_scoring(engine: Any, prompts: list[list[int]], references: list[list[int]], k: int
                ) -> dict[str, Any]:
    outputs, seconds = timed(lambda: collect(engine.score(prompts, references, k),
                                             len(prompts)))
    tokens = sum(len(r) for r in references)
    return {"outputs": outputs, "tokens_per_s": round(tokens / seconds, 1),
            "seconds": round(seconds, 1)}


def scoring_agreement(hf: list[Any], vllm: list[Any]) -> dict[str, Any]:
    top1 = np.concatenate([a.ids[:, 0] == b.ids[:, 0] for a, b in zip(hf, vllm, strict=True)])
    diff = np.concatenate([np.abs(a.logprobs[:, 0] - b.logprobs[:, 0])
                           for a, b in zip(hf, vllm, strict=True)])
    return {"top1_agreement": round(float(top1.mean()), 4),
            "top1_logprob_abs_diff_mean": round(float(diff.mean()), 4)}


def run_jobs(engine: Any, jobs: dict[str, Callable[[Any], dict[str, Any]]]
             ) -> dict[str, dict[str, Any]]:
    collect(engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4)), 1)  # warm-up
    return {name: job(engine) for name, job in jobs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED_ALIAS)
    parser.add_argument("--data", default="test", help="split or JSONL of questions")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="hf batch size")
    parser.add_argument("--base-url", default=None, help="a running vLLM server")
    parser.add_argument("--vllm-variant", action="append", default=[],
                        help="vllm engine options key=value,key=value ('' = defaults); "
                             "repeatable: one server each")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the hf engine (default: torch's)")
    parser.add_argument("--jobs", default="eval,teacher,score",
                        help="comma-separated subset of eval,teacher,score")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from primekd.engines import parse_options
    from primekd.engines.vllm import shutdown

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    examples = load_examples(args.data, limit=args.n)
    hf = HFEngine.load(args.model, batch_size=args.batch_size)
    template = load_template()
    prompts = encode_chats(hf.tokenizer, [template.build(e.question) for e in examples])
    answers = [e.answer for e in examples]
    references = [hf.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    jobs: dict[str, Callable[[Any], dict[str, Any]]] = {}
    if "eval" in args.jobs.split(","):
        jobs["eval generation"] = lambda e: run_generation(
            e, prompts, SamplingParams(args.max_new_tokens), answers)
    if "teacher" in args.jobs.split(","):
        jobs[f"teacher generation, top-{args.top_k}"] = lambda e: run_generation(
            e, prompts, SamplingParams(args.max_new_tokens, logprobs=args.top_k), answers)
    if "score" in args.jobs.split(","):
        jobs[f"teacher-forced scoring, top-{args.top_k}"] = lambda e: run_scoring(
            e, prompts, references, args.top_k)
    theirs = run_jobs(hf, jobs)
    import torch

    result: dict[str, Any] = {
        "model": args.model, "n": len(prompts), "max_new_tokens": args.max_new_tokens,
        "hf_batch_size": args.batch_size, "hf_threads": torch.get_num_threads(),
        "cpu": cpu_name(), "native_bf16": native_bf16(), "variants": []}
    for variant in args.vllm_variant or [""]:
        options = parse_options([o for o in variant.split(",") if o])
        started = time.perf_counter()
        vllm = get_engine(args.model, EngineSpec("vllm", args.base_url, options))
        startup = time.perf_counter() - started
        try:
            ours = run_jobs(vllm, jobs)
        finally:
            vllm.close()
            shutdown()
        rows = []
        for name, mine in ours.items():
            base = theirs[name]
            agreement = (scoring_agreement(base["outputs"], mine["outputs"])
                         if "scoring" in name else
                         generation_agreement(base["outputs"], mine["outputs"], answers))
            rows.append({"job": name, "hf_tokens_per_s": base["tokens_per_s"],
                         "vllm_tokens_per_s": mine["tokens_per_s"],
                         "ratio": round(mine["tokens_per_s"] / base["tokens_per_s"], 2),
                         "hf_accuracy": base.get("accuracy"),
                         "vllm_accuracy": mine.get("accuracy"), **agreement})
        result["variants"].append({"options": options or "defaults",
                                   "dtype": _served_dtype(options),
                                   "concurrency": vllm.concurrency,
                                   "startup_s": round(startup, 1), "rows": rows})
        print(json.dumps(result["variants"][-1]), file=sys.stderr, flush=True)  # so far
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['n']} questions, max {args.max_new_tokens} new tokens; CPU {result['cpu']}"
          f" (native bf16: {result['native_bf16']}); hf batch {args.batch_size}, "
          f"{result['hf_threads']} torch threads")
    for variant in result["variants"]:
        print(f"\nvllm {variant['options']} (dtype {variant['dtype']}): "
              f"{variant['concurrency']} requests in flight, server start "
              f"{variant['startup_s']:.1f} s")
        print(f"{'job':34} {'hf tok/s':>9} {'vllm tok/s':>11} {'ratio':>6}  agreement")
        for row in variant["rows"]:
            agreement = (f"identical {row['identical_answers']}, same answer "
                         f"{row['same_extracted']}" if "identical_answers" in row else
                         f"top-1 {row['top1_agreement']:.1%}, "
                         f"|d logprob| {row['top1_logprob_abs_diff_mean']:.3f}")
            print(f"{row['job']:34} {row['hf_tokens_per_s']:>9.1f} "
                  f"{row['vllm_tokens_per_s']:>11.1f} {row['ratio']:>5.2f}x  {agreement}")


def _served_dtype(options: dict[str, Any]) -> str:
    return str(options.get("dtype") or cpu_dtype())


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
