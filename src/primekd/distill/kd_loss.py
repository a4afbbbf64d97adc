"""Knowledge-distillation losses on a sparse teacher: top-k log-probabilities plus a rest bucket.

The teacher store keeps, for every answer token, the teacher's k most likely tokens and their
full-vocabulary log-probabilities at temperature 1. That defines a distribution over k + 1
*buckets*: the k tokens, and one bucket holding the remaining mass ``1 - sum(exp(topk))``.
The student's full softmax is folded into the same buckets (its k probabilities at the
teacher's ids, and the sum of all the others), so both sides are proper distributions over
the same k + 1 outcomes and every divergence below is exact on them. With k = vocabulary the
rest bucket is empty and the sparse loss equals the dense one.

Temperature. The stored log-probabilities are at T = 1, and the teacher's rest mass cannot be
re-tempered exactly (``sum_j p_j^(1/T)`` over the tokens outside the top k depends on how that
mass is spread, which the store does not keep). We therefore temper the (k + 1)-bucket
distribution on *both* sides: ``b^(1/T) / sum(b^(1/T))``, treating the rest bucket as one
outcome. The divergence is then a proper divergence between two distributions on the same
buckets (zero exactly when the student's buckets match the teacher's), and for k = V it is the
usual ``D(softmax(t / T) || softmax(s / T))``. The KD term is multiplied by ``T**2`` (Hinton et
al.) so its gradient scale does not shrink with T.

Memory. ``kd_loss_parts`` takes the student's final hidden states (or logits) at the answer
positions and computes the output projection, the softmax and the divergence chunk by chunk
under activation checkpointing, so neither the forward nor the backward holds more than
``chunk_size x vocab`` float32 values at once, whatever the sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
DEFAULT_BETA = {"jsd": 0.5, "skew_kl": 0.1}

# Bucket log-probabilities are floored smoothly at exp(LOG_FLOOR) (log(b + e^floor)), so an
# empty rest bucket (k = V) stays finite and differentiable; the effect is below 1e-21.
LOG_FLOOR = -50.0
# Teacher log-probabilities below this (e.g. -inf padding) are treated as probability 0.
_TEACHER_MIN_LOGPROB = -1e4


@dataclass
class LossParts:
    """Sums over tokens (divide by a token count to get means); ``loss`` is what to optimise."""

    loss: torch.Tensor  # alpha * ce_sum + (1 - alpha) * T^2 * kd_sum
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor  # divergence sum, before the T^2 and (1 - alpha) factors
    n_ce: int
    n_kd: int


def resolve_beta(divergence: str, beta: float | None) -> float:
    """The beta a divergence uses: the user's, or its default (0.5 for JSD, 0.1 for skew KL)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {', '.join(DIVERGENCES)}")
    if beta is None:
        return DEFAULT_BETA.get(divergence, 0.5)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return float(beta)


# ---- buckets ---------------------------------------------------------------------------------


def teacher_buckets(topk_logprobs: torch.Tensor, log_floor: float = LOG_FLOOR) -> torch.Tensor:
    """(n, k) teacher log-probs at T=1 -> (n, k+1) log-probs of the top-k and the rest bucket.

    A rest mass within rounding error of zero (k ulps of the compute dtype) counts as empty.
    """
    lp = topk_logprobs.clamp_min(_TEACHER_MIN_LOGPROB)
    rest = 1.0 - lp.exp().sum(-1, keepdim=True)
    noise = 4 * lp.shape[-1] * torch.finfo(lp.dtype).eps
    rest = torch.where(rest > noise, rest, torch.zeros_like(rest))
    floor = torch.full_like(rest, log_floor)
    log_rest = torch.logaddexp(torch.log(rest), floor)
    return torch.cat([lp, log_rest], dim=-1)


