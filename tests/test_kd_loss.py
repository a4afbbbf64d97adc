"""The sparse (top-k + rest) KD losses against a dense reference, gradients, temperature, chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from primekd.distill.kd_loss import (
    DIVERGENCES,
    dense_kd_loss,
    dense_kd_per_token,
    divergence,
    kd_loss_parts,
    sparse_kd_per_token,
    student_buckets,
    teacher_buckets,
)

V = 37


def _pair(n: int = 6, vocab: int = V, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=g, dtype=dtype) * 2
    teacher = torch.randn(n, vocab, generator=g, dtype=dtype) * 2
    return student, teacher


def _topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs = F.log_softmax(teacher_logits, dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values


def _dense_buckets(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Fold a full distribution into top-k + rest the obvious (dense) way."""
    p = F.softmax(logits, dim=-1)
    top = p.gather(-1, ids)
    rest = 1 - top.sum(-1, keepdim=True)
    return torch.cat([top, rest], -1)


def _dense_divergence(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Textbook formulas on probabilities (independent of the log-space implementation)."""
    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    m = beta * p + (1 - beta) * q
    if kind == "skew_kl":
        return kl(p, m)
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_equals_dense_when_k_is_vocab(kind: str) -> None:
    student, teacher = _pair()
    ids, values = _topk(teacher, V)
    for temperature in (1.0, 2.0, 0.7):
        sparse = sparse_kd_per_token(student, ids, values, kind, temperature, beta=0.3)
        dense = dense_kd_per_token(student, teacher, kind, temperature, beta=0.3)
        torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 5, 20])
def test_sparse_matches_dense_bucket_divergence(kind: str, k: int) -> None:
    """At T=1 the sparse loss is exactly the divergence between the (k+1)-bucket foldings."""
    student, teacher = _pair(seed=k)
    ids, values = _topk(teacher, k)
    sparse = sparse_kd_per_token(student, ids, values, kind, 1.0, beta=0.3)
    expected = _dense_divergence(_dense_buckets(teacher, ids), _dense_buckets(student, ids),
                                 kind, 0.3)
    torch.testing.assert_close(sparse, expected, rtol=1e-8, atol=1e-12)


def test_bucket_helpers_are_distributions() -> None:
    student, teacher = _pair()
    ids, values = _topk(teacher, 4)
    for buckets in (teacher_buckets(values), student_buckets(student, ids)):
        torch.testing.assert_close(buckets.exp().sum(-1), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergences_are_zero_at_equality_and_positive_otherwise(kind: str) -> None:
    student, teacher = _pair()
    p = F.log_softmax(teacher, -1)
    q = F.log_softmax(student, -1)
    assert divergence(p, p, kind).abs().max() < 1e-12
    assert (divergence(p, q, kind) > 0).all()


def test_jsd_limits_are_forward_and_reverse_kl() -> None:
    student, teacher = _pair()
    p = F.log_softmax(teacher, -1)
    q = F.log_softmax(student, -1)
    torch.testing.assert_close(divergence(p, q, "jsd", 0.0), divergence(p, q, "forward_kl"))
    torch.testing.assert_close(divergence(p, q, "jsd", 1.0), divergence(p, q, "reverse_kl"))
    torch.testing.assert_close(divergence(p, q, "skew_kl", 0.0), divergence(p, q, "forward_kl"))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradcheck(kind: str) -> None:
    student, teacher = _pair(n=3, vocab=9)
    ids, values = _topk(teacher, 4)
    student.requires_grad_(True)

    def f(s: torch.Tensor) -> torch.Tensor:
        return sparse_kd_per_token(s, ids, values, kind, 1.5, beta=0.4)

    assert torch.autograd.gradcheck(f, (student,), eps=1e-6, atol=1e-6)


def test_gradcheck_chunked_hidden_path() -> None:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (3,), generator=g)
    ids, values = _topk(torch.randn(3, 6, generator=g, dtype=torch.float64), 3)

    def f(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return kd_loss_parts(h, labels, head=lambda x: x @ w.T, topk_ids=ids,
                             topk_logprobs=values, alpha=0.3, kind="jsd", temperature=2.0,
                             chunk_size=2).loss

    assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-6, fast_mode=True)


def test_temperature_scaling() -> None:
    """KD term = T^2 * D(softmax(t/T) || softmax(s/T)); T=1 leaves it unscaled."""
    student, teacher = _pair(n=4)
    ids, values = _topk(teacher, V)
    labels = torch.randint(0, V, (4,))
    for temperature in (1.0, 3.0):
        parts = kd_loss_parts(student, labels, topk_ids=ids, topk_logprobs=values, alpha=0.0,
                              kind="forward_kl", temperature=temperature)
        t = F.softmax(teacher / temperature, -1)
        s = F.softmax(student / temperature, -1)
        expected = temperature**2 * (t * (t.log() - s.log())).sum()
        torch.testing.assert_close(parts.loss, expected)
    # Tempering flattens: at high T the divergence between the two shrinks.
    hot = sparse_kd_per_token(student, ids, values, "forward_kl", 10.0).sum()
    cold = sparse_kd_per_token(student, ids, values, "forward_kl", 1.0).sum()
    assert hot < cold


def test_temperature_tempers_the_bucket_distribution_for_k_below_vocab() -> None:
    student, teacher = _pair()
    ids, values = _topk(teacher, 5)
    temperature = 2.0
    p = _dense_buckets(teacher, ids) ** (1 / temperature)
    q = _dense_buckets(student, ids) ** (1 / temperature)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    expected = (p * (p.log() - q.log())).sum(-1)
    sparse = sparse_kd_per_token(student, ids, values, "forward_kl", temperature)
    torch.testing.assert_close(sparse, expected)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_equals_unchunked_with_gradients(chunk: int) -> None:
    g = torch.Generator().manual_seed(2)
    n, h, vocab, k = 11, 8, 50, 6
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(vocab, h, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    ids, values = _topk(torch.randn(n, vocab, generator=g), k)
    kd_mask = torch.rand(n, generator=g) > 0.3

    def run(chunk_size: int, checkpointed: bool):
        hid = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        parts = kd_loss_parts(hid, labels, head=lambda x: x @ w.T, topk_ids=ids,
                              topk_logprobs=values, kd_mask=kd_mask, alpha=0.4,
                              kind="reverse_kl", temperature=1.5, chunk_size=chunk_size,
                              use_checkpoint=checkpointed)
        parts.loss.backward()
        return parts, hid.grad, w.grad

    ref, ref_h, ref_w = run(n, False)
    got, got_h, got_w = run(chunk, True)
    torch.testing.assert_close(got.loss, ref.loss)
    torch.testing.assert_close(got_h, ref_h)
    torch.testing.assert_close(got_w, ref_w)
    assert got.n_kd == int(kd_mask.sum()) and got.n_ce == n


def test_chunked_matches_dense_reference_loss_on_a_batch() -> None:
    """kd_loss_parts on shifted, masked tokens == the naive (B, S, V) reference loss."""
    g = torch.Generator().manual_seed(3)
    b, s, vocab = 2, 7, 23
    student = torch.randn(b, s, vocab, generator=g, dtype=torch.float64)
    teacher = torch.randn(b, s, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    dense = dense_kd_loss(student, teacher, labels, alpha=0.25, kind="jsd", temperature=2.0)
    mask = labels[:, 1:] != -100
    ids, values = _topk(teacher[:, :-1][mask], vocab)
    parts = kd_loss_parts(student[:, :-1][mask], labels[:, 1:][mask], topk_ids=ids,
                          topk_logprobs=values, alpha=0.25, kind="jsd", temperature=2.0,
                          chunk_size=3)
    torch.testing.assert_close(parts.loss / parts.n_ce, dense)


def test_float16_teacher_logprobs_and_empty_rest_stay_finite() -> None:
    student, teacher = _pair(dtype=torch.float32)
    ids, values = _topk(teacher, V)
    values = values.half()  # stored as float16: the top-k may sum to slightly above 1
    out = sparse_kd_per_token(student, ids, values, "reverse_kl", 1.0)
    assert torch.isfinite(out).all()
    values = torch.full_like(values, float("-inf"))
    values[:, 0] = 0.0
    assert torch.isfinite(sparse_kd_per_token(student, ids, values, "forward_kl")).all()


def test_invalid_arguments() -> None:
    student, teacher = _pair()
    ids, values = _topk(teacher, 3)
    with pytest.raises(ValueError, match="divergence"):
        sparse_kd_per_token(student, ids, values, "kl")
    with pytest.raises(ValueError, match="beta"):
        sparse_kd_per_token(student, ids, values, "jsd", beta=1.5)
