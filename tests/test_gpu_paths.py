"""The GPU-path defects of issue 25, shown on CPU where a CPU can show them: one GPU per
process without a distributed launch, memory released before a vLLM server starts, the
teacher's server kept out of eval stages, per-role engine options, and the on-policy
refusals (out-of-range teacher rows, a distributed launch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from primekd.core.errors import PrimekdError
from primekd.distill.config import DistillConfig


def _sft_config(model: Path, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(model), out=str(out), objective="sft", data="train", limit=4,
                batch_size=2, max_steps=1, logging_steps=1, lr=1e-3, warmup_ratio=0.0,
                device="cpu")
    base.update(kw)
    return DistillConfig(**base)


# ---------------------------------------------------------------- A: one GPU per process


def test_several_visible_gpus_without_a_launcher_train_on_one(tiny_model_dir, tmp_path):
    """transformers sets n_gpu = device_count() without a distributed launch and wraps the
    model in nn.DataParallel (breaking the head tap, multiplying the batch): simulated here
    by the n_gpu it would set on a 4-GPU machine."""
    from primekd.distill.trainer import KDSettings, KDTrainer, build_student, training_arguments

    config = _sft_config(tiny_model_dir, tmp_path / "o")
    args = training_arguments(config, tmp_path / "o", "cpu", False, False)
    args._n_gpu = 4  # what TrainingArguments sets with 4 visible GPUs and no launcher
    trainer = KDTrainer(model=build_student(config, "cpu"), args=args, kd=KDSettings())
    assert trainer.args.n_gpu == 1
    assert trainer.args.train_batch_size == config.batch_size
    wrapped = trainer._wrap_model(trainer.model, training=True)
    assert not isinstance(wrapped, torch.nn.DataParallel)


def test_device_index_beyond_the_visible_gpus_is_one_line(tmp_path):
    from primekd.distill.trainer import pin_device, training_arguments

    config = DistillConfig(out=str(tmp_path), device="cpu")
    args = training_arguments(config, tmp_path, "cpu", False, False)
    if torch.cuda.device_count() > 5:
        pytest.skip("a machine with more than 5 GPUs")
    with pytest.raises(PrimekdError, match="--device cuda:5: this machine has"):
        pin_device(args, "cuda:5")


# ---------------------------------------------------------------- on-policy refusals (D, G)


def _on_policy(model: Path, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(model), out=str(out), on_policy=True, alpha=0.0, rounds=1,
                round_size=2, batch_size=2, rollout_max_new_tokens=6, top_k=4,
                rollout_temperature=0.0, lr=1e-3, warmup_ratio=0.0, device="cpu", limit=2)
    base.update(kw)
    return DistillConfig(**base)


def _padded_teacher(tiny_model_dir: Path, directory: Path, extra_rows: int) -> Path:
    """A teacher with the student's tokenizer and `extra_rows` more output rows (as
    Qwen2.5-7B has over Qwen2.5-0.5B)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.vocab_size += extra_rows
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_teacher_with_rows_the_student_lacks_refused_before_any_rollout(tiny_model_dir,
                                                                         tmp_path):
    """One tokenizer, more output rows: its top-k may name ids the student has no row for.
    (A teacher of another tokenizer is aligned by text instead: tests/test_onpolicy_xtok.py.)"""
    from primekd.distill import distill

    teacher = _padded_teacher(tiny_model_dir, tmp_path / "teacher", 64)
    out = tmp_path / "run"
    with pytest.raises(PrimekdError, match="vocabulary rows") as caught:
        distill(_on_policy(tiny_model_dir, out, teacher=str(teacher)), progress=False)
    assert "\n" not in str(caught.value)
    assert not list(out.rglob("rollout.jsonl"))


def test_hf_rollouts_decode_with_the_students_tokenizer(tiny_model_dir, tmp_path):
    from primekd.core.models import load_tokenizer
    from primekd.core.testing import tiny_model
    from primekd.distill.onpolicy import _Teacher
    from primekd.distill.trainer import build_student

    teacher = tiny_model(tmp_path / "teacher", seed=1)  # same vocabulary, another model
    config = _on_policy(tiny_model_dir, tmp_path / "run", teacher=str(teacher))
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="right")
    engine_of = _Teacher(config, tokenizer, "cpu", build_student(config, "cpu"))
    assert engine_of.student_engine(engine_of.model, 0).tokenizer is tokenizer
    assert engine_of.tokenizer is not tokenizer  # the teacher's renders its prompts


