"""The GPU paths of primekd, checked end to end on tiny random Llama models (no weights, no
internet, no vLLM). Run through bench/gpu_check.sh; docs/distill.md ("The GPU check") says
what ran where and the figures it recorded.

Steps (each recorded as passed/failed with its figures and seconds; the script goes on after
a failure; the results file is rewritten after every step, so a run stopped at its time
limit still leaves what it did):

1. imports: every primekd module imports (on the GPU image: with the carried wheels).
2. teach -> distill -> eval: the teacher (bf16 on CUDA; fp32 on CPU, where teach has no bf16)
   answers 8 GSM8K questions into a store; a bf16 LoRA student trains on it with gradient
   checkpointing and a validation set; eval generates with the adapter and grades.
3. tap vs full logits: the KD loss and its gradients through the head tap against those
   through the model's own logits on one batch, in float32 and in bfloat16.
4. FSDP: `accelerate launch --use_fsdp --fsdp_version 2` with a validation set; the adapter
   loads in plain PEFT. Two processes: on CPU gloo ones; on one GPU tried first, and where
   that is refused the reason is recorded and one process runs.
5. KD loss memory: peak memory of the chunked loss against a naive full-logits one at
   vocabulary 128,256, hidden 4,096 and 4,096 answer tokens (CUDA max_memory_allocated);
   scaled down on CPU (peak RSS growth), and the JSON says so.
6. out-of-range teacher ids: a store whose ids exceed the student's embedding is refused.
7. fp16: `--dtype float16` trains with loss scaling (CUDA) or is refused (CPU).
8. tune: a real two-trial `primekd tune` study (Optuna, SQLite storage); afterwards no model
   of a trial is alive and (CUDA) its memory is allocated and reserved no more.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import pkgutil
import platform
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

import primekd  # noqa: E402
from primekd.core.errors import PrimekdError  # noqa: E402
from primekd.core.testing import tiny_model, tiny_tokenizer  # noqa: E402

# what the GPU image lacks and bench/gpu/wheels.txt carries (the imports step shows their
# versions and where they were loaded from)
CARRIED = {"pydantic": "pydantic", "pydantic_core": "pydantic-core",
           "typing_extensions": "typing-extensions", "optuna": "optuna",
           "sqlalchemy": "sqlalchemy"}
MiB = 2**20


def child_env() -> dict[str, str]:
    """The environment of the check's subprocesses: primekd from src/ ahead of the rest of
    PYTHONPATH (on the GPU box, the carried wheels' --target folder)."""
    rest = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{rest}" if rest else str(SRC)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.machine()


class Check:
    def __init__(self, ctx: argparse.Namespace):
        self.ctx = ctx
        self.results: dict[str, dict[str, Any]] = {}
        self.started = time.perf_counter()

    def step(self, name: str, function: Callable[[], dict[str, Any]]) -> None:
        started = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            figures = function() or {}
            passed = bool(figures.pop("passed", True))
            self.results[name] = {"passed": passed, **figures}
        except Exception as error:  # noqa: BLE001 - recorded, and the next step runs
            self.results[name] = {"passed": False, "error": f"{type(error).__name__}: {error}",
                                  "traceback": traceback.format_exc()[-2000:]}
        self.results[name]["seconds"] = round(time.perf_counter() - started, 2)
        status = "PASS" if self.results[name]["passed"] else "FAIL"
        shown = {k: v for k, v in self.results[name].items() if k != "traceback"}
        print(f"[gpu_check] {status} {name} ({shown['seconds']} s): "
              f"{json.dumps(shown, default=str)}", flush=True)
        self.write()

    def report(self, stopped: str | None = None) -> dict[str, Any]:
        ctx = self.ctx
        report: dict[str, Any] = {
            "passed": bool(self.results) and stopped is None
            and all(r["passed"] for r in self.results.values()),
            "device": ctx.device,
            "gpu": torch.cuda.get_device_name(0) if ctx.device == "cuda" else None,
            "cpu": cpu_name(),
            "python": platform.python_version(), "torch": torch.__version__}
        for package in ("transformers", "accelerate", "peft"):
            report[package] = importlib.import_module(package).__version__
        report.update({"tokenizer_vocab": ctx.vocab, "scaled_down": ctx.scaled_down,
                       "total_seconds": round(time.perf_counter() - self.started, 1)})
        if stopped:
            report["stopped"] = stopped
        report["steps"] = self.results
        return report

    def write(self, stopped: str | None = None) -> dict[str, Any]:
        report = self.report(stopped)
        self.ctx.json_path.write_text(json.dumps(report, indent=2, default=str))
        return report


# ---------------------------------------------------------------- steps


def imports(ctx: argparse.Namespace) -> dict[str, Any]:
    failed = {}
    names = [m.name for m in pkgutil.walk_packages(primekd.__path__, "primekd.")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - each module's failure is recorded
            failed[name] = f"{type(error).__name__}: {error}"
    carried = {}
    for name, distribution in CARRIED.items():
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            carried[distribution] = f"missing: {error}"
            continue
        where = Path(module.__file__).parent
        where = where.parent if where.name == name else where  # a package, or one module
        carried[distribution] = f"{metadata.version(distribution)} from {where}"
    return {"passed": not failed, "modules": len(names), "failed": failed, "carried": carried}


def teacher_store(ctx: argparse.Namespace) -> Path:
    """The store the other steps read: written once, by the pipeline step or the first step
    that needs it (so `--only` runs any step alone)."""
    from primekd.teach.teacher import TeachConfig, teach

    store = ctx.work / "store"
    if not (store / "manifest.json").exists():
        teach(TeachConfig(teacher=str(ctx.teacher), out=store, limit=ctx.questions,
                          max_new_tokens=ctx.new_tokens, top_k=8, batch_size=4,
                          device=ctx.device), progress=False)
    return store


def pipeline(ctx: argparse.Namespace) -> dict[str, Any]:
    from primekd.core.models import default_dtype
    from primekd.distill import distill
    from primekd.distill.config import DistillConfig
    from primekd.evaluate.evaluator import EvalConfig, evaluate

    started = time.perf_counter()
    store = teacher_store(ctx)
    teach_s = time.perf_counter() - started
    result = distill(DistillConfig(
        student=str(ctx.student), teacher_store=str(store), out=str(ctx.work / "student"),
        max_steps=4, batch_size=2, val_size=2, eval_steps=2, logging_steps=1, save_steps=2,
        lr=1e-3, gradient_checkpointing=True, dtype="bfloat16", device=ctx.device),
        progress=False)
    distill_s = time.perf_counter() - started - teach_s
    summary = evaluate(EvalConfig(model=str(ctx.student), adapter=str(ctx.work / "student"),
                                  data="test", limit=4, max_new_tokens=ctx.new_tokens,
                                  out=ctx.work / "eval", device=ctx.device), progress=False)
    s = result.summary
    return {"passed": s["steps"] == 4 and s["val_loss_after"] is not None
            and summary["n"] == 4,
            "teacher_rows": json.loads((store / "manifest.json").read_text())["counts"]["kept"],
            "teacher_dtype": str(default_dtype(ctx.device)), "student_dtype": "torch.bfloat16",
            "train_steps": s["steps"], "val_loss_before": s["val_loss_before"],
            "val_loss_after": s["val_loss_after"], "tokens_per_s": s["tokens_per_s"],
            "eval_n": summary["n"], "eval_accuracy": summary["accuracy"],
            "teach_s": round(teach_s, 2), "distill_s": round(distill_s, 2),
            "eval_s": round(time.perf_counter() - started - teach_s - distill_s, 2)}


def _tap_against_full(ctx: argparse.Namespace, dtype: str) -> dict[str, Any]:
    from primekd.core.models import load_tokenizer
    from primekd.distill.config import DistillConfig
    from primekd.distill.data import KDCollator, build_datasets
    from primekd.distill.trainer import KDSettings, KDTrainer, build_student, training_arguments

    config = DistillConfig(student=str(ctx.student), teacher_store=str(teacher_store(ctx)),
                           out=str(ctx.work / f"tap-{dtype}"), device=ctx.device,
                           lora_dropout=0.0, dtype=dtype)
    tokenizer = load_tokenizer(str(ctx.student), padding_side="right")
    data = build_datasets(config, tokenizer)
    trainer = KDTrainer(model=build_student(config, ctx.device),
                        args=training_arguments(config, ctx.work / f"tap-{dtype}", ctx.device,
                                                False, False),
                        kd=KDSettings(alpha=0.3, divergence="jsd", temperature=2.0))
    if trainer._tap is None:
        return {"passed": False, "error": "the tap's self-check refused a plain Llama"}
    batch = trainer._prepare_inputs(KDCollator(tokenizer.pad_token_id)(data.train[:2]))
    model = trainer.model

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.detach().float(), [p.grad.float().clone() for p in model.parameters()
                                       if p.requires_grad]

    tapped, tapped_grads = loss_and_grads()
    tap, trainer._tap = trainer._tap, None
    full, full_grads = loss_and_grads()
    trainer._tap = tap
    tap.handle.remove()
    loss_diff = float((tapped - full).abs()) / max(1.0, float(full.abs()))
    # gradients: the largest difference relative to the largest gradient, and the cosine of
    # the two whole gradient vectors
    a, b = torch.cat([g.flatten() for g in tapped_grads]), torch.cat(
        [g.flatten() for g in full_grads])
    grad_diff = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    # fp32: the same numbers up to summation order; bf16: the head's matmul over a different
    # number of rows rounds differently, so agreement to bf16's precision (8 bits, ~0.4%)
    loss_tol, grad_tol = (1e-5, 1e-4) if dtype == "float32" else (2e-2, 5e-2)
    return {"passed": loss_diff < loss_tol and grad_diff < grad_tol and cosine > 0.999,
            "loss_tap": float(tapped), "loss_full": float(full), "loss_rel_diff": loss_diff,
            "grad_max_rel_diff": grad_diff, "grad_cosine": cosine,
            "tolerance": {"loss": loss_tol, "grad": grad_tol, "cosine": 0.999}}


def tap_vs_full(ctx: argparse.Namespace) -> dict[str, Any]:
    rows = {dtype: _tap_against_full(ctx, dtype) for dtype in ("float32", "bfloat16")}
    return {"passed": all(r.pop("passed") for r in rows.values()), **rows}


def _launch_fsdp(ctx: argparse.Namespace, processes: int, timeout: int) -> dict[str, Any]:
    out = ctx.work / f"fsdp-{processes}"
    cuda = ctx.device == "cuda"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
           str(processes), "--num_machines", "1", "--mixed_precision", "bf16" if cuda else "no",
           "--dynamo_backend", "no", "--main_process_port", str(29561 + processes),
           "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
           "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
           "--fsdp_cpu_ram_efficient_loading", "true",
           str(HERE / "fsdp_cpu_launch.py"), "distill", "--student", str(ctx.student),
           "--teacher-store", str(teacher_store(ctx)), "--out", str(out), "--max-steps", "3",
           "--batch-size", "1", "--val-size", "2", "--eval-steps", "2", "--lr", "1e-2",
           "--device", ctx.device, "--quiet"]
    env = child_env()
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "1"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"passed": False, "error": f"no result in {timeout} s"}
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"passed": False, "error": proc.stderr[-1500:],
                "last_line": lines[-1] if lines else f"exit {proc.returncode}"}
    return _fsdp_result(ctx, out, processes)


