"""Tokens per second of batched evaluation against batch size 1, on the same questions.

Both runs use the same loaded model, prompts and greedy settings, one after the other in
this process, so the printed ratio compares like with like. Tokens counted are the answer
tokens the model wrote (padding after a finished answer is not counted).

    python bench/eval_throughput.py --n 16 --batch-size 16 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import time

from primekd.core.data import load_examples
from primekd.core.models import BUNDLED_ALIAS, load
from primekd.engines import Generation, SamplingParams, collect, encode_chats
from primekd.engines.hf import HFEngine
from primekd.evaluate.prompts import load_template


def generate(model, tokenizer, prompts, params, batch_size=16) -> list[Generation]:
    engine = HFEngine(model, tokenizer, batch_size=batch_size)
    return collect(engine.generate(prompts, params), len(prompts))


def timed_generate(model, tokenizer, prompts, params, batch_size) -> tuple[list[Generation], float]:
    started = time.perf_counter()
    generations = generate(model, tokenizer, prompts, params, batch_size=batch_size)
    return generations, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED_ALIAS, help="model reference")
    parser.add_argument("--data", default="test", help="split or JSONL of questions")
    parser.add_argument("--n", type=int, default=16, help="number of questions")
    parser.add_argument("--batch-size", type=int, default=16, help="batched run's batch size")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length cap")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, device=args.device)
    template = load_template()
    prompts = encode_chats(tokenizer, [template.build(e.question)
                                       for e in load_examples(args.data, limit=args.n)])
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    generate(model, tokenizer, prompts[:1], SamplingParams(max_new_tokens=4))  # warm-up

    batched, batched_s = timed_generate(model, tokenizer, prompts, params, args.batch_size)
    single, single_s = timed_generate(model, tokenizer, prompts, params, 1)
    batched_tps = sum(g.n_tokens for g in batched) / batched_s
    single_tps = sum(g.n_tokens for g in single) / single_s
    result = {
        "model": args.model, "device": str(model.device), "threads": torch.get_num_threads(),
        "n": len(prompts), "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "batched_tokens_per_s": round(batched_tps, 2), "batched_seconds": round(batched_s, 2),
        "single_tokens_per_s": round(single_tps, 2), "single_seconds": round(single_s, 2),
        "speedup": round(batched_tps / single_tps, 2),
        "identical_answers": sum(a.token_ids == b.token_ids
                                 for a, b in zip(batched, single, strict=True)),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['n']} questions, max {args.max_new_tokens} new tokens, "
          f"{result['device']}, {result['threads']} threads")
    print(f"batch size {args.batch_size}: {batched_tps:.1f} tokens/s ({batched_s:.1f} s)")
    print(f"batch size 1: {single_tps:.1f} tokens/s ({single_s:.1f} s)")
    print(f"speedup: {result['speedup']:.2f}x; identical answers: "
          f"{result['identical_answers']}/{result['n']}")


if __name__ == "__main__":
    main()