def test_on_policy_under_a_distributed_launch_is_refused(tiny_model_dir, tmp_path,
                                                          monkeypatch):
    from primekd.distill import distill

    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    with pytest.raises(PrimekdError, match=r"one process.*WORLD_SIZE=2"):
        distill(_on_policy(tiny_model_dir, out), progress=False)
    assert not out.exists()


# ---------------------------------------------------------------- B: memory before a server


class _Model:
    """Stands for a stage's model held in a reference cycle (as a Trainer and its callbacks
    hold one): only a garbage collection frees it."""

    def __init__(self) -> None:
        self.cycle = self


@pytest.fixture
def no_automatic_gc():
    """Only an explicit collection frees cycles here (as on a GPU, where the collector's own
    schedule knows nothing of the device memory a cycle holds)."""
    import gc

    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_run_releases_the_last_stages_model_before_the_next_stage(tmp_path, no_automatic_gc):
    import weakref

    from primekd.experiment.config import load_config
    from primekd.experiment.runner import run_experiment

    config = load_config(preset="quick", overrides=[
        "strategies=[none]", "controls=[]", "attention.enabled=false"])
    held: dict[str, weakref.ref] = {}
    seen: dict[str, bool] = {}

    def fn(stage, progress):
        seen[stage.name] = any(ref() is not None for ref in held.values())
        model = _Model()
        held[stage.name] = weakref.ref(model)
        stage.directory.mkdir(parents=True, exist_ok=True)
        (stage.directory / ("manifest.json" if stage.kind == "teacher" else "summary.json")
         ).write_text(stage.hash)
        return {}

    run_experiment(config, tmp_path, False,
                   stage_functions=dict.fromkeys(("teacher", "distill", "eval", "report"), fn))
    assert seen == {"teacher/none": False, "students/kd-none": False, "eval/kd-none": False,
                    "report": False}


def test_on_policy_vllm_rounds_free_the_trainer_before_a_server_starts(
        tiny_model_dir, tmp_path, monkeypatch, no_automatic_gc):
    """Every engine the rounds open (a vLLM server each) finds no trainer of an earlier
    round alive and the student's weights off the GPU (here: on the CPU). The servers are
    stood in for by the hf engine: the point is what is still held when they start."""
    import gc

    import primekd.engines as engines
    from primekd.distill import distill
    from primekd.distill.trainer import KDTrainer
    from primekd.engines.hf import HFEngine

    opened: list[tuple[str, int]] = []

    def get_engine(model, spec=None, *, adapter=None, **kw):
        trainers = sum(isinstance(o, KDTrainer) for o in gc.get_objects())
        opened.append(("student" if adapter else "teacher", trainers))
        return HFEngine.load(model, adapter=adapter, device="cpu")

    monkeypatch.setattr(engines, "get_engine", get_engine)
    config = _on_policy(tiny_model_dir, tmp_path / "run", rounds=2, engine="vllm",
                        engine_options={"lora": True})
    distill(config, progress=False)
    assert opened == [("student", 0), ("teacher", 0)] * 2
    # the teacher's prompts keep the date the run started on, recorded with every round
    date = json.loads((tmp_path / "run" / "rounds.json").read_text())["chat_date"]
    for r in range(2):
        manifest = tmp_path / "run" / "rounds" / f"round-{r:03d}" / "manifest.json"
        assert json.loads(manifest.read_text())["chat_date"] == date


# ---------------------------------------------------------------- C, F: engine roles


def test_teachers_server_and_options_never_reach_eval_stages(tmp_path):
    """The paper preset's shape: a teacher on 8 GPUs (or a running server of it), a student
    whose 14 heads do not split 8 ways."""
    from primekd.experiment.config import load_config
    from primekd.experiment.stages import plan, stage_config

    def stages(*overrides: str):
        config = load_config(overrides=[
            "engine.name=vllm", "engine.options={max_model_len: 1024}",
            "engine.teacher={tensor_parallel_size: 8}", "engine.student={lora: true}",
            "on_policy=[{strategy: none}]", *overrides])
        return {s.name: s for s in plan(config, tmp_path)}

    plain, served = stages(), stages("engine.base_url=http://127.0.0.1:8000")
    teacher = stage_config(served["teacher/none"])
    assert teacher.base_url == "http://127.0.0.1:8000"
    assert teacher.engine_options == {"max_model_len": 1024, "tensor_parallel_size": 8}
    for name in ("eval/base", "eval/kd-none", "eval/op-none"):
        evaluation = stage_config(served[name])
        assert evaluation.base_url is None
        assert evaluation.engine_options == {"max_model_len": 1024, "lora": True}
    assert served["eval/base"].hash == plain["eval/base"].hash
    assert served["teacher/none"].hash != plain["teacher/none"].hash  # and its students'
    on_policy = stage_config(served["students/op-none"])
    assert on_policy.engine_options == {"max_model_len": 1024, "lora": True}
    assert on_policy.teacher_engine_options == {"max_model_len": 1024,
                                                "tensor_parallel_size": 8}


