from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from primekd.core.chat import ChatPrompt
from primekd.core.data import load_examples
from primekd.core.errors import PrimekdError
from primekd.core.grading import answer_line_end
from primekd.core.models import load
from primekd.core.testing import tiny_tokenizer
from primekd.engines import (
    EngineSpec,
    Generation,
    SamplingParams,
    collect,
    encode_chats,
    finish,
    parse_options,
)
from primekd.engines.hf import HFEngine, _cut_criteria, stop_token_ids
from primekd.evaluate import answer_stop


def generate(model, tokenizer, prompts: list[ChatPrompt], params: SamplingParams | None = None,
             batch_size: int = 16) -> list[Generation]:
    engine = HFEngine(model, tokenizer, batch_size=batch_size)
    ids = encode_chats(tokenizer, prompts)
    return collect(engine.generate(ids, params or SamplingParams()), len(prompts))


def generate_batch(model, tokenizer, prompts: list[ChatPrompt], params: SamplingParams
                   ) -> list[Generation]:
    return HFEngine(model, tokenizer).generate_batch(encode_chats(tokenizer, prompts), params)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(str(tiny_model_dir))


def _prompts(n: int) -> list[ChatPrompt]:
    # Very different lengths, so batches need real left padding.
    questions = [e.question for e in load_examples("test", limit=n)]
    return [ChatPrompt(q[: 15 + 40 * (i % 4)], system="Be brief." if i % 2 else None)
            for i, q in enumerate(questions)]


def test_batched_greedy_equals_unbatched(tiny) -> None:
    model, tokenizer = tiny
    prompts = _prompts(7)
    params = SamplingParams(max_new_tokens=12)
    batched = generate(model, tokenizer, prompts, params, batch_size=4)
    single = [generate_batch(model, tokenizer, [p], params)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]


def test_stop_tokens_end_answers_and_set_finish_reason(tiny) -> None:
    model, tokenizer = tiny
    prompts = _prompts(6)
    params = SamplingParams(max_new_tokens=10)
    free = generate(model, tokenizer, prompts, params, batch_size=6)
    assert all(g.finish_reason == "length" and g.n_tokens == 10 for g in free)
    # Make a token that the first answer writes early a second end-of-sequence token (as
    # models with several EOS ids do): that answer must stop there, others run on.
    stop = free[0].token_ids[3]
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [eos, stop]
    try:
        assert stop in stop_token_ids(model, tokenizer)
        stopped = generate(model, tokenizer, prompts, params, batch_size=6)
    finally:
        model.generation_config.eos_token_id = eos
    for before, after in zip(free, stopped, strict=True):
        if stop in before.token_ids:
            cut = before.token_ids.index(stop) + 1
            assert after.finish_reason == "stop"
            assert after.token_ids == before.token_ids[:cut]
            assert after.n_tokens == cut
            assert after.text == tokenizer.decode(before.token_ids[: cut - 1],
                                                  skip_special_tokens=True)
        else:
            assert after == before
    assert stopped[0].finish_reason == "stop" and stopped[0].n_tokens <= 4


def test_stop_strings_cut_the_answer(tiny) -> None:
    model, tokenizer = tiny
    prompts = _prompts(4)
    free = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=12), batch_size=4)
    # A plain-text piece that the first answer writes after a few tokens.
    pieces = [tokenizer.decode([t]) for t in free[0].token_ids[2:]]
    stop = next(p for p in pieces if p.strip().isalnum())
    params = SamplingParams(max_new_tokens=12, stop=(stop,))
    cut = generate(model, tokenizer, prompts, params, batch_size=4)
    for before, after in zip(free, cut, strict=True):
        if stop in before.text:
            assert after.finish_reason == "stop"
            assert after.text == before.text[: before.text.index(stop)]
            assert after.token_ids == before.token_ids[: after.n_tokens]
            assert stop in tokenizer.decode(after.token_ids)
            assert stop not in tokenizer.decode(after.token_ids[:-1])
        else:
            assert after == before
    assert cut[0].finish_reason == "stop"