def _fsdp_result(ctx: argparse.Namespace, out: Path, processes: int) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = json.loads((out / "summary.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ctx.student), out)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"passed": (out / "adapter_config.json").exists() and lora ==
            summary["trainable_params"] and summary["val_loss_before"] is not None,
            "processes": processes, "steps": summary["steps"],
            "val_loss_before": summary["val_loss_before"],
            "val_loss_after": summary["val_loss_after"],
            "trainable_params": summary["trainable_params"],
            "total_params": summary["total_params"]}


def fsdp(ctx: argparse.Namespace) -> dict[str, Any]:
    two = _launch_fsdp(ctx, 2, timeout=120 if ctx.device == "cuda" else 400)
    if two["passed"] or ctx.device != "cuda":
        return two
    one = _launch_fsdp(ctx, 1, timeout=150)
    return {**one, "two_processes_on_one_gpu": "refused: " + two.get("last_line",
                                                                      two["error"])[-300:]}


def kd_memory(ctx: argparse.Namespace) -> dict[str, Any]:
    if ctx.device == "cuda":
        seq, vocab, hidden, chunk = 4096, 128256, 4096, 1024
        method = "cuda max_memory_allocated"
    else:  # big enough for the peak RSS to move past the allocator's slack
        seq, vocab, hidden, chunk = 2048, 32000, 256, 256
        method = ("peak RSS growth (ru_maxrss), scaled down from vocabulary 128,256 / hidden "
                  "4,096 / 4,096 tokens: their naive loss needs ~10 GB, more than this "
                  "machine's share")
    cmd = [sys.executable, str(HERE / "kd_loss.py"), "--device", ctx.device, "--hidden",
           str(hidden), "--chunk", str(chunk), "--repeats", "1", "--one"]
    rows = {}
    for loss in ("naive", "chunked"):
        proc = subprocess.run([*cmd, loss, str(seq), str(vocab)], capture_output=True,
                              text=True, env=child_env(), timeout=300)
        if proc.returncode != 0:
            return {"passed": False, "error": f"{loss}: {proc.stderr[-1500:]}"}
        rows[loss] = json.loads(proc.stdout.strip().splitlines()[-1])
    naive, chunked = rows["naive"]["peak_extra_mb"], rows["chunked"]["peak_extra_mb"]
    return {"passed": chunked < naive, "seq": seq, "vocab": vocab, "hidden": hidden,
            "chunk": chunk, "memory": method, "naive_peak_mb": round(naive, 1),
            # below 1 MB the chunked loss's growth is lost in the allocator's slack (CPU RSS)
            "chunked_peak_mb": round(chunked, 1), "ratio": round(naive / max(chunked, 1.0), 1),
            "ratio_is_a_lower_bound": chunked < 1.0,
            "one_fp32_logits_tensor_mb": round(seq * vocab * 4 / MiB, 1),
            "naive_s": round(rows["naive"]["time_s"], 3),
            "chunked_s": round(rows["chunked"]["time_s"], 3)}


def out_of_range_ids(ctx: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from primekd.distill import distill
    from primekd.distill.config import DistillConfig
    from primekd.teach import store

    table = store.load_store(teacher_store(ctx), columns=["topk_ids"])
    highest = max(max(max(row) for row in ids) for ids in table["topk_ids"].to_pylist())
    small = ctx.work / "small-student"
    model = AutoModelForCausalLM.from_pretrained(ctx.student)
    model.resize_token_embeddings(highest)
    model.save_pretrained(small)
    AutoTokenizer.from_pretrained(ctx.student).save_pretrained(small)
    try:
        distill(DistillConfig(student=str(small), teacher_store=str(teacher_store(ctx)),
                              out=str(ctx.work / "refused"), max_steps=1,
                              device=ctx.device), progress=False)
    except PrimekdError as error:
        return {"passed": f"token id {highest}" in str(error), "message": str(error)}
    return {"passed": False, "error": "trained on ids past the embedding"}


def fp16(ctx: argparse.Namespace) -> dict[str, Any]:
    from primekd.distill import distill
    from primekd.distill.config import DistillConfig

    config = DistillConfig(student=str(ctx.student), teacher_store=str(teacher_store(ctx)),
                           out=str(ctx.work / "fp16"), max_steps=3, batch_size=2, lr=1e-3,
                           dtype="float16", device=ctx.device, logging_steps=1)
    if ctx.device != "cuda":
        try:
            distill(config, progress=False)
        except PrimekdError as error:
            return {"passed": "float16 needs CUDA" in str(error), "message": str(error)}
        return {"passed": False, "error": "float16 trained on CPU"}
    result = distill(config, progress=False)
    loss = result.summary["final_train_loss"]
    return {"passed": loss is not None and loss == loss,
            "final_train_loss": loss, "mean_train_loss": result.summary["mean_train_loss"]}


def _live_models() -> int:
    from transformers import PreTrainedModel

    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated lazy module attributes
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, PreTrainedModel))


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def _cuda_settled() -> tuple[int, int]:
    """Allocated and reserved CUDA bytes with the allocator's cache returned and cuBLAS's
    per-handle workspaces (which the caching allocator counts as allocated) cleared, so
    that what is left is what something still holds."""
    torch.cuda.synchronize()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