def test_engine_options_without_roles_keep_their_stage_hashes(tmp_path):
    """A run config without role options plans the stages it planned before: its cached
    stages stay cached (on-policy students get no teacher_engine_options)."""
    from primekd.experiment.config import load_config
    from primekd.experiment.stages import plan

    config = load_config(overrides=["on_policy=[{strategy: none}]"])
    on_policy = next(s for s in plan(config, tmp_path) if s.name == "students/op-none")
    assert "teacher_engine_options" not in on_policy.params


def test_max_memory_without_a_device_map_is_refused():
    from primekd.engines import EngineSpec

    with pytest.raises(PrimekdError, match="max_memory needs device_map"):
        EngineSpec("hf", None, {"max_memory": {"0": "10GiB"}}).check()
    EngineSpec("hf", None, {"device_map": "auto", "max_memory": {"0": "10GiB"}}).check()


@pytest.fixture
def models_server():
    """A running OpenAI-compatible endpoint that serves only `/v1/models`: a teacher's."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "Llama-3.1-405B-Instruct",
                                         "root": "/models/Llama-3.1-405B-Instruct"}]})
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_server_of_another_model_is_refused(models_server, tiny_model_dir):
    from primekd.engines.vllm import VLLMEngine, served_model

    with pytest.raises(PrimekdError, match="serves Llama-3.1-405B-Instruct, not .*point "
                                           "--base-url at a server of"):
        VLLMEngine.open(str(tiny_model_dir), base_url=models_server)
    assert served_model(models_server, model=("meta-llama/Llama-3.1-405B-Instruct",
                                              "/hub/x")) == "Llama-3.1-405B-Instruct"
    assert served_model(models_server, "Llama-3.1-405B-Instruct") == "Llama-3.1-405B-Instruct"


def test_on_policy_hf_teacher_takes_its_device_map(tiny_model_dir, tmp_path):
    from primekd.core.models import load_tokenizer
    from primekd.core.testing import tiny_model
    from primekd.distill.onpolicy import _Teacher

    teacher = tiny_model(tmp_path / "teacher", seed=1)
    # a 1 KiB budget: accelerate's device map offloads every weight (to the meta device)
    config = _on_policy(tiny_model_dir, tmp_path / "run", teacher=str(teacher),
                        teacher_engine_options={"device_map": "auto",
                                                "max_memory": {"cpu": "1KiB"}})
    roles = _Teacher(config, load_tokenizer(str(tiny_model_dir)), "cpu")
    model = roles.teacher_engine().model
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert roles.spec.options == {}  # the student's rollouts keep theirs


# ---------------------------------------------------------------- validation across processes


@pytest.mark.slow
def test_validation_loss_of_two_processes_counts_each_question_once(tiny_model_dir, tmp_path):
    """3 validation questions over 2 processes x batch 2: accelerate pads the last batch
    with a repeated sample, which must not count. The run's final validation loss equals the
    saved adapter's, evaluated in one process."""
    import json
    import os
    import shutil
    import subprocess

    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from primekd.core.models import load_tokenizer
    from primekd.distill.data import KDCollator, build_datasets
    from primekd.distill.trainer import KDSettings, KDTrainer, training_arguments

    out = tmp_path / "ddp"
    launcher = Path(__file__).parent.parent / "bench" / "fsdp_cpu_launch.py"  # plain DDP here
    cmd = [shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29541", str(launcher), "distill", "--student",
           str(tiny_model_dir), "--objective", "sft", "--data", "train", "--limit", "9",
           "--val-size", "3", "--out", str(out),
           "--max-steps", "2", "--batch-size", "2", "--eval-steps", "2", "--lr", "1e-2",
           "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2

    config = DistillConfig(**{**yaml.safe_load((out / "distill_config.yaml").read_text()),
                              "out": str(tmp_path / "one")})
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="right")
    data = build_datasets(config, tokenizer)
    assert len(data.val) == 3
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    trainer = KDTrainer(model=model, args=training_arguments(config, tmp_path / "one", "cpu",
                                                             False, True),
                        eval_dataset=data.val, data_collator=KDCollator(tokenizer.pad_token_id),
                        kd=KDSettings.of(config))
    # a random tiny model's per-question losses are close (a repeated one moves the mean by
    # ~1e-5): the same sums give the same value to the last bits
    assert trainer.evaluate()["eval_loss"] == pytest.approx(summary["val_loss_after"],
                                                            rel=1e-9)


