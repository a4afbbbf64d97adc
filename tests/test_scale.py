"""The scale path and the store/training guards: sharded stores, the vocabulary guard, the
head-tap self-check, precision and warm-up arguments, non-finite guards, verified stores,
whole-run resume summaries, portable adapters, and FSDP2 on CPU processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from primekd.core.errors import PrimekdError
from primekd.distill import distill
from primekd.distill.config import DistillConfig
from primekd.teach import store
from primekd.teach.teacher import TeachConfig, teach

HERE = Path(__file__).parent


def _teach(model_dir: Path, out: Path, **overrides) -> dict:
    options = {"limit": 6, "target": "reference", "batch_size": 3, "top_k": 4, **overrides}
    return teach(TeachConfig(teacher=str(model_dir), out=out, **options), progress=False)


def _config(model: Path, stores, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(model), teacher_store=stores, out=str(out), batch_size=2,
                max_steps=2, logging_steps=1, save_steps=1, eval_steps=1, lr=1e-3,
                warmup_ratio=0.0, device="cpu")
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def shards(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two shards of one `teach --shard i/2` run (reference target: fast)."""
    root = tmp_path_factory.mktemp("shards")
    for i in range(2):
        _teach(tiny_model_dir, root / f"shard-{i}", shard=f"{i}/2")
    return root


