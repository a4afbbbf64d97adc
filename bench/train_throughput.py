"""Training tokens/s of `primekd distill` against TRL's GKDTrainer (lmbda=0, off-policy).

Same student (the bundled SmolLM2-135M-Instruct, LoRA r/alpha/dropout/targets as ours), same
teacher (the bundled model too), same prompts (eval's zero-shot template in the student's
chat template), same answers (the store's teacher answers), same batch size and divergence
(generalised JSD, beta 0.5, T = 1, no CE term: GKD's loss). Tokens are non-padding tokens of
the training batches; tokens/s is measured between the end of the first (warm-up) step and
the end of the last.

The structural difference being measured: GKD runs the teacher's forward pass on every
batch and materialises full (B, S, V) logits for student and teacher; `primekd distill`
reads the teacher's top-k from the store (computed once by `primekd teach`, whose scoring
rate is printed too, so the end-to-end cost per epoch can be worked out) and projects only
the answer positions, chunk by chunk.

    python bench/train_throughput.py --steps 6 --batch-size 4
    python bench/train_throughput.py --store DIR   # reuse a store from `primekd teach`
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from primekd.core.models import BUNDLED_ALIAS


class Clock(TrainerCallback):
    """(wall time, CPU time, tokens) at the end of every optimizer step.

    On a shared CPU the wall clock measures the neighbours as much as the code; the process's
    CPU time (all its threads) is the steadier measure of the work done, so both are kept.
    """

    def __init__(self, tokens: Any):
        self.tokens, self.marks = tokens, []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.marks.append((time.perf_counter(), time.process_time(), self.tokens()))

    def rate(self) -> dict[str, float]:
        (w0, c0, n0), (w1, c1, n1) = self.marks[0], self.marks[-1]
        return {"wall": (n1 - n0) / (w1 - w0), "cpu": (n1 - n0) / (c1 - c0)}


class CountingCollator:
    def __init__(self, collator: Any):
        self.collator, self.tokens = collator, 0

    def __call__(self, features: list) -> dict:
        batch = self.collator(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def ensure_store(path: Path | None, n: int, top_k: int) -> Path:
    from primekd.teach.teacher import TeachConfig, teach

    if path is not None:
        return path
    path = Path(tempfile.mkdtemp(prefix="bench-store-")) / "store"
    manifest = teach(TeachConfig(teacher=BUNDLED_ALIAS, out=path, target="reference",
                                 limit=n, top_k=top_k, batch_size=8), progress=False)
    print(f"teacher store: {n} answers scored at {manifest['tokens_per_s']} answer tokens/s")
    return path


def run_primekd(store: Path, args: argparse.Namespace) -> dict[str, float]:
    from primekd.distill import distill
    from primekd.distill.config import DistillConfig
    from primekd.distill.data import KDCollator

    counter = {"n": 0}
    original = KDCollator.__call__

    def counting(self: Any, items: list) -> dict:
        batch = original(self, items)
        counter["n"] += int(batch["attention_mask"].sum())
        return batch

    KDCollator.__call__ = counting
    clock = Clock(lambda: counter["n"])
    try:
        with tempfile.TemporaryDirectory() as out:
            distill(DistillConfig(
                out=out, student=BUNDLED_ALIAS, teacher_store=str(store), objective="kd",
                alpha=0.0, divergence="jsd", beta=0.5, temperature=1.0,
                max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                logging_steps=args.steps, save_steps=10**6, warmup_ratio=0.0, device="cpu"),
                callbacks=[clock], progress=False)
    finally:
        KDCollator.__call__ = original
    return clock.rate()


def run_trl(store: Path, args: argparse.Namespace) -> dict[str, float]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    from primekd.core.models import load_model, load_tokenizer
    from primekd.distill.config import DistillConfig
    from primekd.evaluate.prompts import load_template
    from primekd.teach import store as st

    defaults = DistillConfig()
    template = load_template(None)
    rows = st.load_store(store, columns=["question", "response"]).to_pylist()
    data = Dataset.from_list([{"messages": [
        {"role": "user", "content": template.build(r["question"]).user},
        {"role": "assistant", "content": r["response"]}]} for r in rows])
    tokenizer = load_tokenizer(BUNDLED_ALIAS, padding_side="right")
    collator = CountingCollator(DataCollatorForChatML(tokenizer=tokenizer,
                                                      max_length=args.max_length))
    clock = Clock(lambda: collator.tokens)
    with tempfile.TemporaryDirectory() as out:
        config = GKDConfig(
            output_dir=out, lmbda=0.0, beta=0.5, temperature=1.0, max_steps=args.steps,
            per_device_train_batch_size=args.batch_size, max_length=args.max_length,
            learning_rate=2e-4, lr_scheduler_type="cosine", logging_steps=args.steps,
            save_strategy="no", report_to="none", use_cpu=True, disable_dropout=False,
            seed=0, disable_tqdm=True)
        trainer = GKDTrainer(
            model=load_model(BUNDLED_ALIAS, device="cpu"),
            teacher_model=load_model(BUNDLED_ALIAS, device="cpu"), args=config,
            train_dataset=data, processing_class=tokenizer, data_collator=collator,
            peft_config=LoraConfig(r=defaults.lora_r, lora_alpha=defaults.lora_alpha,
                                   lora_dropout=defaults.lora_dropout,
                                   target_modules=defaults.target_modules,
                                   task_type="CAUSAL_LM"),
            callbacks=[clock])
        trainer.train()
    return clock.rate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, help="teacher store (default: teach one, reference "
                   "target, on the bundled model)")
    p.add_argument("--questions", type=int, default=32, help="questions in a new store")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--json", dest="json_out", help="write the figures to this file")
    args = p.parse_args()
    store = ensure_store(args.store, args.questions, args.top_k)
    ours = run_primekd(store, args)
    print(f"primekd distill: {ours['wall']:,.1f} tokens/s wall, {ours['cpu']:,.1f} per CPU-s",
          flush=True)
    theirs = run_trl(store, args)
    print(f"TRL GKDTrainer:  {theirs['wall']:,.1f} tokens/s wall, "
          f"{theirs['cpu']:,.1f} per CPU-s")
    ratio = {k: ours[k] / theirs[k] for k in ours}
    print(f"ratio (primekd / TRL): {ratio['wall']:.2f}x wall, {ratio['cpu']:.2f}x CPU time")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"primekd_tokens_per_s": ours, "trl_gkd_tokens_per_s": theirs, "ratio": ratio,
             "steps": args.steps, "batch_size": args.batch_size,
             "max_length": args.max_length, "store": str(store)}, indent=2))


if __name__ == "__main__":
    main()