def tune_memory(ctx: argparse.Namespace) -> dict[str, Any]:
    """Two real trials of `primekd tune` in this process (tune picks the device itself: CUDA
    where there is one), then what is left of them: no model object, and on CUDA less than
    a quarter of the student's weights (a kept trial would leave all of them and more)."""
    from primekd.core.memory import release_memory
    from primekd.experiment.tune import TuneConfig, tune

    store = teacher_store(ctx)
    release_memory()
    models_before, rss_before = _live_models(), _rss_mb()
    cuda = torch.cuda.is_available()
    if cuda:
        allocated_before, reserved_before = _cuda_settled()
        torch.cuda.reset_peak_memory_stats()
    result = tune(TuneConfig(teacher_store=str(store), student=str(ctx.student),
                             out=str(ctx.work / "tune"), val_size=2, trials=2, max_steps=2,
                             eval_steps=1, pruner="none"), progress=False)
    models_after = _live_models()
    weights = (ctx.student / "model.safetensors").stat().st_size
    figures: dict[str, Any] = {
        "trials": result.n_trials, "complete": result.complete, "failed": result.failed,
        "live_models_before": models_before, "live_models_after": models_after,
        "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(_rss_mb(), 1),
        "student_weights_file_mb": round(weights / MiB, 1)}
    passed = result.complete == 2 and models_after <= models_before
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        allocated, reserved = _cuda_settled()
        allocated, reserved = allocated - allocated_before, reserved - reserved_before
        figures.update({"cuda_peak_mb": round(peak / MiB, 1),
                        "allocated_left_mb": round(allocated / MiB, 2),
                        "reserved_left_mb": round(reserved / MiB, 2)})
        # the weights file holds fp32; on CUDA a trial's student is bf16, half of it
        passed = passed and allocated < weights / 8 and reserved < weights / 8 + 2 * MiB
    return {"passed": passed, **figures}


