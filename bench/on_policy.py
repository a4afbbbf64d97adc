"""Seconds per 1,000 training tokens: on-policy vs off-policy distillation, with the split.

Both on the bundled SmolLM2-135M-Instruct as student and (self-)teacher, ground-truth
priming, the same questions, token budget, LoRA and batch size:

- off-policy: `primekd teach` (the primed teacher writes answers with its top-k), then
  `primekd distill` on that store; the teacher pass is paid once per store, so it is shown
  both included and apart;
- on-policy: `primekd distill --on-policy` (the student rolls out, the primed teacher scores
  its tokens, the student trains), `--rounds` x `--round-size` questions.

    python bench/on_policy.py --n 8 --rounds 2 --max-new-tokens 64
    python bench/on_policy.py --engine vllm   # rollouts and scoring through a vLLM server

Prints one JSON line per method and a side-by-side table with the ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from primekd.core.models import BUNDLED_ALIAS
from primekd.distill import distill
from primekd.distill.config import DistillConfig
from primekd.teach.teacher import TeachConfig, teach


def off_policy(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    started = time.perf_counter()
    manifest = teach(TeachConfig(teacher=BUNDLED_ALIAS, out=root / "teacher",
                                 strategy="ground_truth", limit=args.n,
                                 max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                                 batch_size=args.batch_size * 4, device="cpu"),
                     progress=False)
    teach_s = time.perf_counter() - started
    result = distill(DistillConfig(student=BUNDLED_ALIAS, teacher_store=str(root / "teacher"),
                                   out=str(root / "off"), alpha=0.0, epochs=args.rounds,
                                   batch_size=args.batch_size, max_length=512,
                                   device="cpu", save_steps=10 ** 6),
                     progress=False)
    tokens = result.summary["tokens"]
    train_s = result.summary["train_runtime_s"]
    return {"method": "off-policy", "tokens": tokens, "teacher_s": round(teach_s, 1),
            "train_s": round(train_s, 1),
            "teacher_accuracy": manifest.get("teacher_accuracy"),
            "s_per_1k_train_only": round(train_s / tokens * 1000, 2),
            "s_per_1k": round((teach_s + train_s) / tokens * 1000, 2)}


def on_policy(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    options = {"dtype": "float32"} if args.engine == "vllm" else {}
    result = distill(DistillConfig(student=BUNDLED_ALIAS, out=str(root / "on"), on_policy=True,
                                   strategy="ground_truth", alpha=0.0, rounds=args.rounds,
                                   round_size=args.n, limit=args.n,
                                   rollout_max_new_tokens=args.max_new_tokens,
                                   rollout_temperature=1.0, top_k=args.top_k,
                                   batch_size=args.batch_size, max_length=512, device="cpu",
                                   engine=args.engine, engine_options=options),
                     progress=False)
    info = result.summary["on_policy"]
    cost, tokens = info["cost_s"], result.summary["tokens"]
    total = cost["rollout_s"] + cost["score_s"] + cost["train_s"]
    return {"method": "on-policy", "tokens": tokens, "rollout_s": cost["rollout_s"],
            "score_s": cost["score_s"], "train_s": cost["train_s"],
            "student_accuracy": [r["student_accuracy"] for r in info["rounds"]],
            "s_per_1k_train_only": round(cost["train_s"] / tokens * 1000, 2),
            "s_per_1k": round(total / tokens * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=8, help="questions (per round on-policy)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="on-policy rounds; off-policy trains as many epochs")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [off_policy(args, Path(tmp)), on_policy(args, Path(tmp))]
    for row in rows:
        print(json.dumps(row))
    off, on = rows
    print(f"\n{'':28}{'off-policy':>12}{'on-policy':>12}{'ratio':>8}")
    print(f"{'training tokens':28}{off['tokens']:>12}{on['tokens']:>12}")
    print(f"{'teacher generation (s)':28}{off['teacher_s']:>12}{'-':>12}")
    print(f"{'student rollout (s)':28}{'-':>12}{on['rollout_s']:>12}")
    print(f"{'teacher scoring (s)':28}{'-':>12}{on['score_s']:>12}")
    print(f"{'training (s)':28}{off['train_s']:>12}{on['train_s']:>12}")
    for key, label in (("s_per_1k_train_only", "s / 1k tokens, training"),
                       ("s_per_1k", "s / 1k tokens, all")):
        print(f"{label:28}{off[key]:>12}{on[key]:>12}{on[key] / off[key]:>7.2f}x")


if __name__ == "__main__":
    main()
