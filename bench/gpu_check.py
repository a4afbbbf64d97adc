"""The GPU paths of primekd, checked end to end on tiny random Llama models (no weights, no
internet, no vLLM). Run through bench/gpu_check.sh; see docs/distill.md ("What was tested
where") for what each step shows and the figures it recorded.

Steps (each recorded as passed/failed with its figures; the script goes on after a failure):

1. teach -> distill -> eval: a bf16 teacher (float32 on CPU) answers 8 GSM8K questions into a
   store; a LoRA student trains on it with gradient checkpointing and a validation set; eval
   generates with the adapter and grades.
2. tap vs full logits: the KD loss and its gradients through the head tap equal those through
   the model's own logits on one batch.
3. FSDP: `accelerate launch --use_fsdp --fsdp_version 2` (one process per device; 2 gloo
   processes on CPU) with a validation set; the adapter loads in plain PEFT.
4. KD loss memory: peak memory of the chunked loss against a naive dense one at vocabulary
   128,256, hidden 4,096 and 4,096 answer tokens (CUDA; small sizes on CPU).
5. out-of-range teacher ids: a store whose ids exceed the student's embedding is refused.
6. fp16: `--dtype float16` trains with loss scaling (CUDA) or is refused (CPU).
7. tune memory: a finished trial gives its CUDA memory back (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(HERE))

from primekd.core.errors import PrimekdError  # noqa: E402
from primekd.core.testing import tiny_model  # noqa: E402


def tokenizer_source(explicit: str | None) -> Any:
    """The tokenizer the tiny models use: --tokenizer DIR, else the bundled SmolLM2 one when
    its converted cache exists, else primekd's tiny test BPE (both need no network)."""
    from transformers import AutoTokenizer

    if explicit:
        return AutoTokenizer.from_pretrained(explicit)
    from primekd.core.models import cache_dir

    for candidate in sorted((cache_dir() / "models").glob("SmolLM2-135M-Instruct*")):
        if (candidate / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(candidate)
    from primekd.core.testing import tiny_tokenizer

    return tiny_tokenizer()


class Check:
    def __init__(self, out: Path, device: str):
        self.out, self.device = out, device
        self.results: dict[str, dict[str, Any]] = {}

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
        print(f"[gpu_check] {status} {name}: {json.dumps(shown, default=str)}", flush=True)


# ---------------------------------------------------------------- steps


def pipeline(ctx: argparse.Namespace) -> dict[str, Any]:
    from primekd.distill import distill
    from primekd.distill.config import DistillConfig
    from primekd.evaluate.evaluator import EvalConfig, evaluate
    from primekd.teach.teacher import TeachConfig, teach

    manifest = teach(TeachConfig(teacher=str(ctx.teacher), out=ctx.work / "store",
                                 limit=ctx.questions, max_new_tokens=ctx.new_tokens,
                                 top_k=8, batch_size=4, device=ctx.device), progress=False)
    result = distill(DistillConfig(
        student=str(ctx.student), teacher_store=str(ctx.work / "store"),
        out=str(ctx.work / "student"), max_steps=4, batch_size=2, val_size=2, eval_steps=2,
        logging_steps=1, save_steps=2, lr=1e-3, gradient_checkpointing=True,
        device=ctx.device), progress=False)
    summary = evaluate(EvalConfig(model=str(ctx.student), adapter=str(ctx.work / "student"),
                                  data="test", limit=4, max_new_tokens=ctx.new_tokens,
                                  out=ctx.work / "eval", device=ctx.device), progress=False)
    s = result.summary
    return {"passed": s["steps"] == 4 and s["val_loss_after"] is not None
            and summary["n"] == 4,
            "teacher_rows": manifest["counts"]["kept"], "teacher_dtype": str(_dtype(ctx)),
            "train_steps": s["steps"], "val_loss_before": s["val_loss_before"],
            "val_loss_after": s["val_loss_after"], "tokens_per_s": s["tokens_per_s"],
            "eval_n": summary["n"], "eval_accuracy": summary["accuracy"]}


def _dtype(ctx: argparse.Namespace) -> torch.dtype:
    from primekd.core.models import default_dtype

    return default_dtype(ctx.device)


def tap_vs_full(ctx: argparse.Namespace) -> dict[str, Any]:
    from primekd.core.models import load_tokenizer
    from primekd.distill.config import DistillConfig
    from primekd.distill.data import KDCollator, build_datasets
    from primekd.distill.trainer import KDSettings, KDTrainer, build_student, training_arguments

    config = DistillConfig(student=str(ctx.student), teacher_store=str(ctx.work / "store"),
                           out=str(ctx.work / "tap"), device=ctx.device, lora_dropout=0.0,
                           dtype="float32")
    tokenizer = load_tokenizer(str(ctx.student), padding_side="right")
    data = build_datasets(config, tokenizer)
    trainer = KDTrainer(model=build_student(config, ctx.device),
                        args=training_arguments(config, ctx.work / "tap", ctx.device, False,
                                                False),
                        kd=KDSettings(alpha=0.3, divergence="jsd", temperature=2.0))
    if trainer._tap is None:
        return {"passed": False, "error": "the tap's self-check refused a plain Llama"}
    batch = trainer._prepare_inputs(KDCollator(tokenizer.pad_token_id)(data.train[:2]))
    model = trainer.model

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    tapped, tapped_grads = loss_and_grads()
    tap, trainer._tap = trainer._tap, None
    full, full_grads = loss_and_grads()
    trainer._tap = tap
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(tapped_grads, full_grads,
                                                                  strict=True))
    loss_diff = float((tapped - full).abs())
    return {"passed": loss_diff < 1e-4 * max(1.0, float(full.abs())) and grad_diff < 1e-4,
            "loss_tap": float(tapped), "loss_full": float(full), "loss_abs_diff": loss_diff,
            "grad_max_abs_diff": grad_diff}


