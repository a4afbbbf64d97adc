"""Teacher-store size per answer token, and teacher generation tokens/s by batch size.

Runs `teach` twice on the same questions with greedy decoding, once at `--batch-size` and
once at batch size 1, each into its own temporary store, and reports:

- bytes per answer token of the store on disk (all Parquet parts, and the top-k columns
  alone) against full-vocabulary float32 logits (vocab x 4 bytes per token, what the paper
  stored) for the same answers;
- generation tokens/s (answer tokens / time in `generate`) at both batch sizes.

    python bench/teacher_store.py --n 16 --batch-size 8 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from primekd.core.models import BUNDLED_ALIAS, load_tokenizer
from primekd.teach import store
from primekd.teach.teacher import TeachConfig, teach


def column_bytes(directory: Path) -> dict[str, int]:
    """Compressed bytes per column, summed over every part's row groups."""
    sizes: dict[str, int] = {}
    for path in store.part_files(directory):
        metadata = pq.ParquetFile(path).metadata
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                name = column.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + column.total_compressed_size
    return sizes


def run(args: argparse.Namespace, batch_size: int, out: Path) -> dict:
    config = TeachConfig(teacher=args.model, out=out, strategy=args.strategy, data=args.data,
                         limit=args.n, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                         batch_size=batch_size, device=args.device)
    return teach(config, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED_ALIAS, help="teacher model reference")
    parser.add_argument("--strategy", default="ground_truth", help="priming strategy")
    parser.add_argument("--data", default="train", help="split or JSONL of questions")
    parser.add_argument("--n", type=int, default=16, help="number of questions")
    parser.add_argument("--batch-size", type=int, default=8, help="batched run's batch size")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap")
    parser.add_argument("--top-k", type=int, default=20, help="log-probs kept per token")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    vocab = len(load_tokenizer(args.model))
    with tempfile.TemporaryDirectory(prefix="primekd-bench-") as tmp:
        batched = run(args, args.batch_size, Path(tmp) / "batched")
        single = run(args, 1, Path(tmp) / "single")
        sizes = column_bytes(Path(tmp) / "batched")
        tokens = sum(len(ids) for ids in
                     store.load_store(Path(tmp) / "batched", columns=["token_ids"])[
                         "token_ids"].to_pylist())
    store_bytes = sum(sizes.values())
    topk_bytes = sizes["topk_ids"] + sizes["topk_logprobs"]
    logits_per_token = vocab * 4
    result = {
        "model": args.model,
        "questions": args.n,
        "answer_tokens": tokens,
        "top_k": args.top_k,
        "vocab_size": vocab,
        "store_bytes_per_token": round(store_bytes / tokens, 1),
        "topk_bytes_per_token": round(topk_bytes / tokens, 1),
        "full_logits_bytes_per_token": logits_per_token,
        "store_vs_logits_ratio": round(logits_per_token / (store_bytes / tokens), 1),
        "batch_size": args.batch_size,
        "tokens_per_s_batched": batched["generation_tokens_per_s"],
        "tokens_per_s_batch1": single["generation_tokens_per_s"],
        "speedup": round(batched["generation_tokens_per_s"]
                         / single["generation_tokens_per_s"], 2),
        "wall_s_batched": batched["wall_time_s"],
        "wall_s_batch1": single["wall_time_s"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}: {args.n} questions, {tokens} answer tokens, top-{args.top_k}, "
          f"vocab {vocab}")
    print(f"store on disk:      {result['store_bytes_per_token']:>10.1f} bytes/token "
          f"(top-k columns {result['topk_bytes_per_token']:.1f})")
    print(f"full float32 logits:{logits_per_token:>10d} bytes/token "
          f"({result['store_vs_logits_ratio']:.0f}x larger)")
    print(f"generation: {result['tokens_per_s_batched']:.1f} tokens/s at batch "
          f"{args.batch_size}, {result['tokens_per_s_batch1']:.1f} at batch 1 "
          f"({result['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
