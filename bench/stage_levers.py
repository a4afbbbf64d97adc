"""Stage throughput levers on a CPU, side by side in one run, each with its MFU.

For the real pair (Qwen2.5-Coder 0.5B student, 1.5B teacher; issue 23): each configuration
runs in a fresh child process (thread counts and OMP_WAIT_POLICY must be set before torch
starts), and every child measures the machine's fp32 matmul peak (2048 x 2048, torch) in the
same process just before its jobs, so each job's model FLOPs utilisation (MFU) is its useful
FLOP/s over a peak measured under the same load:

- scoring (teacher-forced pass, the teacher's `--target reference` and the eval prefill):
  2 * P FLOP per scored token;
- decoding (generation, `generate` with a fixed number of new tokens per row):
  2 * P FLOP per generated token;
- LoRA training (forward + backward, full-vocabulary cross-entropy): 6 * P FLOP per trained
  token (the usual convention; with frozen base weights the backward needs only the
  activation gradients, about 4 * P, so the convention overstates the work by ~1.5x).

P counts the parameters that take part in a token's matmuls: every weight except the input
embedding table (a lookup), plus the output head (the embedding again when it is tied).

Each child also measures CPU time: the matmul's GFLOP per CPU-second (x cores = the peak of
the same cores with nothing else running) and each job's work per CPU-second (`mfu_cpu`),
which the neighbours change little; bf16 is timed against fp32 on a 512 x 512 matmul only
(on a CPU without native bf16 a 2048 one takes minutes).

Configurations (each a child process; "busy" starts one competing process spinning on a
core for the child's lifetime, the way another job shares a 2-core machine):

    python bench/stage_levers.py                       # the default set, minutes when free
    python bench/stage_levers.py --only student-t2 --json out.json

The printed ratios compare children of the same run; the machine's load average is printed
beside them (on a shared machine the absolute rates move with the neighbours).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GGUF = Path.home() / ".cache" / "primekd" / "gguf"
STUDENT = str(GGUF / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
TEACHER = str(GGUF / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")

# name -> (model, threads, OMP_WAIT_POLICY or None, busy competitor, jobs)
CONFIGS: dict[str, tuple[str, int, str | None, bool, tuple[str, ...]]] = {
    "student-t2": (STUDENT, 2, None, False,
                   ("score", "decode-b1", "decode-b8", "train")),
    "student-t2-passive": (STUDENT, 2, "PASSIVE", False, ("score", "train")),
    "student-t2-busy": (STUDENT, 2, None, True, ("score", "train")),
    "student-t2-passive-busy": (STUDENT, 2, "PASSIVE", True, ("score", "train")),
    "student-t1-busy": (STUDENT, 1, None, True, ("score", "train")),
    "teacher-t2": (TEACHER, 2, None, False, ("score",)),
}


# --- the child: one configuration ------------------------------------------------------------


def matmul_peak(size: int = 2048, repeats: int = 8, dtype: str = "float32",
                clock: Any = time.perf_counter) -> float:
    """GFLOP/s of a square torch matmul (2 n^3 FLOP each), best of `repeats`; with
    `clock=time.process_time`, GFLOP per CPU-second of this process (all its threads)."""
    import torch

    a = torch.randn(size, size, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, dtype=getattr(torch, dtype))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = clock()
        torch.mm(a, b)
        best = min(best, clock() - started)
    return 2 * size**3 / best / 1e9


def matmul_params(model: Any) -> int:
    """P: weights in a token's matmuls (input embedding excluded, output head included)."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters() if p is not embedding)
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding:
        total += embedding.numel()
    return total


def token_batch(tokenizer: Any, batch: int, length: int) -> Any:
    """`batch` rows of `length` real tokens: GSM8K train questions and solutions, joined."""
    import torch

    from primekd.core.data import load_examples

    text = "\n\n".join(f"{e.question}\n{e.answer}" for e in load_examples("train", limit=64))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * length:(i + 1) * length] for i in range(batch)])