# ---------------------------------------------------------------- vLLM environment, merging


def test_merged_adapter_keeps_the_base_models_dtype_and_is_pruned(tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from primekd.core.models import resolve
    from primekd.engines.vllm import drop_merged, merged_model

    monkeypatch.setenv("PRIMEKD_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(
        base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "adapter")
    merged = Path(merged_model(resolve(str(base)), str(tmp_path / "adapter")))
    with safe_open(str(next(merged.glob("*.safetensors"))), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    drop_merged(str(base), str(tmp_path / "adapter"))  # its eval stage is done
    assert not merged.exists()


def test_a_gpu_vllm_in_primekds_environment_comes_before_the_cpu_build(tmp_path,
                                                                        monkeypatch):
    """`.venv-vllm` is `make vllm`'s CPU build: on a CUDA machine whose own environment has
    vllm (pip install vllm), that one serves. A stand-in `vllm` package makes it importable."""
    import sys

    import primekd.engines.vllm_server as vllm

    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    (tmp_path / "work" / ".venv-vllm" / "bin").mkdir(parents=True)
    (tmp_path / "work" / ".venv-vllm" / "bin" / "python").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("PRIMEKD_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(vllm, "_cuda", lambda: True)
    assert vllm.vllm_python() == sys.executable
    monkeypatch.setattr(vllm, "_cuda", lambda: False)
    assert vllm.vllm_python() == str(tmp_path / "work" / ".venv-vllm" / "bin" / "python")


# ---------------------------------------------------------------- pinned chat dates

DATED_TEMPLATE = (
    "{{ '<|im_start|>system\\nToday Date: ' + (date_string if date_string is defined "
    "else strftime_now('%d %b %Y')) + '<|im_end|>\\n' }}"
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _dated_model(tiny_model_dir: Path, directory: Path) -> Path:
    """The tiny model with a chat template that writes today's date, as Llama 3.x's do."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(tiny_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = DATED_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def test_student_prompts_in_distill_and_eval_pin_one_date(tiny_model_dir, tmp_path):
    """Trained on one day, evaluated on another: the student sees one prompt. Eval's greedy
    answer is the one to the pinned prompt distill trains under."""
    from primekd.core.chat import STUDENT_CHAT_DATE
    from primekd.core.io import read_jsonl
    from primekd.core.models import load
    from primekd.distill.data import student_prompts
    from primekd.engines import SamplingParams, collect
    from primekd.engines.hf import HFEngine
    from primekd.evaluate.evaluator import EvalConfig, evaluate

    model_dir = _dated_model(tiny_model_dir, tmp_path / "dated")
    model, tokenizer = load(str(model_dir), device="cpu")
    prompts = student_prompts(tokenizer, ["How many?"], None)
    assert f"Today Date: {STUDENT_CHAT_DATE}" in tokenizer.decode(prompts[0])
    evaluate(EvalConfig(model=str(model_dir), out=tmp_path / "e", limit=2, max_new_tokens=12,
                        device="cpu"), progress=False)
    rows = read_jsonl(tmp_path / "e" / "results.jsonl")
    pinned = student_prompts(tokenizer, [r["question"] for r in rows], None)
    answers = collect(HFEngine(model, tokenizer).generate(pinned, SamplingParams(12)), 2)
    assert [r["response"] for r in rows] == [a.text for a in answers]


def test_shards_with_different_dates_in_their_prompts_are_refused(tiny_model_dir, tmp_path):
    import json

    from primekd.teach import store
    from primekd.teach.teacher import TeachConfig, teach

    for name, model in (("dated", _dated_model(tiny_model_dir, tmp_path / "dated")),
                        ("plain", tiny_model_dir)):
        shards = [tmp_path / name / f"shard-{i}" for i in range(2)]
        for i, directory in enumerate(shards):
            teach(TeachConfig(teacher=str(model), out=directory, limit=4, target="reference",
                              batch_size=2, top_k=2, shard=f"{i}/2"), progress=False)
        manifest = json.loads((shards[1] / "manifest.json").read_text())
        manifest["chat_date"] = "01 Jan 2025"  # shard 1 started on another day
        (shards[1] / "manifest.json").write_text(json.dumps(manifest))
        if name == "dated":
            with pytest.raises(PrimekdError, match="teacher prompts carry different dates"):
                store.load_store(shards)
        else:  # the date is in no prompt: the shards agree
            assert store.load_store(shards).num_rows == 4
