"""Cross-tokenizer KD losses, chunked like `primekd.distill.kd_loss` (no n x V tensor kept).

At every aligned position (`primekd.distill.align`) the store holds the teacher's top-k
log-probabilities over *its* vocabulary. Two ways to compare them with the student:

- ``uld`` (Universal Logit Distillation, Boizard et al. 2024, arXiv 2402.12030): no token
  correspondence at all. Both distributions become k + 1 buckets: the k largest
  probabilities, sorted, and the rest mass (the teacher's ``1 - sum(top-k)``; the student's
  mass outside *its own* top k). The loss is the Wasserstein-1 distance of the closed form
  the ULD paper uses, the L1 distance between the sorted vectors:
  ``sum_i |t_(i) - s_(i)| + |t_rest - s_rest|``. We take the student's top k (not its full
  sorted vector): the teacher's tail beyond k is unknown, so comparing the student's tail
  element by element would compare it with zeros.
- ``mapped`` (GOLD's spirit): teacher top-k ids that map to a student token with the identical
  string (`align.vocabulary_map`) are compared token by token with the chosen `--divergence`,
  exactly as the same-tokenizer loss does (mapped tokens + one rest bucket holding everything
  else, on both sides); the m unmapped teacher probabilities, sorted, are compared by L1 with
  the student's m largest probabilities outside the mapped ids (ULD on the unmapped rest).
  With identical tokenizers every id maps and this is the same-tokenizer loss exactly.

Temperature tempers the bucket distributions on both sides, as in `kd_loss`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from primekd.distill.kd_loss import (
    LOG_FLOOR,
    LossParts,
    chunked_sums,
    divergence,
    resolve_beta,
    teacher_buckets,
    temper,
)

XTOK_LOSSES = ("uld", "mapped")
_ABSENT = -1e4  # log-prob of a bucket slot that holds nothing on either side


def _sorted_probs(log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs.exp().sort(dim=-1, descending=True).values


def uld_per_token(logits: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0,
                  lse: torch.Tensor | None = None) -> torch.Tensor:
    """ULD per row: L1 between sorted teacher (top-k + rest) and student (top-k + rest) buckets."""
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    k = topk_logprobs.shape[-1]
    floor = LOG_FLOOR * max(temperature, 1.0)
    teacher = temper(teacher_buckets(topk_logprobs.to(logits.dtype), floor), temperature)
    top = logits.topk(k, dim=-1).values - lse
    rest = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp_max(1.0 - 1e-7))
    student = temper(torch.logaddexp(torch.cat([top, rest], -1),
                                     torch.full_like(rest, floor)), temperature)
    t, s = teacher.exp(), student.exp()
    return ((t[..., :k].sort(-1, descending=True).values
             - s[..., :k].sort(-1, descending=True).values).abs().sum(-1)
            + (t[..., k] - s[..., k]).abs())


def mapped_per_token(logits: torch.Tensor, mapped_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                     kind: str = "reverse_kl", temperature: float = 1.0,
                     beta: float | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Divergence over the mapped tokens + rest, plus L1 of sorted unmapped probabilities."""
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    teacher_lp = topk_logprobs.to(logits.dtype)
    valid = mapped_ids >= 0
    ids = torch.where(valid, mapped_ids, 0).long()
    any_valid = valid.any(-1, keepdim=True)
    # Unmapped slots hold nothing on either side (their teacher mass joins the rest bucket);
    # scattering the mask onto id 0 for them is harmless only if id 0 is a mapped id of the
    # row, so they repeat the row's first mapped id instead.
    first = ids.gather(-1, valid.long().argmax(-1, keepdim=True))
    ids = torch.where(valid, ids, first)
    floor = LOG_FLOOR * max(temperature, 1.0)
    t = teacher_buckets(torch.where(valid, teacher_lp, torch.full_like(teacher_lp, _ABSENT)),
                        floor)
    top = torch.where(valid, logits.gather(-1, ids) - lse, _ABSENT)
    others = logits.scatter(-1, ids, torch.finfo(logits.dtype).min)
    rest = torch.logaddexp(torch.logsumexp(others, dim=-1, keepdim=True), lse + floor) - lse
    s = torch.cat([top, rest], dim=-1)
    kl = divergence(temper(t, temperature), temper(s, temperature), kind, beta)
    kl = torch.where(any_valid.squeeze(-1), kl, 0.0)
    return kl + _unmapped_uld(logits, lse, valid, ids, teacher_lp)


def _unmapped_uld(logits: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor,
                  ids: torch.Tensor, teacher_lp: torch.Tensor) -> torch.Tensor:
    """L1 between the m unmapped teacher probabilities (sorted) and the student's m largest
    probabilities outside the mapped ids (sorted); 0 where every slot maps."""
    unmapped = ~valid
    if not bool(unmapped.any()):
        return logits.new_zeros(logits.shape[:-1])
    k = teacher_lp.shape[-1]
    teacher = _sorted_probs(torch.where(unmapped, teacher_lp, float("-inf")))
    free = logits.scatter(-1, ids, float("-inf"))  # mapped ids (and their repeats) out
    student = (free.topk(k, dim=-1).values - lse).exp()  # already sorted
    count = unmapped.sum(-1, keepdim=True)
    slots = torch.arange(k, device=logits.device).expand_as(teacher) < count
    return torch.where(slots, (teacher - student).abs(), 0.0).sum(-1)


def xtok_loss_parts(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    kd_mask: torch.Tensor,
    loss: str = "uld",
    alpha: float = 0.5,
    kind: str = "reverse_kl",
    temperature: float = 1.0,
    beta: float | None = None,
    chunk_size: int = 1024,
    use_checkpoint: bool | None = None,
) -> LossParts:
    """`kd_loss.kd_loss_parts` for a teacher of another tokenizer: inputs (n, H) hidden states
    with `head`, or (n, V) logits; labels (n,) the student's next tokens (CE); at rows with
    `kd_mask` (aligned group starts) the teacher's top-k log-probs and, for ``mapped``, their
    student ids (`topk_ids`, -1 where unmapped)."""
    if loss not in XTOK_LOSSES:
        raise ValueError(f"unknown cross-tokenizer loss {loss!r}; choose from "
                         f"{', '.join(XTOK_LOSSES)}")
    resolve_beta(kind, beta)

    def per_token(logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                  lse: torch.Tensor) -> torch.Tensor:
        if loss == "uld":
            return uld_per_token(logits, logprobs, temperature, lse)
        return mapped_per_token(logits, ids, logprobs, kind, temperature, beta, lse)

    kd_mask = kd_mask.bool()
    ce_sum, kd_sum = chunked_sums(inputs, labels, head, kd_mask, topk_ids, topk_logprobs,
                                  per_token, chunk_size, use_checkpoint)
    total = alpha * ce_sum + (1.0 - alpha) * temperature**2 * kd_sum
    return LossParts(total, ce_sum, kd_sum, int((labels != -100).sum()), int(kd_mask.sum()))


__all__ = ["XTOK_LOSSES", "mapped_per_token", "uld_per_token", "xtok_loss_parts"]