def fsdp(ctx: argparse.Namespace) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = ctx.work / "fsdp"
    processes = "1" if ctx.device == "cuda" else "2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", processes,
           "--num_machines", "1", "--mixed_precision", "bf16" if ctx.device == "cuda" else "no",
           "--dynamo_backend", "no", "--main_process_port", "29561", "--use_fsdp",
           "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
           "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
           "--fsdp_cpu_ram_efficient_loading", "true",
           str(HERE / "fsdp_cpu_launch.py"), "distill", "--student", str(ctx.student),
           "--teacher-store", str(ctx.work / "store"), "--out", str(out), "--max-steps", "3",
           "--batch-size", "1", "--val-size", "2", "--eval-steps", "2", "--lr", "1e-2",
           "--device", ctx.device, "--quiet"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if ctx.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    if proc.returncode != 0:
        return {"passed": False, "error": proc.stderr[-1500:]}
    summary = json.loads((out / "summary.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ctx.student), out)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"passed": (out / "adapter_config.json").exists() and lora ==
            summary["trainable_params"] and summary["val_loss_before"] is not None,
            "processes": int(processes), "steps": summary["steps"],
            "val_loss_before": summary["val_loss_before"],
            "val_loss_after": summary["val_loss_after"],
            "trainable_params": summary["trainable_params"],
            "total_params": summary["total_params"]}


def kd_memory(ctx: argparse.Namespace) -> dict[str, Any]:
    if ctx.device == "cuda":
        seq, vocab, hidden, chunk = 4096, 128256, 4096, 1024
    else:  # big enough for the peak RSS to move past the allocator's slack
        seq, vocab, hidden, chunk = 2048, 32000, 256, 256
    cmd = [sys.executable, str(HERE / "kd_loss.py"), "--device", ctx.device, "--hidden",
           str(hidden), "--chunk", str(chunk), "--repeats", "1", "--one"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows = {}
    for method in ("naive", "chunked"):
        proc = subprocess.run([*cmd, method, str(seq), str(vocab)], capture_output=True,
                              text=True, env=env, timeout=300)
        if proc.returncode != 0:
            return {"passed": False, "error": f"{method}: {proc.stderr[-1500:]}"}
        rows[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    naive, chunked = rows["naive"]["peak_extra_mb"], rows["chunked"]["peak_extra_mb"]
    logits_mb = seq * vocab * 4 / 2**20
    return {"passed": chunked < naive, "seq": seq, "vocab": vocab, "hidden": hidden,
            "chunk": chunk, "memory": "cuda max_memory_allocated" if ctx.device == "cuda"
            else "peak RSS growth", "naive_peak_mb": round(naive, 1),
            "chunked_peak_mb": round(chunked, 1), "ratio": round(naive / max(chunked, 1e-6), 2),
            "one_fp32_logits_tensor_mb": round(logits_mb, 1),
            "naive_s": rows["naive"]["time_s"], "chunked_s": rows["chunked"]["time_s"]}


def out_of_range_ids(ctx: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from primekd.distill import distill
    from primekd.distill.config import DistillConfig
    from primekd.teach import store

    table = store.load_store(ctx.work / "store", columns=["topk_ids"])
    highest = max(max(max(row) for row in ids) for ids in table["topk_ids"].to_pylist())
    small = ctx.work / "small-student"
    model = AutoModelForCausalLM.from_pretrained(ctx.student)
    model.resize_token_embeddings(highest)
    model.save_pretrained(small)
    AutoTokenizer.from_pretrained(ctx.student).save_pretrained(small)
    try:
        distill(DistillConfig(student=str(small), teacher_store=str(ctx.work / "store"),
                              out=str(ctx.work / "refused"), max_steps=1,
                              device=ctx.device), progress=False)
    except PrimekdError as error:
        return {"passed": f"token id {highest}" in str(error), "message": str(error)}
    return {"passed": False, "error": "trained on ids past the embedding"}


def fp16(ctx: argparse.Namespace) -> dict[str, Any]:
    from primekd.distill import distill
    from primekd.distill.config import DistillConfig

    config = DistillConfig(student=str(ctx.student), teacher_store=str(ctx.work / "store"),
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


def tune_memory(ctx: argparse.Namespace) -> dict[str, Any]:
    if ctx.device != "cuda":
        return {"passed": True, "skipped": "CUDA only (the CPU test suite checks that a "
                "failed trial's model is freed)"}
    from primekd.distill.config import DistillConfig
    from primekd.experiment import tune

    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    peaks = []
    for trial in range(2):
        torch.cuda.reset_peak_memory_stats()
        config = DistillConfig(student=str(ctx.student), teacher_store=str(ctx.work / "store"),
                               out=str(ctx.work / f"trial-{trial}"), max_steps=2,
                               batch_size=2, device="cuda")
        from transformers import TrainerCallback

        tune._distill(config, TrainerCallback(), False)
        peaks.append(torch.cuda.max_memory_allocated() / 2**20)
    after = torch.cuda.memory_reserved()
    return {"passed": after - before < 64 * 2**20, "reserved_before_mb": before / 2**20,
            "reserved_after_two_trials_mb": after / 2**20,
            "trial_peaks_mb": [round(p, 1) for p in peaks]}


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cuda", "cpu"])
    parser.add_argument("--out", default="gpu_check_out", help="work directory")
    parser.add_argument("--json", dest="json_out", help="results file (default: OUT/"
                        "gpu_check.json)")
    parser.add_argument("--tokenizer", help="tokenizer directory for the tiny models")
    parser.add_argument("--only", nargs="*", help="run only these steps")
    ctx = parser.parse_args()
    ctx.work = Path(ctx.out).resolve()
    shutil.rmtree(ctx.work, ignore_errors=True)
    ctx.work.mkdir(parents=True)
    big = ctx.device == "cuda"
    ctx.questions, ctx.new_tokens = 8, 24 if big else 12
    tokenizer = tokenizer_source(ctx.tokenizer)
    hidden = 256 if big else 64
    ctx.teacher = tiny_model(ctx.work / "teacher", seed=1, layers=4 if big else 2,
                             tokenizer=tokenizer, hidden=hidden, positions=2048)
    ctx.student = tiny_model(ctx.work / "student-base", seed=2, layers=2,
                             tokenizer=tokenizer, hidden=hidden // 2, positions=2048)
    check = Check(ctx.work, ctx.device)
    steps = {"teach_distill_eval": pipeline, "tap_vs_full_logits": tap_vs_full,
             "accelerate_fsdp": fsdp, "kd_loss_memory": kd_memory,
             "out_of_range_teacher_ids": out_of_range_ids, "fp16_loss_scaling": fp16,
             "tune_trial_memory": tune_memory}
    for name, function in steps.items():
        if not ctx.only or name in ctx.only:
            check.step(name, lambda f=function: f(ctx))
    report = {"device": ctx.device,
              "gpu": torch.cuda.get_device_name(0) if ctx.device == "cuda" else None,
              "torch": torch.__version__, "python": platform.python_version(),
              "tokenizer_vocab": len(tokenizer),
              "passed": all(r["passed"] for r in check.results.values()),
              "steps": check.results}
    for package in ("transformers", "peft", "accelerate"):
        report[package] = __import__(package).__version__
    path = Path(ctx.json_out or ctx.work / "gpu_check.json")
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"[gpu_check] {'ALL PASSED' if report['passed'] else 'FAILED'}; results in {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