def test_sampling_is_seeded(tiny) -> None:
    model, tokenizer = tiny
    prompts = _prompts(3)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    first = generate(model, tokenizer, prompts, params, batch_size=3)
    again = generate(model, tokenizer, prompts, params, batch_size=3)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]


def test_greedy_ignores_the_generation_config_processors(tiny) -> None:
    """A model's generation_config may switch on processors (Qwen2.5 ships
    repetition_penalty=1.05); greedy must still pick the top-1 token at every step."""
    model, tokenizer = tiny
    prompts = _prompts(4)
    params = SamplingParams(max_new_tokens=16, logprobs=2)
    plain = generate(model, tokenizer, prompts, params, batch_size=4)
    config = model.generation_config
    saved = (config.repetition_penalty, config.no_repeat_ngram_size, config.do_sample)
    config.repetition_penalty, config.no_repeat_ngram_size, config.do_sample = 5.0, 2, True
    try:
        forced = generate(model, tokenizer, prompts, params, batch_size=4)
    finally:
        config.repetition_penalty, config.no_repeat_ngram_size, config.do_sample = saved
    assert [g.token_ids for g in forced] == [g.token_ids for g in plain]
    repeats = 0
    for g in forced:
        clear = g.topk.logprobs[:, 0] - g.topk.logprobs[:, 1] > 1e-3
        assert (g.topk.ids[clear, 0] == np.array(g.token_ids)[clear]).all()
        repeats += len(g.token_ids) - len(set(g.token_ids))
    assert repeats > 0, "a penalty would have changed these answers: they repeat tokens"


def test_generated_logprobs_equal_scoring_the_answers(tiny) -> None:
    model, tokenizer = tiny
    prompts = _prompts(5)
    ids = encode_chats(tokenizer, prompts)
    engine = HFEngine(model, tokenizer, batch_size=2)
    generated = collect(engine.generate(ids, SamplingParams(max_new_tokens=10, logprobs=4)), 5)
    scored = collect(engine.score(ids, [g.token_ids for g in generated], 4), 5)
    for g, s in zip(generated, scored, strict=True):
        assert g.topk.ids.shape == (g.n_tokens, 4)
        np.testing.assert_array_equal(g.topk.ids, s.ids)
        np.testing.assert_allclose(g.topk.logprobs, s.logprobs, atol=1e-5)


def test_cut_hook_ends_answers_where_it_says(tiny) -> None:
    model, tokenizer = tiny
    prompts = _prompts(4)
    free = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=12))
    keep = 7  # characters

    cut = generate(model, tokenizer, prompts,
                   SamplingParams(max_new_tokens=12, cut=lambda text: keep), batch_size=4)
    for before, after in zip(free, cut, strict=True):
        if len(before.text) >= keep:
            assert after.text == before.text[:keep] and after.finish_reason == "stop"
            assert after.token_ids == before.token_ids[: after.n_tokens]
            decoded = tokenizer.decode(after.token_ids, skip_special_tokens=True)
            assert decoded.startswith(after.text)
            assert not tokenizer.decode(after.token_ids[:-1],
                                        skip_special_tokens=True).startswith(after.text)
        else:
            assert after == before


def test_eos_after_cut_ends_the_answer_with_its_log_probs(tiny) -> None:
    model, tokenizer = tiny
    ids = encode_chats(tokenizer, _prompts(3))
    engine = HFEngine(model, tokenizer)
    sampling = SamplingParams(max_new_tokens=12, logprobs=3, cut=lambda text: 5,
                              eos_after_cut=True)
    cut = 0
    for _, g in engine.generate(ids, sampling):
        if g.finish_reason == "stop" and len(g.text) == 5:
            cut += 1
            assert g.token_ids[-1] == tokenizer.eos_token_id
            assert g.topk.ids.shape == (g.n_tokens, 3)
            assert tokenizer.decode(g.token_ids[:-1], skip_special_tokens=True).startswith(g.text)
    assert cut >= 1