def student_buckets(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    log_floor: float = LOG_FLOOR,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """(n, V) student logits folded onto the teacher's top-k ids + rest: (n, k+1) log-probs.

    `lse` (n, 1) is the logits' logsumexp, when the caller has it already.
    """
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    top = logits.gather(-1, topk_ids) - lse
    # The top-k masked with the most negative finite value (not -inf, whose all-masked
    # logsumexp would have a NaN gradient when k = V); one (n, V) copy.
    others = logits.scatter(-1, topk_ids, torch.finfo(logits.dtype).min)
    # log(rest + e^floor * total): the floor keeps an empty rest finite and differentiable.
    rest = torch.logaddexp(torch.logsumexp(others, dim=-1, keepdim=True), lse + log_floor)
    return torch.cat([top, rest - lse], dim=-1)


def temper(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temper a distribution given as log-probs: log softmax(log p / T)."""
    if temperature == 1.0:
        return log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True)
    return F.log_softmax(log_probs / temperature, dim=-1)


# ---- divergences on log-probabilities (last dim is the distribution) ------------------------


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w p + (1 - w) q)."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def divergence(
    teacher_log: torch.Tensor, student_log: torch.Tensor, kind: str, beta: float | None = None
) -> torch.Tensor:
    """D(teacher || student) per row, for distributions given as log-probabilities.

    forward_kl: KL(p||q). reverse_kl: KL(q||p). jsd: generalised JSD as in GKD / TRL,
    beta KL(p||m) + (1-beta) KL(q||m) with m = beta p + (1-beta) q (beta 0 -> forward KL,
    1 -> reverse KL). skew_kl: KL(p || beta p + (1-beta) q) (DistiLLM's skew KL; beta 0 ->
    forward KL). tvd: total variation 0.5 sum |p - q|.
    """
    beta = resolve_beta(kind, beta)
    p, q = teacher_log, student_log
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "tvd":
        return 0.5 * (p.exp() - q.exp()).abs().sum(-1)
    if kind == "skew_kl":
        return _kl(p, q) if beta == 0.0 else _kl(p, _mixture(p, q, beta))
    # jsd
    if beta == 0.0:
        return _kl(p, q)
    if beta == 1.0:
        return _kl(q, p)
    m = _mixture(p, q, beta)
    return beta * _kl(p, m) + (1.0 - beta) * _kl(q, m)


# ---- per-token losses --------------------------------------------------------------------------


def sparse_kd_per_token(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    kind: str = "reverse_kl",
    temperature: float = 1.0,
    beta: float | None = None,
) -> torch.Tensor:
    """D_T(teacher buckets || student buckets) per token (without the T^2 factor)."""
    return _sparse_kd(student_logits, topk_ids, topk_logprobs, kind, temperature, beta)


def _sparse_kd(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float | None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    # The floor is scaled so that after tempering it still sits at exp(LOG_FLOOR).
    floor = LOG_FLOOR * max(temperature, 1.0)
    t = temper(teacher_buckets(topk_logprobs.to(logits.dtype), floor), temperature)
    s = temper(student_buckets(logits, topk_ids.long(), floor, lse), temperature)
    return divergence(t, s, kind, beta)


def dense_kd_per_token(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "reverse_kl",
    temperature: float = 1.0,
    beta: float | None = None,
) -> torch.Tensor:
    """Reference: the divergence between full tempered softmaxes (without the T^2 factor)."""
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    return divergence(t, s, kind, beta)


def dense_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    kind: str = "reverse_kl",
    temperature: float = 1.0,
    beta: float | None = None,
) -> torch.Tensor:
    """Naive reference loss on (B, S, V) logits aligned with (B, S) labels (-100 = no loss).

    Shifts like a causal LM (logit t predicts label t+1) and averages over label tokens.
    """
    s = _upcast(student_logits[:, :-1])
    t = _upcast(teacher_logits[:, :-1])
    y = labels[:, 1:]
    mask = y != -100
    ce = F.cross_entropy(s[mask], y[mask], reduction="sum")
    kd = dense_kd_per_token(s[mask], t[mask], kind, temperature, beta).sum()
    n = mask.sum().clamp_min(1)
    return (alpha * ce + (1 - alpha) * temperature**2 * kd) / n


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 (softmax and logs need it); float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---- chunked loss ------------------------------------------------------------------------------


# A per-token KD term over one chunk: (logits, topk_ids, topk_logprobs, lse) -> (n,) values.
PerTokenKD = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _chunk_sums(
    head: Callable[[torch.Tensor], torch.Tensor] | None,
    x: torch.Tensor,
    labels: torch.Tensor,
    kd_mask: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    per_token: PerTokenKD,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _upcast(head(x) if head is not None else x)
    # CE from the same logsumexp the buckets use: no (n, V) log-softmax of its own.
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    valid = labels != -100
    target = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1))
    ce = torch.where(valid, (lse - target).squeeze(-1), 0.0).sum()
    if not bool(kd_mask.any()):
        return ce, logits.new_zeros(())
    # All rows at once (rows without a teacher hold finite placeholders), then masked:
    # indexing the rows out first would copy the (n, V) logits.
    kd = per_token(logits, topk_ids, topk_logprobs, lse)
    return ce, torch.where(kd_mask, kd, 0.0).sum()


def chunked_sums(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor] | None,
    kd_mask: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    per_token: PerTokenKD,
    chunk_size: int,
    use_checkpoint: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE and KD sums over n tokens, chunk by chunk: no (n, V) tensor at once. With more than
    one chunk and gradients needed, each chunk is recomputed in backward (checkpointing)."""
    n = labels.shape[0]
    if use_checkpoint is None:  # one chunk: recomputing it in backward would save nothing
        use_checkpoint = torch.is_grad_enabled() and inputs.requires_grad and n > chunk_size
    ce_sum = inputs.new_zeros((), dtype=torch.float32 if inputs.dtype != torch.float64
                              else torch.float64)
    kd_sum = ce_sum.clone()
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        args = (head, inputs[sl], labels[sl], kd_mask[sl], topk_ids[sl], topk_logprobs[sl],
                per_token)
        if use_checkpoint:
            ce, kd = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            ce, kd = _chunk_sums(*args)
        ce_sum = ce_sum + ce
        kd_sum = kd_sum + kd
    return ce_sum, kd_sum


def kd_loss_parts(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    kd_mask: torch.Tensor | None = None,
    alpha: float = 0.5,
    kind: str = "reverse_kl",
    temperature: float = 1.0,
    beta: float | None = None,
    chunk_size: int = 1024,
    use_checkpoint: bool | None = None,
) -> LossParts:
    """The KD objective's sums over n selected (already shifted) answer tokens.

    inputs: (n, H) final hidden states with ``head`` the output projection, or (n, V) logits
    with ``head=None``. labels: (n,) next-token ids. topk_ids / topk_logprobs: (n, k) teacher
    top-k at the same tokens (None for pure CE); kd_mask: (n,) tokens that have a teacher
    distribution (default: all). With more than one chunk, each chunk of ``chunk_size``
    tokens is recomputed in the backward pass (activation checkpointing) when gradients are
    needed, so peak memory is O(chunk_size x V) rather than O(n x V).
    """
    resolve_beta(kind, beta)
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    n = labels.shape[0]
    use_kd = topk_ids is not None and alpha < 1.0
    if use_kd:
        kd_mask = torch.ones(n, dtype=torch.bool, device=labels.device) if kd_mask is None \
            else kd_mask.bool()
    else:
        kd_mask = torch.zeros(n, dtype=torch.bool, device=labels.device)
        topk_ids = torch.zeros((n, 1), dtype=torch.long, device=labels.device)
        topk_logprobs = torch.zeros((n, 1), dtype=inputs.dtype, device=labels.device)

    def per_token(logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                  lse: torch.Tensor) -> torch.Tensor:
        return _sparse_kd(logits, ids, logprobs, kind, temperature, beta, lse)

    ce_sum, kd_sum = chunked_sums(inputs, labels, head, kd_mask, topk_ids, topk_logprobs,
                                  per_token, chunk_size, use_checkpoint)
    loss = alpha * ce_sum + (1.0 - alpha) * temperature**2 * kd_sum if use_kd else ce_sum
    return LossParts(loss, ce_sum, kd_sum, int((labels != -100).sum()), int(kd_mask.sum()))