STEPS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "imports": imports, "teach_distill_eval": pipeline, "tap_vs_full_logits": tap_vs_full,
    "accelerate_fsdp": fsdp, "kd_loss_memory": kd_memory,
    "out_of_range_teacher_ids": out_of_range_ids, "fp16_loss_scaling": fp16,
    "tune_trial_memory": tune_memory}


# ---------------------------------------------------------------- main


def tokenizer_for(ctx: argparse.Namespace) -> Any:
    """--tokenizer DIR, else a byte-level BPE trained here on GSM8K's training split: on CUDA
    on the whole split (a ~25,600-token vocabulary, so the logits are not toy-sized), on CPU
    on 200 questions (320 tokens, as the unit tests use)."""
    if ctx.tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(ctx.tokenizer)
    if ctx.device == "cuda":
        return tiny_tokenizer(vocab_size=32768, examples=None)
    return tiny_tokenizer()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cuda", "cpu"])
    parser.add_argument("--out", default="gpu_check_out", help="work directory (emptied)")
    parser.add_argument("--json", dest="json_out", help="results file (default: OUT/"
                        "gpu_check.json)")
    parser.add_argument("--tokenizer", help="tokenizer directory for the tiny models")
    parser.add_argument("--only", nargs="*", choices=list(STEPS), help="run only these steps")
    ctx = parser.parse_args()
    if ctx.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    ctx.work = Path(ctx.out).resolve()
    shutil.rmtree(ctx.work, ignore_errors=True)
    ctx.work.mkdir(parents=True)
    ctx.json_path = Path(ctx.json_out or ctx.work / "gpu_check.json")
    big = ctx.device == "cuda"
    ctx.scaled_down = None if big else (
        "CPU: models with hidden 64/32 (CUDA: 256/128), 12 new tokens (24), a 320-token "
        "vocabulary (~25,600), the KD loss memory at vocabulary 32,000 (128,256)")
    ctx.questions, ctx.new_tokens = 8, 24 if big else 12
    ctx.vocab = None
    check = Check(ctx)
    stopped = None
    try:
        tokenizer = tokenizer_for(ctx)
        ctx.vocab = len(tokenizer)
        hidden = 256 if big else 64
        ctx.teacher = tiny_model(ctx.work / "teacher", seed=1, layers=4 if big else 2,
                                 tokenizer=tokenizer, hidden=hidden, positions=2048)
        ctx.student = tiny_model(ctx.work / "student-base", seed=2, layers=2,
                                 tokenizer=tokenizer, hidden=hidden // 2, positions=2048)
        print(f"[gpu_check] tiny models built ({time.perf_counter() - check.started:.1f} s, "
              f"vocabulary {ctx.vocab})", flush=True)
        for name, function in STEPS.items():
            if not ctx.only or name in ctx.only:
                check.step(name, lambda f=function: f(ctx))
    except KeyboardInterrupt:  # bench/gpu_check.sh's time limit (SIGINT)
        stopped = "time limit reached; the steps not listed did not run"
    report = check.write(stopped)
    print(f"[gpu_check] {'ALL PASSED' if report['passed'] else 'FAILED'} in "
          f"{report['total_seconds']} s; results in {ctx.json_path}", flush=True)
    line = {**report, "steps": {name: {k: v for k, v in r.items() if k != "traceback"}
                                for name, r in report["steps"].items()}}
    print(json.dumps(line, default=str), flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