# --- --stop-at-answer: grading's answer-line rule through the `cut` hook ----------------------

ANSWER = "She has 3 + 4 = 7 apples.\nThe answer is 7.\nNow let us also check 12 more"
STOP_AT_ANSWER = SamplingParams(max_new_tokens=64, **answer_stop.sampling_options(True))


@pytest.fixture(scope="module")
def bpe():
    return tiny_tokenizer()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _line_done(tokenizer, ids: list[int]) -> int:
    """The fewest tokens whose text holds a complete final-answer line."""
    return next(n for n in range(1, len(ids) + 1)
                if answer_line_end(tokenizer.decode(ids[:n])) is not None)


def test_stop_at_answer_keeps_the_answer_line_and_ends_a_teacher_answer(bpe) -> None:
    ids, stops = _ids(bpe, ANSWER), {bpe.eos_token_id}
    cut = finish(bpe, ids, "length", STOP_AT_ANSWER, stops)
    assert cut.text == "She has 3 + 4 = 7 apples.\nThe answer is 7."
    assert cut.finish_reason == "stop" and cut.token_ids == ids[: cut.n_tokens]
    assert cut.n_tokens <= _line_done(bpe, ids) < len(ids)
    assert bpe.decode(cut.token_ids).startswith(cut.text)
    assert not bpe.decode(cut.token_ids[:-1]).startswith(cut.text)

    teacher = replace(STOP_AT_ANSWER, eos_after_cut=True)
    taught = finish(bpe, ids, "length", teacher, stops)
    assert taught.token_ids == [*cut.token_ids, bpe.eos_token_id] and taught.text == cut.text

    for text in ("7 apples\n", "The answer is 7."):  # no complete answer line: unchanged
        ids = _ids(bpe, text)
        kept = finish(bpe, ids, "length", teacher, stops)
        assert kept.token_ids == ids and kept.finish_reason == "length" and kept.text == text


def test_stop_at_answer_stops_each_row_once_its_answer_line_ends(bpe) -> None:
    prompt, answer = _ids(bpe, "Q: how many?\n"), _ids(bpe, ANSWER)
    n = _line_done(bpe, answer)
    criteria = _cut_criteria(bpe, STOP_AT_ANSWER, len(prompt))
    ramble = _ids(bpe, "She has 3 apples and 4 pears and more and more")
    for step in range(1, min(len(ramble), n) + 1):
        batch = torch.tensor([prompt + answer[:step], prompt + ramble[:step]])
        assert criteria(batch, None).tolist() == [step >= n, False]


def test_stop_at_answer_reaches_eval_and_teach(tiny_model_dir, tmp_path) -> None:
    from primekd.evaluate.evaluator import EvalConfig
    from primekd.teach import store
    from primekd.teach.teacher import TeachConfig, teach

    assert EvalConfig(model="m", out="o", stop_at_answer=True).sampling().cut is answer_line_end
    assert EvalConfig(model="m", out="o").sampling().cut is None
    manifest = teach(TeachConfig(teacher=str(tiny_model_dir), out=tmp_path / "t", limit=3,
                                 max_new_tokens=8, batch_size=2, stop_at_answer=True),
                     progress=False)
    assert manifest["params"]["generation"]["stop_at_answer"] is True
    for row in store.load_store(tmp_path / "t").to_pylist():
        assert len(row["topk_ids"]) == len(row["token_ids"])
        assert row["truncated"] == (row["finish_reason"] == "length")


def test_hf_engine_spreads_a_model_with_a_device_map(tiny, tiny_model_dir) -> None:
    """device_map/max_memory (accelerate's big-model loading, for teachers larger than one
    GPU) load the same model: the same answers and top-k here, where only the CPU exists."""
    from primekd.engines import get_engine

    spec = EngineSpec("hf", options={"device_map": "auto", "max_memory": {"cpu": "2GiB"}})
    spread = get_engine(str(tiny_model_dir), spec, batch_size=4)
    plain = HFEngine(*tiny, batch_size=4)
    ids = encode_chats(plain.tokenizer, _prompts(4))
    sampling = SamplingParams(max_new_tokens=8, logprobs=3)
    ours = collect(spread.generate(ids, sampling), 4)
    theirs = collect(plain.generate(ids, sampling), 4)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a.topk.logprobs, b.topk.logprobs, atol=1e-5)


