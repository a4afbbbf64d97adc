"""Cross-tokenizer KD: character spans, alignment, vocabulary mapping, the ULD and mapped
losses, and `distill` from a store of another tokenizer (tiny local tokenizers with different
merges; the bundled SmolLM2 student with a Qwen teacher for the integration test)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from primekd.core.errors import PrimekdError
from primekd.core.testing import tiny_model, tiny_tokenizer
from primekd.distill.align import Group, align, build_vocabulary_map, map_topk, vocabulary_map
from primekd.distill.kd_loss import DIVERGENCES, kd_loss_parts
from primekd.distill.xtok_loss import mapped_per_token, uld_per_token, xtok_loss_parts
from primekd.teach.spans import char_ends, encode_with_ends, ends_from_offsets

TEXT = "Café costs €5 — she buys 12345 apples 😀.\nThe answer is 72."


@pytest.fixture(scope="module")
def small_tok():
    return tiny_tokenizer(300)


@pytest.fixture(scope="module")
def big_tok():
    return tiny_tokenizer(520)


# ---------------------------------------------------------------- spans


def test_char_ends_handle_split_characters_and_special_tokens(small_tok):
    ids = small_tok(TEXT, add_special_tokens=False)["input_ids"] + [small_tok.eos_token_id]
    text, ends = char_ends(small_tok, ids)
    assert text == TEXT and len(ends) == len(ids) and ends[-1] == len(TEXT)
    assert ends == sorted(ends)
    widths = [e - (ends[i - 1] if i else 0) for i, e in enumerate(ends)]
    assert widths[-1] == 0  # EOS covers no text
    # '€' is three bytes, none merged in a 300-token vocabulary: two empty pieces, then '€'
    euro = TEXT.index("€")
    pieces = [i for i, e in enumerate(ends) if e == euro and widths[i] == 0]
    assert len(pieces) >= 2 and ends[pieces[-1] + 1] == euro + 1
    for i in range(len(ids) - 1):  # every prefix of tokens is the text up to its end
        prefix = small_tok.decode(ids[: i + 1], clean_up_tokenization_spaces=False)
        assert prefix.rstrip("\ufffd") == TEXT[: ends[i]]


def test_offsets_and_prefix_decoding_agree(small_tok, big_tok):
    for tok in (small_tok, big_tok):
        ids, ends = encode_with_ends(tok, TEXT)
        assert ids == tok(TEXT, add_special_tokens=False)["input_ids"]
        assert ends == char_ends(tok, ids)[1]
    # three pieces of one character: the first two end where it starts
    assert ends_from_offsets([(0, 2), (2, 3), (2, 3), (2, 3), (3, 5)]) == [2, 2, 2, 3, 5]


# ---------------------------------------------------------------- alignment


def test_align_merges_the_smallest_common_runs():
    # "12345 apples": teacher 12|34|5| apples, student 1|23|45| |apples
    groups = align([2, 4, 5, 12], [1, 3, 5, 6, 12], 12)
    assert groups == [Group(0, 3, 0, 3, 5), Group(3, 4, 3, 5, 7)]
    same = align([3, 5, 9], [3, 5, 9], 9)
    assert all(g.one_to_one for g in same) and [g.chars for g in same] == [3, 2, 4]


def test_align_split_characters_and_trailing_eos():
    # teacher: two empty byte pieces then the character, 2 chars, EOS; student: 1 char, 2, EOS
    groups = align([0, 0, 1, 3, 3], [1, 3, 3], 3)
    assert groups == [Group(0, 3, 0, 1, 1), Group(3, 4, 1, 2, 2), Group(4, 5, 2, 3, 0)]
    assert groups[-1].one_to_one  # EOS against EOS


def test_align_two_real_tokenizations_partition_the_text(small_tok, big_tok):
    t_ids, t_ends = encode_with_ends(small_tok, TEXT)
    s_ids, s_ends = encode_with_ends(big_tok, TEXT)
    assert t_ids != s_ids  # the merges differ
    groups = align(t_ends, s_ends, len(TEXT))
    assert [g.t_start for g in groups] == [0, *[g.t_stop for g in groups[:-1]]]
    assert [g.s_start for g in groups] == [0, *[g.s_stop for g in groups[:-1]]]
    assert groups[-1].t_stop == len(t_ids) and groups[-1].s_stop == len(s_ids)
    assert sum(g.chars for g in groups) == len(TEXT)
    for g in groups:  # both sides of a group spell the same characters
        t_text = TEXT[(t_ends[g.t_start - 1] if g.t_start else 0):t_ends[g.t_stop - 1]]
        s_text = TEXT[(s_ends[g.s_start - 1] if g.s_start else 0):s_ends[g.s_stop - 1]]
        assert t_text == s_text and len(t_text) == g.chars
    assert any(g.one_to_one for g in groups) and not all(g.one_to_one for g in groups)


# ---------------------------------------------------------------- vocabulary map


def test_vocabulary_map_pairs_identical_strings_and_is_cached(small_tok, big_tok, tmp_path):
    mapping = vocabulary_map(small_tok, big_tok, cache=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    assert np.array_equal(vocabulary_map(small_tok, big_tok, cache=tmp_path), mapping)
    mapped = np.flatnonzero(mapping >= 0)
    assert len(mapped) > 150  # all but the lone non-ASCII bytes (half a character)
    for t in mapped[:300]:
        assert small_tok.decode([int(t)]) == big_tok.decode([int(mapping[t])])
    assert mapping[small_tok.eos_token_id] == big_tok.eos_token_id
    identity = build_vocabulary_map(small_tok, small_tok)
    ok = identity >= 0
    assert np.array_equal(identity[ok], np.flatnonzero(ok))


def test_map_topk_keeps_one_teacher_id_per_student_id():
    mapping = np.array([5, 5, -1, 7], dtype=np.int32)
    assert map_topk(np.array([[0, 1, 2, 3], [3, 2, 1, 0]]), mapping).tolist() == \
        [[5, -1, -1, 7], [7, -1, 5, -1]]


# ---------------------------------------------------------------- losses


def _teacher(n: int, vocab: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values, ids = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
                   ).log_softmax(-1).topk(k, -1)
    return ids, values


def _uld_direct(logits: torch.Tensor, topk_lp: torch.Tensor) -> list[float]:
    out = []
    for row, lp in zip(logits.tolist(), topk_lp.tolist(), strict=True):
        z = max(row)
        total = sum(math.exp(x - z) for x in row)
        student = sorted((math.exp(x - z) / total for x in row), reverse=True)[: len(lp)]
        teacher = sorted((math.exp(x) for x in lp), reverse=True)
        distance = sum(abs(t - s) for t, s in zip(teacher, student, strict=True))
        out.append(distance + abs((1 - sum(teacher)) - (1 - sum(student))))
    return out


def test_uld_matches_a_direct_implementation():
    logits = torch.randn(5, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, topk_lp = _teacher(5, 60, 6, seed=2)  # a teacher with a larger vocabulary
    got = uld_per_token(logits, topk_lp)
    assert got.tolist() == pytest.approx(_uld_direct(logits, topk_lp), abs=1e-12)
    teacher_probs = topk_lp.exp()
    assert torch.allclose(uld_per_token(logits, topk_lp), uld_per_token(logits + 3.0, topk_lp))
    # the student that copies the teacher's sorted probabilities (and rest) has distance 0
    rest = (1 - teacher_probs.sum(-1, keepdim=True)) / 34
    copy = torch.cat([teacher_probs, rest.expand(5, 34)], -1).log()
    assert uld_per_token(copy, topk_lp).abs().max() < 1e-9


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_mapped_loss_is_todays_loss_with_identical_tokenizers(kind):
    n, vocab, k = 7, 50, 6
    hidden = torch.randn(n, 16, generator=torch.Generator().manual_seed(3))
    head = torch.nn.Linear(16, vocab, bias=False)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(4))
    ids, lp = _teacher(n, vocab, k, seed=5)
    lp = lp.float()
    mask = torch.tensor([True, False, True, True, True, False, True])
    common = dict(head=head, topk_ids=ids, topk_logprobs=lp, kd_mask=mask, alpha=0.3,
                  kind=kind, temperature=2.0, chunk_size=3)
    today = kd_loss_parts(hidden, labels, **common)
    mapped = xtok_loss_parts(hidden, labels, loss="mapped", **common)
    assert torch.equal(today.loss, mapped.loss) and torch.equal(today.kd_sum, mapped.kd_sum)


def test_mapped_loss_matches_a_direct_implementation():
    logits = torch.randn(3, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    lp = torch.tensor([[-0.5, -1.5, -2.5, -3.0]] * 3, dtype=torch.float64)
    mapped = torch.tensor([[4, -1, 9, -1], [-1, -1, -1, -1], [1, 2, 3, 5]])
    got = mapped_per_token(logits, mapped, lp, kind="forward_kl")
    q = logits.softmax(-1)
    p = lp.exp()
    for r in range(3):
        valid = mapped[r] >= 0
        ids = mapped[r][valid]
        t = torch.cat([p[r][valid], (1 - p[r][valid].sum()).reshape(1)])
        s = torch.cat([q[r][ids], (1 - q[r][ids].sum()).reshape(1)])
        kl = float((t * (t / s).log()).sum()) if valid.any() else 0.0
        free = q[r].clone()
        free[ids] = -1
        m = int((~valid).sum())
        uld = float((p[r][~valid].sort(descending=True).values
                     - free.sort(descending=True).values[:m]).abs().sum())
        assert float(got[r]) == pytest.approx(kl + uld, abs=1e-10)


@pytest.mark.parametrize("loss", ["uld", "mapped"])
def test_gradcheck(loss):
    n, vocab, k = 4, 12, 3
    logits = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True,
                         generator=torch.Generator().manual_seed(7))
    ids, lp = _teacher(n, 20, k, seed=8)
    mapped = torch.where(ids < vocab, ids, -1)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(9))
    mask = torch.tensor([True, True, False, True])

    def f(x: torch.Tensor) -> torch.Tensor:
        return xtok_loss_parts(x, labels, topk_ids=mapped, topk_logprobs=lp, kd_mask=mask,
                               loss=loss, kind="jsd", temperature=1.5, chunk_size=2).loss

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------- distill


def _write_store(model_dir: Path, out: Path, n: int, spans: bool = True) -> Path:
    """A store scored by the tiny teacher `model_dir` over reference answers."""
    from primekd.core.chat import ChatPrompt, encode_prompts, render
    from primekd.core.data import load_examples
    from primekd.core.models import load, tokenizer_fingerprint
    from primekd.teach import store
    from primekd.teach.teacher import reference_tokens

    model, tok = load(str(model_dir), device="cpu")
    rows = []
    for e in load_examples("train", limit=n):
        prompt = encode_prompts(tok, [render(tok, ChatPrompt(user=e.question))])[0]
        answer = reference_tokens(tok, e)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        values, top = logits.float().log_softmax(-1).topk(6, -1)
        text, ends = char_ends(tok, answer)
        rows.append({"id": e.id, "sample": 0, "question": e.question, "reference": e.answer,
                     "gold": e.gold, "teacher_prompt": "", "response": text,
                     "token_ids": answer, "topk_ids": top.tolist(),
                     "topk_logprobs": values.tolist(), "finish_reason": "reference",
                     "answer_text": text if spans else None,
                     "token_char_ends": ends if spans else None})
    out.mkdir(parents=True)
    store.write_part(out, rows, [(r["id"], 0) for r in rows], {"rows": len(rows)})
    store.write_manifest(out, {"format": store.FORMAT, "format_version": store.FORMAT_VERSION,
                               "teacher": str(model_dir), "target": "reference", "top_k": 6,
                               "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                               "complete": True, "counts": {"kept": len(rows)}})
    return out


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, small_tok, big_tok):
    root = tmp_path_factory.mktemp("xtok")
    teacher = tiny_model(root / "teacher", tokenizer=small_tok)
    student = tiny_model(root / "student", tokenizer=big_tok, seed=1)
    return teacher, student, _write_store(teacher, root / "store", n=6)


@pytest.mark.parametrize("loss", ["uld", "mapped"])
def test_distill_from_a_store_of_another_tokenizer(two_models, tmp_path, loss, monkeypatch):
    from primekd.distill import distill
    from primekd.distill.config import DistillConfig

    monkeypatch.setenv("PRIMEKD_CACHE", str(tmp_path / "cache"))
    teacher, student, store = two_models
    result = distill(DistillConfig(student=str(student), teacher_store=str(store),
                                   out=str(tmp_path / "out"), xtok_loss=loss, batch_size=2,
                                   max_steps=2, logging_steps=1, lr=1e-3, device="cpu",
                                   val_size=1), progress=False)
    info = result.summary["data"]
    assert info["same_tokenizer"] is False and info["white_box"]
    shares = info["cross_tokenizer"]
    assert shares["xtok_loss"] == loss and shares["chars_unaligned"] == pytest.approx(0)
    assert 0 < shares["chars_one_to_one"] < 1
    assert shares["chars_one_to_one"] + shares["chars_merged"] == pytest.approx(1)
    if loss == "mapped":
        assert 0 < shares["teacher_mass_mapped"] <= 1
    logs = [json.loads(x) for x in
            (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in logs if "kd" in r)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_store_without_spans_is_refused_for_another_tokenizer(two_models, tmp_path):
    from primekd.distill import distill
    from primekd.distill.config import DistillConfig

    teacher, student, _ = two_models
    old = _write_store(teacher, tmp_path / "old", n=2, spans=False)
    with pytest.raises(PrimekdError, match="no character spans.*--target reference"):
        distill(DistillConfig(student=str(student), teacher_store=str(old),
                              out=str(tmp_path / "o"), device="cpu"), progress=False)


def test_same_tokenizer_path_is_unchanged(tiny_model_dir, tmp_path):
    """Pinned: a same-tokenizer run gives the losses the code before cross-tokenizer KD gave
    (the adapter was byte-identical too: sha256 7a10ce21... on torch 2.13 CPU)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_distill import _config, write_store

    from primekd.distill import distill

    store = write_store(tiny_model_dir, tmp_path / "store")
    result = distill(_config(tiny_model_dir, store, tmp_path / "out", max_steps=2, val_size=1),
                     progress=False)
    assert "cross_tokenizer" not in result.summary["data"]
    logs = [json.loads(x) for x in
            (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    losses = [value for r in logs if "loss" in r for value in (r["loss"], r["ce"], r["kd"])]
    assert losses == pytest.approx([2.892038583755493, 5.784075419108073, 1.3298197e-06,
                                    2.881955623626709, 5.763909912109375, 1.3170717e-06],
                                   rel=1e-6)


QWEN_ALIAS = "qwen2.5-coder-0.5b-instruct"
QWEN_GGUF = Path.home() / ".cache" / "primekd" / "gguf" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def _qwen_teacher() -> str:
    """The Qwen2.5 teacher (151,936 tokens; `make test` fetches it): its alias, or the GGUF
    file where the alias is not known here."""
    from primekd.core.models import resolve

    try:
        resolve(QWEN_ALIAS)
        return QWEN_ALIAS
    except PrimekdError as e:
        if QWEN_GGUF.is_file():
            return str(QWEN_GGUF)
        pytest.skip(f"no Qwen2.5 teacher here ({e})")


@pytest.mark.integration
@pytest.mark.slow
def test_qwen_teacher_store_trains_the_bundled_student(tmp_path, monkeypatch, capsys):
    """`teach` with a Qwen teacher -> `distill` of the bundled SmolLM2 (another tokenizer)
    with the mapped loss -> `eval --adapter`."""
    from primekd.cli import main
    from primekd.core.models import BUNDLED_ALIAS

    def cli(*argv: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.argv", ["primekd", *argv])
        try:
            code = main() or 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    store, out, ev = tmp_path / "store", tmp_path / "student", tmp_path / "eval"
    code, _, err = cli("teach", "--teacher", _qwen_teacher(), "--limit", "3",
                       "--max-new-tokens", "24", "--top-k", "8", "--out", str(store),
                       "--device", "cpu", "--json")
    assert code == 0, err
    code, stdout, err = cli("distill", "--student", BUNDLED_ALIAS, "--teacher-store", str(store),
                            "--xtok-loss", "mapped", "--out", str(out), "--max-steps", "2",
                            "--batch-size", "2", "--device", "cpu", "--json", "-q")
    assert code == 0, err
    shares = json.loads(stdout)["data"]["cross_tokenizer"]
    assert shares["chars_one_to_one"] > 0.5 and shares["teacher_mass_mapped"] > 0.5
    code, _, err = cli("eval", "--model", BUNDLED_ALIAS, "--adapter", str(out), "--limit", "2",
                       "--max-new-tokens", "8", "--out", str(ev), "--device", "cpu")
    assert code == 0, err
    rows = [json.loads(line) for line in (ev / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("response" in r for r in rows)
