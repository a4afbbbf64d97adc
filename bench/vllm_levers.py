"""vLLM on CPU for the real pair: thread binding, prefix caching, and the stages' own rates.

Runs primekd's own stage functions (`evaluate`, `teach`) on the vllm engine, one server at a
time, so the rates are the stages' rates, prompt handling included:

1. the student (0.5B) answering GSM8K train questions with the eval prompt, once per server
   variant: vLLM's default (its CPU build reserves one of the cores for the front end, so the
   model runs on the other: VLLM_CPU_NUM_OF_RESERVED_CPU unset, VLLM_CPU_OMP_THREADS_BIND
   auto), no core reserved (VLLM_CPU_NUM_OF_RESERVED_CPU=0: the worker's OpenMP threads on
   both cores), the same with OpenMP threads that spin (OMP_WAIT_POLICY=ACTIVE; primekd
   otherwise runs its servers with PASSIVE, as this bench does), and prefix caching on;
2. the teacher (1.5B) under `ground_truth` priming (generation with top-20 log-probs), then
   `--target reference` (one teacher-forced pass over each reference) on the same server.

Each answer is generated up to --max-new-tokens (512) with `stop_at_answer`, so the share cut
at smaller budgets is read off the answers' lengths; accuracy comes with it. A fp32 matmul
peak (torch, 2048 x 2048, 2 threads) is measured in this process before each server starts,
and MFU = 2 * P * tokens/s over it (P: the weights in a token's matmuls, see
bench/stage_levers.py). On a shared machine the load average is printed with each figure.

    python bench/vllm_levers.py --n 24 --teacher-n 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from stage_levers import STUDENT, TEACHER, cpu_name, matmul_peak  # noqa: E402

from primekd.core.io import iter_jsonl  # noqa: E402

VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "default (1 core reserved)": ({}, {}),
    "VLLM_CPU_NUM_OF_RESERVED_CPU=0": ({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, {}),
    "RESERVED_CPU=0, OMP_WAIT_POLICY=ACTIVE": (
        {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OMP_WAIT_POLICY": "ACTIVE"}, {}),
    "prefix caching": ({}, {"extra_args": "--enable-prefix-caching"}),
}
BUDGETS = (256, 320, 384, 448, 512)


def truncation(rows: list[dict[str, Any]], length_key: str) -> dict[int, float]:
    """Share of answers not finished within B tokens, for each budget B."""
    out = {}
    for budget in BUDGETS:
        cut = sum(r.get("finish_reason") == "length" or r[length_key] > budget for r in rows)
        out[budget] = round(cut / len(rows), 3)
    return out


def server_cpu_s() -> float:
    """CPU seconds used so far by the running server's process group (front end, engine
    core, worker): divided into the tokens, a rate that the neighbours do not change."""
    from primekd.engines import vllm_server as vllm

    server = vllm._RUNNING["server"]
    if server is None or server.process is None:
        return 0.0
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == server.process.pid:  # session id: the group primekd started
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def with_env(env: dict[str, str]) -> dict[str, str | None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def student_run(label: str, env: dict[str, str], options: dict[str, Any],
                args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from primekd.engines import vllm_server as vllm
    from primekd.evaluate.evaluator import EvalConfig, evaluate

    peak, peak_cpu = matmul_peak(), matmul_peak(clock=time.process_time)  # per core-second
    old = with_env(env)
    try:
        started = time.perf_counter()
        vllm.running_server(vllm_model(STUDENT), server_options(options), None)
        start_s = time.perf_counter() - started
        out = work / f"eval-{len(os.listdir(work))}"
        cpu_before = server_cpu_s()
        summary = evaluate(EvalConfig(
            model=STUDENT, out=str(out), data="train", sample=args.n, seed=1,
            max_new_tokens=args.max_new_tokens, stop_at_answer=True, engine="vllm",
            engine_options={"dtype": "float32", **options}, batch_size=args.n), progress=False)
        cpu_s = server_cpu_s() - cpu_before
    finally:
        vllm.shutdown()
        restore(old)
    rows = list(iter_jsonl(out / "results.jsonl"))
    rate = summary["tokens_per_s"]
    per_cpu_s = summary["generated_tokens"] / cpu_s if cpu_s else None
    return {"variant": label, "server_start_s": round(start_s, 1), "tokens_per_s": rate,
            "peak_gflops": round(peak, 1),
            "mfu": round(2 * matmul_params(STUDENT) * rate / 1e9 / peak, 3),
            "tokens_per_server_cpu_s": per_cpu_s and round(per_cpu_s, 2),
            "mfu_cpu": per_cpu_s and round(2 * matmul_params(STUDENT) * per_cpu_s / 1e9
                                           / peak_cpu, 3),
            "accuracy": summary["accuracy"], "n": summary["n"],
            "mean_tokens": round(sum(r["n_tokens"] for r in rows) / len(rows), 1),
            "truncated_at": truncation(rows, "n_tokens"), "load": os.getloadavg()[0]}


def teacher_runs(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from primekd.engines import vllm_server as vllm
    from primekd.teach.store import load_store
    from primekd.teach.teacher import TeachConfig, teach

    peak, peak_cpu = matmul_peak(), matmul_peak(clock=time.process_time)  # per core-second
    out = []
    try:
        started = time.perf_counter()
        vllm.running_server(vllm_model(TEACHER), server_options({}), None)
        start_s = time.perf_counter() - started
        for target in ("generated", "reference"):
            store = work / f"teacher-{target}"
            cpu_before = server_cpu_s()
            manifest = teach(TeachConfig(
                teacher=TEACHER, out=str(store), strategy="ground_truth", data="train",
                sample=args.teacher_n, seed=1, target=target, top_k=20,
                max_new_tokens=args.max_new_tokens, stop_at_answer=True, engine="vllm",
                engine_options={"dtype": "float32"}, batch_size=args.teacher_n),
                progress=False)
            cpu_s = server_cpu_s() - cpu_before
            rows = load_store(store, columns=["token_ids", "finish_reason"]).to_pylist()
            for row in rows:
                row["n"] = len(row["token_ids"])
            rate = manifest["tokens_per_s"]
            tokens = sum(r["n"] for r in rows)
            per_cpu_s = tokens / cpu_s if cpu_s else None
            out.append({"variant": f"teacher ground_truth, target {target}",
                        "server_start_s": round(start_s, 1), "tokens_per_s": rate,
                        "peak_gflops": round(peak, 1),
                        "mfu": round(2 * matmul_params(TEACHER) * rate / 1e9 / peak, 3),
                        "tokens_per_server_cpu_s": per_cpu_s and round(per_cpu_s, 2),
                        "mfu_cpu": per_cpu_s and round(
                            2 * matmul_params(TEACHER) * per_cpu_s / 1e9 / peak_cpu, 3),
                        "accuracy": manifest.get("teacher_accuracy"), "n": len(rows),
                        "mean_tokens": round(sum(r["n"] for r in rows) / len(rows), 1),
                        "truncated_at": truncation(rows, "n") if target == "generated" else {},
                        "load": os.getloadavg()[0]})
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
            start_s = 0.0
    finally:
        vllm.shutdown()
    return out


def matmul_params(reference: str) -> int:
    """P from the model's config.json: what bench/stage_levers.py counts on the loaded model
    (attention and MLP weights with biases left out, plus the output head)."""
    c = json.loads((Path(vllm_model(reference)) / "config.json").read_text())
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // \
        c["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"]
    return c["num_hidden_layers"] * layer + c["vocab_size"] * h


def vllm_model(reference: str) -> str:
    from primekd.core.models import resolve

    return resolve(reference).path


def server_options(options: dict[str, Any]) -> dict[str, Any]:
    """What VLLMEngine.open passes to the server, so that the stage reuses this one."""
    return {"dtype": "float32", **options}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24, help="student: train questions")
    p.add_argument("--teacher-n", type=int, default=16, help="teacher: train questions")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--only", choices=("student", "teacher"))
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                   help="student server variants to run (default: all)")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args()
    # as the `primekd` CLI sets it for itself and the servers it starts (a variant may override)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vllm-levers-") as tmp:
        work = Path(tmp)
        if args.only != "teacher":
            for label in args.variant or VARIANTS:
                env, options = VARIANTS[label]
                results.append(student_run(label, env, options, args, work))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        if args.only != "student":
            results += teacher_runs(args, work)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; vLLM CPU, fp32, stop at answer, "
          f"up to {args.max_new_tokens} new tokens")
    for r in results:
        cut = ", ".join(f"{b}: {v:.0%}" for b, v in r["truncated_at"].items())
        print(f"{r['variant']:34s} {r['tokens_per_s']:7.1f} tok/s  MFU {r['mfu']:.1%} of "
              f"{r['peak_gflops']} GFLOP/s  start {r['server_start_s']:.0f} s  accuracy "
              f"{r['accuracy']} of {r['n']}  mean {r['mean_tokens']} tokens  load "
              f"{r['load']:.1f}" + (f"\n{'':34s} cut at {cut}" if cut else ""))
    base = next((r for r in results if r["variant"].startswith("default")), None)
    for r in results:
        if base and r is not base and not r["variant"].startswith("teacher"):
            ratio = r["tokens_per_s"] / base["tokens_per_s"]
            print(f"ratio {r['variant']} / default: {ratio:.2f}x")
    if len(results) >= 2 and results[-1]["variant"].endswith("reference"):
        print(f"ratio teacher --target reference / generation (tokens/s): "
              f"{results[-1]['tokens_per_s'] / results[-2]['tokens_per_s']:.2f}x")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"cpu": cpu_name(), "results": results},
                                                  indent=2))


if __name__ == "__main__":
    main()