def test_engine_options_and_specs_are_checked() -> None:
    assert parse_options(["max_model_len=4096", "enforce-eager=true", "dtype=bfloat16"]) == {
        "max_model_len": 4096, "enforce_eager": True, "dtype": "bfloat16"}
    with pytest.raises(PrimekdError, match="key=value"):
        parse_options(["max_model_len"])
    with pytest.raises(PrimekdError, match="--engine must be one of"):
        EngineSpec("tgi").check()
    with pytest.raises(PrimekdError, match="unknown vllm engine option 'max_len'"):
        EngineSpec("vllm", options={"max_len": 5}).check()
    with pytest.raises(PrimekdError, match="dtype is not an hf engine option"):
        EngineSpec("hf", options={"dtype": "bfloat16"}).check()
    with pytest.raises(PrimekdError, match="--base-url needs --engine vllm"):
        EngineSpec("hf", base_url="http://127.0.0.1:1").check()


def test_bad_parameters_are_clear_errors(tiny) -> None:
    model, tokenizer = tiny
    with pytest.raises(PrimekdError, match="max-new-tokens"):
        generate(model, tokenizer, _prompts(1), SamplingParams(max_new_tokens=0))
    with pytest.raises(PrimekdError, match="batch-size"):
        generate(model, tokenizer, _prompts(1), batch_size=0)


@pytest.mark.integration
def test_bundled_batched_equals_unbatched_and_stops(bundled) -> None:
    model, tokenizer = bundled
    prompts = [ChatPrompt("What is the capital of France?"),
               ChatPrompt("Hello!"),
               ChatPrompt("Write a long story about a dragon who learns arithmetic.")]
    params = SamplingParams(max_new_tokens=24)
    batched = generate(model, tokenizer, prompts, params, batch_size=3)
    single = [generate_batch(model, tokenizer, [p], params)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert batched[0].finish_reason == "stop" and "Paris" in batched[0].text
    assert batched[0].token_ids[-1] == tokenizer.eos_token_id
    assert not batched[0].text.endswith("<|im_end|>")
    assert batched[2].finish_reason == "length" and batched[2].n_tokens == 24
    stopped = generate(model, tokenizer, prompts[:1], SamplingParams(24, stop=("Paris",)))[0]
    assert stopped.text == batched[0].text[: batched[0].text.index("Paris")]
    assert stopped.finish_reason == "stop" and stopped.n_tokens < batched[0].n_tokens


def test_server_start_failure_quotes_its_log() -> None:
    from primekd.engines.vllm import VLLMServer

    command = [sys.executable, "-c", "import sys; print('no such model here'); sys.exit(3)"]
    server = VLLMServer("m", {"command": command, "startup_timeout": 60}).start()
    with pytest.raises(PrimekdError, match="exited with code 3.*no such model here"):
        server.wait_ready()
    server.stop()


@pytest.mark.slow
def test_server_dies_with_primekd(tmp_path) -> None:
    """A server primekd started must not outlive it, even when primekd is SIGKILLed."""
    script = (
        "import sys, time\n"
        "from primekd.engines.vllm import VLLMServer\n"
        "s = VLLMServer('m', {'command': [sys.executable, '-c', "
        "'import time; time.sleep(600)']}).start()\n"
        f"open({str(tmp_path / 'scratch')!r}, 'w').write(str(s.scratch))\n"
        f"open({str(tmp_path / 'pid')!r}, 'w').write(str(s.process.pid))\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    pid_file = tmp_path / "pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        assert time.monotonic() < deadline, "the server outlived primekd"
        time.sleep(0.05)
    shutil.rmtree((tmp_path / "scratch").read_text())  # primekd, killed, could not


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
