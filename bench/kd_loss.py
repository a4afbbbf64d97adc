"""Peak memory and time of the chunked KD loss against a naive dense one.

Both compute the same objective (CE + reverse KL to a top-k + rest teacher) from the
student's final hidden states at the answer positions, forward and backward:

- naive: project all positions at once to (S, V) logits, then the loss in one piece; autograd
  keeps the float32 logits and every softmax intermediate for the backward pass;
- chunked: `primekd.distill.kd_loss.kd_loss_parts` with the head inside, `--chunk` tokens at a time
  under activation checkpointing, so at most one chunk's (chunk, V) tensors are alive.

Memory. On CUDA we read `torch.cuda.max_memory_allocated`. On CPU PyTorch allocates with
malloc, which `tracemalloc` does not see, and the profiler's memory view is per-operator; so
each measurement runs in a fresh subprocess and reports the growth of the process's peak
resident set (`ru_maxrss`) over the baseline taken after the inputs were allocated. That is
a conservative (allocator-level) figure, and it is exact about what matters: the high-water
mark the loss adds.

    python bench/kd_loss.py --quick            # small sizes, a minute on a laptop CPU
    python bench/kd_loss.py --device cuda      # seq 256..4096, vocab 49152 and 128256
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from primekd.distill.kd_loss import kd_loss_parts


def inputs(seq: int, vocab: int, hidden: int, k: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(seq, hidden, generator=g).mul_(0.5).to(device).requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=g).div_(hidden**0.5).to(device)
    labels = torch.randint(0, vocab, (seq,), generator=g).to(device)
    # A plausible sparse teacher (k distinct ids per row), built without any (seq, vocab)
    # tensor or per-row vocabulary-sized temporaries: those would raise the process's peak
    # RSS (or fragment its heap) before the baseline is read and hide what the loss adds.
    start = torch.randint(0, vocab, (seq, 1), generator=g)
    ids = (start + torch.arange(k) * 7919) % vocab  # 7919 is prime: distinct for k < vocab
    lp = torch.log_softmax(torch.randn(seq, k + 1, generator=g) * 2, -1)[:, :k]
    return h, w, labels, ids.to(device), lp.to(device)


def run_once(method: str, h, w, labels, ids, lp, chunk: int) -> float:
    head = lambda x: x @ w.T  # noqa: E731
    h.grad = None
    start = time.perf_counter()
    if method == "naive":
        logits = head(h).float()
        parts = kd_loss_parts(logits, labels, topk_ids=ids, topk_logprobs=lp, alpha=0.5,
                              kind="reverse_kl", chunk_size=len(labels), use_checkpoint=False)
    else:
        parts = kd_loss_parts(h, labels, head=head, topk_ids=ids, topk_logprobs=lp, alpha=0.5,
                              kind="reverse_kl", chunk_size=chunk)
    parts.loss.backward()
    if h.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(method: str, seq: int, vocab: int, hidden: int, k: int, chunk: int, device: str,
            repeats: int) -> dict:
    """One configuration in this process (call it in a fresh process for CPU memory)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tensors = inputs(seq, vocab, hidden, k, device)
    small = [t[:8] if t.dim() else t for t in tensors[:1]] + [tensors[1]] + \
        [t[:8] for t in tensors[2:]]
    run_once(method, small[0].detach().requires_grad_(True), *small[1:], chunk)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = [run_once(method, *tensors, chunk) for _ in range(repeats)]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"method": method, "seq": seq, "vocab": vocab, "hidden": hidden, "k": k,
            "chunk": chunk, "device": device, "time_s": statistics.median(times),
            "peak_extra_mb": peak / 2**20}


def in_subprocess(args: argparse.Namespace, method: str, seq: int, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--one", method, str(seq), str(vocab),
           "--hidden", str(args.hidden), "--k", str(args.k), "--chunk", str(args.chunk),
           "--device", args.device, "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "seq": seq, "vocab": vocab, "error": proc.stderr[-300:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seq 256, 1024, 2048; vocab 49152")
    p.add_argument("--seqs", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--vocabs", type=int, nargs="*", default=[49152, 128256])
    p.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    p.add_argument("--k", type=int, default=20, help="teacher top-k")
    p.add_argument("--chunk", type=int, default=256, help="tokens per chunk")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="json_out", help="also write the rows to this file")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        method, seq, vocab = args.one[0], int(args.one[1]), int(args.one[2])
        row = measure(method, seq, vocab, args.hidden, args.k, args.chunk, args.device,
                      args.repeats)
        print(json.dumps(row))
        return
    if args.quick:
        args.seqs, args.vocabs, args.repeats = [256, 1024, 2048], [49152], 2
    rows = []
    print(f"{'vocab':>7} {'seq':>5} {'naive MB':>9} {'chunked MB':>10} {'mem ratio':>9} "
          f"{'naive s':>8} {'chunked s':>9} {'time ratio':>10}")
    for vocab in args.vocabs:
        for seq in args.seqs:
            naive = in_subprocess(args, "naive", seq, vocab)
            chunked = in_subprocess(args, "chunked", seq, vocab)
            rows += [naive, chunked]
            if "error" in naive or "error" in chunked:
                print(f"{vocab:>7} {seq:>5} failed: {naive.get('error') or chunked.get('error')}")
                continue
            mem = naive["peak_extra_mb"] / max(chunked["peak_extra_mb"], 1e-6)
            speed = chunked["time_s"] / naive["time_s"]
            print(f"{vocab:>7} {seq:>5} {naive['peak_extra_mb']:>9.0f} "
                  f"{chunked['peak_extra_mb']:>10.0f} {mem:>9.1f} {naive['time_s']:>8.3f} "
                  f"{chunked['time_s']:>9.3f} {speed:>10.2f}", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