@pytest.fixture(scope="module")
def whole(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One unsharded store of 6 questions."""
    out = tmp_path_factory.mktemp("whole") / "store"
    _teach(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module")
def single(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One unsharded store of 3 questions, written as one part (a lone shard is refused)."""
    out = tmp_path_factory.mktemp("single") / "store"
    _teach(tiny_model_dir, out, limit=3)
    return out


def _copy_store(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / ".lock").unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------- sharded stores


def test_distill_merges_shards_given_as_list_or_glob(tiny_model_dir, shards, tmp_path):
    listed = distill(_config(tiny_model_dir, [str(shards / "shard-0"), str(shards / "shard-1")],
                             tmp_path / "a"), progress=False)
    assert listed.summary["data"]["store_rows"] == 6
    globbed = distill(_config(tiny_model_dir, str(shards / "shard-*"), tmp_path / "b"),
                      progress=False)
    assert globbed.summary["data"]["teacher_store_parts"] == [
        str(shards / "shard-0"), str(shards / "shard-1")]
    assert globbed.summary["data"]["store_rows"] == 6
    with pytest.raises(PrimekdError, match="matches no directory"):
        distill(_config(tiny_model_dir, str(shards / "nope-*"), tmp_path / "c"), progress=False)


def test_cli_takes_several_teacher_stores(tiny_model_dir, shards, tmp_path):
    out = tmp_path / "cli"
    proc = _primekd("distill", "--student", str(tiny_model_dir), "--teacher-store",
                    str(shards / "shard-0"), "--teacher-store", str(shards / "shard-1"),
                    "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--json",
                    "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["data"]["store_rows"] == 6


# ---------------------------------------------------------------- stores verified


def test_store_with_missing_duplicated_or_corrupt_part_is_refused(tiny_model_dir, single,
                                                                   tmp_path):
    assert len(store.part_files(single)) == 1  # 3 questions in one batch of 3
    missing = _copy_store(single, tmp_path / "missing")
    store.part_files(missing)[0].unlink()
    with pytest.raises(PrimekdError, match="counts 3 rows but the parts .* hold 0"):
        distill(_config(tiny_model_dir, str(missing), tmp_path / "o1"), progress=False)

    doubled = _copy_store(single, tmp_path / "doubled")
    part = store.part_files(doubled)[0]
    shutil.copy(part, doubled / "part-00007.parquet")
    with pytest.raises(PrimekdError, match="counts 3 rows but the parts .* hold 6"):
        distill(_config(tiny_model_dir, str(doubled), tmp_path / "o2"), progress=False)

    corrupt = _copy_store(single, tmp_path / "corrupt")
    part = store.part_files(corrupt)[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(PrimekdError, match=r"part-00000.parquet is not a readable Parquet"):
        distill(_config(tiny_model_dir, str(corrupt), tmp_path / "o3"), progress=False)
    assert not (tmp_path / "o3" / "adapter_model.safetensors").exists()


def test_duplicate_rows_refused_even_when_counts_agree(tiny_model_dir, single, tmp_path):
    doubled = _copy_store(single, tmp_path / "doubled")
    shutil.copy(store.part_files(doubled)[0], doubled / "part-00007.parquet")
    manifest = json.loads((doubled / "manifest.json").read_text())
    manifest["counts"]["kept"] = 6
    (doubled / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PrimekdError, match=r"duplicate \(id, sample\) rows"):
        store.load_store(doubled)


def test_edited_fingerprint_is_caught_by_the_token_ids(tiny_model_dir, single, tmp_path):
    """A store from a 320-token vocabulary whose manifest claims another tokenizer's
    fingerprint: the student's tokenizer does not decode its token_ids to its responses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from primekd.core.data import load_examples
    from primekd.core.models import load_tokenizer, tokenizer_fingerprint

    # the same model with a BPE vocabulary of the same size learnt from other text
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [e.answer[::-1] for e in load_examples("test", limit=200)],
        trainers.BpeTrainer(vocab_size=len(original), special_tokens=[
            "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).unlink(missing_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = original.chat_template
    fast.save_pretrained(other)
    edited = _copy_store(single, tmp_path / "edited")
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["tokenizer_fingerprint"] = tokenizer_fingerprint(load_tokenizer(str(other)))
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PrimekdError, match="does not decode"):
        distill(_config(other, str(edited), tmp_path / "o"), progress=False)


def test_teach_refuses_duplicate_ids_before_writing(tiny_model_dir, tmp_path):
    data = tmp_path / "dup.jsonl"
    rows = [{"id": "q1", "question": "1+1?", "answer": "#### 2"},
            {"id": "q2", "question": "2+2?", "answer": "#### 4"},
            {"id": "q1", "question": "3+3?", "answer": "#### 6"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PrimekdError, match="'q1' appears more than once"):
        _teach(tiny_model_dir, tmp_path / "out", data=str(data))
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path).glob("out/part-*"))


# ---------------------------------------------------------------- vocabulary guard


def test_teacher_ids_beyond_the_student_embedding_are_refused(tiny_model_dir, single,
                                                              tmp_path):
    """Same tokenizer files (same fingerprint), fewer embedding rows: the Qwen2.5 7B vs 0.5B
    case. Refused before training, with both sizes and the fix in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    highest = max(max(max(ids) for ids in row) for row in
                  store.load_store(single)["topk_ids"].to_pylist())
    small = tmp_path / "small"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(highest)  # rows 0 .. highest - 1: the top id is out
    model.save_pretrained(small)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(small)
    with pytest.raises(PrimekdError) as error:
        distill(_config(small, str(single), tmp_path / "o"), progress=False)
    message = str(error.value)
    assert f"token id {highest}" in message and f"{highest} embedding rows" in message
    assert "trim" in message and "\n" not in message
    assert not (tmp_path / "o" / "checkpoints").exists()


# ---------------------------------------------------------------- head tap self-check


def _tiny_granite(directory: Path, logits_scaling: float) -> Path:
    from transformers import GraniteConfig, GraniteForCausalLM

    from primekd.core.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                           logits_scaling=logits_scaling, tie_word_embeddings=False,
                           pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GraniteForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(("scaling", "tapped"), [(4.0, False), (1.0, True)])
def test_head_tap_falls_back_when_logits_are_scaled_after_the_head(tmp_path, scaling, tapped):
    """Granite divides its logits by `logits_scaling` after the head: projecting the
    tapped hidden states would train on unscaled logits."""
    from primekd.distill.trainer import KDSettings, KDTrainer, build_student, training_arguments

    model_dir = _tiny_granite(tmp_path / "granite", scaling)
    config = _config(model_dir, None, tmp_path / "o", objective="sft")
    trainer = KDTrainer(model=build_student(config, "cpu"),
                        args=training_arguments(config, tmp_path / "o", "cpu", False, False),
                        kd=KDSettings())
    assert (trainer._tap is not None) is tapped


# ---------------------------------------------------------------- precision and warm-up


def test_warmup_fraction_goes_to_the_argument_that_means_a_fraction():
    from primekd.distill.trainer import warmup_arguments

    assert warmup_arguments(0.03, {"warmup_ratio", "warmup_steps"}) == {"warmup_ratio": 0.03}
    assert warmup_arguments(0.03, {"warmup_steps"}) == {"warmup_steps": 0.03}
    from primekd.distill.trainer import training_arguments

    args = training_arguments(DistillConfig(out="x", warmup_ratio=0.1, device="cpu"),
                              Path("x"), "cpu", False, False)
    assert args.get_warmup_steps(200) == 20


def test_float16_trains_with_loss_scaling_or_is_refused():
    from primekd.distill.trainer import _torch_dtype, mixed_precision

    lora = DistillConfig(out="x", dtype="float16")
    assert mixed_precision(lora, "cuda") == {"fp16": True, "bf16": False}
    assert _torch_dtype(lora, "cuda") == torch.float16  # frozen base; LoRA weights fp32
    full = DistillConfig(out="x", dtype="float16", full_finetune=True)
    assert _torch_dtype(full, "cuda") == torch.float32  # the scaler needs fp32 master grads
    with pytest.raises(PrimekdError, match="float16 needs CUDA"):
        mixed_precision(lora, "cpu")


# ---------------------------------------------------------------- training guards


@pytest.mark.parametrize("option", [("--temperature", "inf"), ("--lr", "nan"),
                                    ("--alpha", "nan"), ("--warmup-ratio", "inf")])
def test_non_finite_options_refused_before_anything(tiny_model_dir, single, tmp_path, option):
    out = tmp_path / "o"
    proc = _primekd("distill", "--student", str(tiny_model_dir), "--teacher-store",
                    str(single), "--out", str(out), *option)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("error:") and "finite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_non_finite_loss_stops_training_without_an_adapter(tiny_model_dir, single, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(PrimekdError, match=r"step 1: the training loss is (nan|inf)"):
        distill(_config(tiny_model_dir, str(single), out, temperature=1e30,
                        alpha=0.0), progress=False)
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "summary.json").exists()


# ---------------------------------------------------------------- resume, adapter files


class _Kill(Exception):
    pass


def test_resumed_summary_covers_the_whole_run(tiny_model_dir, whole, tmp_path):
    from transformers import TrainerCallback

    class KillAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Kill

    stores = str(whole)
    options = dict(max_steps=4, save_steps=2, batch_size=1)
    whole = distill(_config(tiny_model_dir, stores, tmp_path / "whole", **options),
                    progress=False).summary
    with pytest.raises(_Kill):
        distill(_config(tiny_model_dir, stores, tmp_path / "cut", **options),
                callbacks=[KillAtStep3()], progress=False)
    resumed = distill(_config(tiny_model_dir, stores, tmp_path / "cut", resume=True,
                              **options), progress=False).summary
    assert resumed["steps"] == whole["steps"] == 4
    assert resumed["tokens"] == whole["tokens"]
    assert resumed["mean_train_loss"] == pytest.approx(whole["mean_train_loss"], rel=1e-4)


def test_adapter_files_are_portable(tiny_model_dir, single, tmp_path):
    from primekd.core.models import load_model
    from primekd.distill.trainer import make_portable

    out = tmp_path / "o"
    distill(_config(tiny_model_dir, str(single), out), progress=False)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert modes["adapter_model.safetensors"] == modes["adapter_config.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    load_model(str(tiny_model_dir), adapter=out, device="cpu")  # still loads

    make_portable(out, "smollm2-135m-instruct", "bundled")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_checkpoints_kept_until_the_adapter_is_saved(tmp_path):
    from primekd.distill.trainer import remove_checkpoints

    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(PrimekdError, match="keeping its checkpoints"):
        remove_checkpoints(tmp_path)
    assert (tmp_path / "checkpoints" / "checkpoint-2").exists()


def test_distill_progress_is_rich_not_raw_tqdm(tiny_model_dir, single, tmp_path):
    proc = _primekd("distill", "--student", str(tiny_model_dir), "--teacher-store",
                    str(single), "--out", str(tmp_path / "o"), "--max-steps", "2",
                    "--batch-size", "2", env={"COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "it/s]" not in proc.stderr and "s/it]" not in proc.stderr  # tqdm's rate
    assert "training" in proc.stderr  # the rich bar's label


# ---------------------------------------------------------------- chat date pinned


DATED_TEMPLATE = (
    "{{ 'Today Date: ' + (date_string if date_string is defined else 'unpinned') + '\n' }}"
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chat_date_pinned_and_kept_on_resume(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from primekd.core.chat import ChatPrompt, render

    model = tmp_path / "dated"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = DATED_TEMPLATE
    tokenizer.save_pretrained(model)
    assert render(tokenizer, ChatPrompt(user="hi"), "01 Jan 2025").startswith(
        "Today Date: 01 Jan 2025")

    out = tmp_path / "store"
    manifest = _teach(model, out, limit=2, batch_size=1)
    date = manifest["chat_date"]
    assert date and len(date.split()) == 3
    # a resume on another day: the store's created date changes nothing, its pin rules
    manifest["chat_date"] = "01 Jan 2025"
    (out / "manifest.json").write_text(json.dumps(manifest))
    store.part_files(out)[-1].unlink()  # the last batch is redone under the pinned date
    resumed = _teach(model, out, limit=2, batch_size=1)
    assert resumed["chat_date"] == "01 Jan 2025"
    prompts = store.load_store(out)["teacher_prompt"].to_pylist()
    assert prompts[0].startswith(f"Today Date: {date}")
    assert prompts[-1].startswith("Today Date: 01 Jan 2025")


# ---------------------------------------------------------------- FSDP2 on CPU processes


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_saves_an_adapter_plain_peft_loads(tiny_model_dir, whole,
                                                                     tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2` with 2 gloo processes and a
    validation set: the final adapter (full state dict, adapter_config.json) loads in plain
    PEFT and gives the validation loss the run reported."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from primekd.core.models import load_tokenizer
    from primekd.distill.data import KDCollator, build_datasets
    from primekd.distill.trainer import KDSettings, KDTrainer, training_arguments

    out = tmp_path / "fsdp"
    cmd = [shutil.which("accelerate"), "launch", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29533", "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
           "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
           "LlamaDecoderLayer", "--fsdp_cpu_ram_efficient_loading", "true",
           str(HERE.parent / "bench" / "fsdp_cpu_launch.py"), "distill", "--student",
           str(tiny_model_dir),
           "--teacher-store", str(whole), "--out", str(out), "--max-steps", "3",
           "--batch-size", "1", "--val-size", "2", "--eval-steps", "2", "--lr", "1e-2",
           "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert (out / "adapter_config.json").exists()
    assert not (out / "checkpoints" / "checkpoint-3" / "adapter_config.json").exists()

    config = DistillConfig(**{**json.loads(json.dumps(
        __import__("yaml").safe_load((out / "distill_config.yaml").read_text()))),
        "out": str(tmp_path / "eval")})
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="right")
    data = build_datasets(config, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out)
    trainable, total = summary["trainable_params"], summary["total_params"]
    assert total == sum(p.numel() for p in model.parameters())  # not a shard's count
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    trainer = KDTrainer(model=model, args=training_arguments(config, tmp_path / "eval", "cpu",
                                                             False, True),
                        eval_dataset=data.val, data_collator=KDCollator(tokenizer.pad_token_id),
                        kd=KDSettings(config.alpha, config.divergence, config.temperature,
                                      config.beta, config.chunk_size))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(summary["val_loss_after"],
                                                            rel=1e-5)
    assert summary["val_loss_after"] != pytest.approx(summary["val_loss_before"], rel=1e-6)


def _primekd(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", "from primekd.cli import main; main()",
                           *argv], capture_output=True, text=True, env=full_env, timeout=240)


# ---------------------------------------------------------------- tune trials release memory


def test_a_failed_tune_trial_releases_its_model(tiny_model_dir, whole, tmp_path):
    """A trial that fails must not keep its model and optimizer alive through the error's
    traceback while the study records it; on CUDA the cached blocks are returned too
    (bench/gpu_check.sh measures that)."""
    import weakref

    from transformers import TrainerCallback

    from primekd.experiment import tune

    refs = []

    class FailAfterOneStep(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            refs.append(weakref.ref(model))

        def on_step_end(self, args, state, control, **kwargs):
            raise _Kill("trial failed")

    config = _config(tiny_model_dir, str(whole), tmp_path / "t")
    try:
        tune._distill(config, FailAfterOneStep(), False)
    except _Kill:
        assert refs and refs[0]() is None
    else:
        pytest.fail("the trial should have failed")


def test_tune_refuses_a_store_with_a_missing_part(tiny_model_dir, whole, tmp_path):
    from primekd.experiment.tune import TuneConfig, tune

    broken = _copy_store(whole, tmp_path / "broken")
    store.part_files(broken)[0].unlink()
    config = TuneConfig(str(broken), str(tiny_model_dir), str(tmp_path / "t"), val_size=2,
                        trials=1, max_steps=1)
    with pytest.raises(PrimekdError, match="a part is missing or duplicated"):
        tune(config, progress=False)
    assert not list((tmp_path / "t").glob("trials/*/adapter_model.safetensors"))


def test_lora_targets_checked_before_the_weights_load(tiny_model_dir, whole, tmp_path):
    """A student directory without its weights file: the target-module error comes first,
    so it cannot have needed the weights."""
    skeleton = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, skeleton)
    (skeleton / "model.safetensors").unlink()
    with pytest.raises(PrimekdError, match="LoRA target modules nope not found"):
        distill(_config(skeleton, str(whole), tmp_path / "o", target_modules=["nope"]),
                progress=False)


@pytest.mark.slow
def test_gpu_check_script_passes_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_check.sh cannot run on a GPU here; its CPU mode keeps every step's code
    working (imports, teach -> distill -> eval, the head tap in fp32 and bf16, FSDP on 2
    processes, the loss guards, a real two-trial tune study) and ends with one JSON line.
    `make gpu-check-mirror` runs it in an environment that mirrors the GPU image."""
    root = HERE.parent
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(root / "bench" / "gpu_check.sh"), "--device", "cpu",
                             "--out", str(tmp_path / "check")], cwd=root, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["passed"] and line["device"] == "cpu" and line["scaled_down"]
    assert report["device"] == "cpu" and len(report["steps"]) == 8
    assert all(step["passed"] for step in report["steps"].values())
    assert set(report["steps"]["tap_vs_full_logits"]) >= {"float32", "bfloat16"}
    assert report["steps"]["tune_trial_memory"]["complete"] == 2