def job_score(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    ids = token_batch(tokenizer, args.batch, args.length)
    with torch.inference_mode():
        model(input_ids=ids[:1, :32])  # warm-up
        started = time.perf_counter()
        model(input_ids=ids)
        seconds = time.perf_counter() - started
    return {"tokens": ids.numel(), "seconds": seconds, "flop_per_token_factor": 2}


def job_decode(model: Any, tokenizer: Any, args: argparse.Namespace, batch: int
               ) -> dict[str, Any]:
    import torch

    ids = token_batch(tokenizer, batch, 64)
    new = args.new_tokens
    with torch.inference_mode():
        model.generate(input_ids=ids[:1], max_new_tokens=2, min_new_tokens=2,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
        started = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - started
    # the prompt's prefill is inside the time but not counted: a slight underestimate
    return {"tokens": batch * new, "seconds": seconds, "flop_per_token_factor": 2}


def job_train(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from primekd.distill.config import DistillConfig

    defaults = DistillConfig()
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                            target_modules=defaults.target_modules,
                                            task_type="CAUSAL_LM"))
    peft.train()
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    ids = token_batch(tokenizer, args.train_batch, args.train_length)

    def step() -> None:
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up (allocations, optimizer state)
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(args.train_steps):
        step()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    lora = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    peft.unload()
    return {"tokens": ids.numel() * args.train_steps, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "flop_per_token_factor": 6, "lora_params": lora}


def child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from primekd.core.models import load_model, load_tokenizer

    model_path, _, _, _, jobs = CONFIGS[name]
    result: dict[str, Any] = {"config": name, "threads": torch.get_num_threads(),
                              "peak_gflops": round(matmul_peak(), 1),
                              # what the threads do per CPU-second: x threads = the peak of
                              # the same cores with nothing else running (spin-waits count)
                              "peak_gflops_per_cpu_s": round(
                                  matmul_peak(clock=time.process_time), 1),
                              # no native bf16 here: a small size, or it takes minutes
                              "bf16_over_fp32_matmul_512": round(
                                  matmul_peak(512, 2, "bfloat16") / matmul_peak(512, 2), 3),
                              "load_before": os.getloadavg()[0], "jobs": {}}
    tokenizer = load_tokenizer(model_path)
    started = time.perf_counter()
    model = load_model(model_path, device="cpu", dtype=torch.float32)
    result["load_s"] = round(time.perf_counter() - started, 1)
    params = matmul_params(model)
    result["matmul_params"] = params
    for job in jobs:
        cpu_started = time.process_time()  # scoring/decoding: a small warm-up included
        if job == "score":
            out = job_score(model, tokenizer, args)
        elif job.startswith("decode-b"):
            out = job_decode(model, tokenizer, args, int(job.removeprefix("decode-b")))
        else:
            out = job_train(model, tokenizer, args)
        out.setdefault("cpu_seconds", time.process_time() - cpu_started)
        rate = out["tokens"] / out["seconds"]
        flops = out["flop_per_token_factor"] * (params + out.get("lora_params", 0)) * rate
        per_cpu_s = flops / 1e9 / out["cpu_seconds"] * out["seconds"]
        out.update(tokens_per_s=round(rate, 2), gflops=round(flops / 1e9, 1),
                   # useful GFLOP per CPU-second over the matmul's: MFU without the neighbours
                   mfu_cpu=round(per_cpu_s / result["peak_gflops_per_cpu_s"], 3),
                   mfu=round(flops / 1e9 / result["peak_gflops"], 3),
                   seconds=round(out["seconds"], 2))
        result["jobs"][job] = out
        print(f"  {name} {job}: {rate:.1f} tok/s, MFU {out['mfu']:.1%}", file=sys.stderr,
              flush=True)
    result["load_after"] = os.getloadavg()[0]
    return result


# --- the parent: every configuration, one after the other -------------------------------------


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    _, threads, wait_policy, busy, _ = CONFIGS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--child", name, *child_args(args)],
                             env=env, capture_output=True, text=True, check=False)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    sys.stderr.write(out.stderr[-2000:] if out.returncode else out.stderr)
    if out.returncode:
        return {"config": name, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_args(args: argparse.Namespace) -> list[str]:
    return ["--batch", str(args.batch), "--length", str(args.length),
            "--new-tokens", str(args.new_tokens), "--train-batch", str(args.train_batch),
            "--train-length", str(args.train_length), "--train-steps", str(args.train_steps)]


def ratios(results: dict[str, dict[str, Any]]) -> list[tuple[str, float]]:
    def rate(config: str, job: str) -> float | None:
        job_result = results.get(config, {}).get("jobs", {}).get(job)
        return job_result["tokens_per_s"] if job_result else None

    wanted = [
        ("batch 8 / batch 1, decoding (student)", ("student-t2", "decode-b8"),
         ("student-t2", "decode-b1")),
        ("scoring / decoding b8 (student): --target reference vs generation",
         ("student-t2", "score"), ("student-t2", "decode-b8")),
        ("scoring / decoding b8 (teacher): --target reference vs generation",
         ("teacher-t2", "score"), ("teacher-t2", "decode-b8")),
        ("training, busy / free (2 threads)", ("student-t2-busy", "train"),
         ("student-t2", "train")),
        ("training, no competitor: OMP_WAIT_POLICY=PASSIVE / default",
         ("student-t2-passive", "train"), ("student-t2", "train")),
        ("scoring, no competitor: OMP_WAIT_POLICY=PASSIVE / default",
         ("student-t2-passive", "score"), ("student-t2", "score")),
        ("training, busy: OMP_WAIT_POLICY=PASSIVE / default", ("student-t2-passive-busy",
                                                              "train"),
         ("student-t2-busy", "train")),
        ("training, busy: 1 thread / 2 threads", ("student-t1-busy", "train"),
         ("student-t2-busy", "train")),
        ("scoring, busy: OMP_WAIT_POLICY=PASSIVE / default", ("student-t2-passive-busy",
                                                             "score"),
         ("student-t2-busy", "score")),
        ("scoring, busy: 1 thread / 2 threads", ("student-t1-busy", "score"),
         ("student-t2-busy", "score")),
    ]
    out = []
    for label, top, bottom in wanted:
        a, b = rate(*top), rate(*bottom)
        if a and b:
            out.append((label, round(a / b, 2)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=sorted(CONFIGS),
                   help="run only these configurations (repeatable)")
    p.add_argument("--batch", type=int, default=1, help="scoring: rows")
    p.add_argument("--length", type=int, default=256, help="scoring: tokens per row")
    p.add_argument("--new-tokens", type=int, default=16, help="decoding: new tokens per row")
    p.add_argument("--train-batch", type=int, default=1)
    p.add_argument("--train-length", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=1, help="timed steps after a warm-up")
    p.add_argument("--json", dest="json_out", help="write every figure to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    results = {}
    for name in args.only or CONFIGS:
        _, threads, wait_policy, busy, _ = CONFIGS[name]
        print(f"{name}: {threads} thread(s), OMP_WAIT_POLICY={wait_policy or 'default'}"
              f"{', one busy competitor' if busy else ''}", file=sys.stderr, flush=True)
        results[name] = run_child(name, args)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    for name, r in results.items():
        if "error" in r:
            print(f"{name}: failed: {r['error']}")
            continue
        print(f"{name}: peak fp32 matmul {r['peak_gflops']} GFLOP/s (bf16 / fp32 at 512: "
              f"{r['bf16_over_fp32_matmul_512']}), P = {r['matmul_params'] / 1e6:.0f}M, load "
              f"{r['load_before']:.1f}-{r['load_after']:.1f}")
        for job, j in r["jobs"].items():
            print(f"  {job:11s} {j['tokens_per_s']:8.1f} tok/s  {j['gflops']:6.1f} GFLOP/s  "
                  f"MFU {j['mfu']:.1%}")
    for label, value in ratios(results):
        print(f"ratio {label}: {value:.2f}x")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"cpu": cpu_name(), "results": results,
                                                   "ratios": dict(ratios(results))}, indent=2))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
