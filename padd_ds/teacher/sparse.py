"""Compressed teacher logits and the KD loss that consumes them.

A full-vocabulary fp16 logit row costs 2*V bytes per token (300 KB for V=152k). The teacher
sends only its top-k logits (float32 values, int32 indices) plus the log-sum-exp of the
whole row, so the kept probabilities p_i = exp(z_i - lse) are exact and the tail mass
1 - sum(p_i) is known exactly too. The student-side loss treats the distribution as
k + 1 buckets: the kept tokens and one "tail" bucket.

At temperature T != 1 the full-vocabulary log-sum-exp of z/T is unknown; we temper the
(k+1)-bucket distribution instead, giving the tail the logit log(tail_mass) + lse. This is
exact at T = 1 and a documented approximation otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SparseLogits:
    """Top-k teacher logits for a [B, L] batch of positions."""

    values: torch.Tensor   # [B, L, k] float32, raw logits of the kept tokens
    indices: torch.Tensor  # [B, L, k] int32 token ids
    lse: torch.Tensor      # [B, L] float32, log-sum-exp over the full vocabulary

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.values, self.indices, self.lse]

    @staticmethod
    def specs(batch: int, seqlen: int, k: int):
        return [((batch, seqlen, k), torch.float32), ((batch, seqlen, k), torch.int32),
                ((batch, seqlen), torch.float32)]

    def bytes_per_token(self) -> int:
        return self.k * (4 + 4) + 4


def encode_topk(logits: torch.Tensor, k: int) -> SparseLogits:
    """Compress [B, L, V] logits to their top-k entries plus the full log-sum-exp."""
    if k > logits.shape[-1]:
        raise ValueError(f"teacher.logits_top_k={k} exceeds the vocabulary size {logits.shape[-1]}")
    logits = logits.float()
    values, indices = torch.topk(logits, k, dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    return SparseLogits(values.contiguous(), indices.to(torch.int32).contiguous(), lse.contiguous())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def bucket_logprobs_teacher(t: SparseLogits, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Teacher log-probabilities over the k+1 buckets, [B, L, k+1]."""
    kept = t.values - t.lse.unsqueeze(-1)                      # exact log p_i at T = 1
    tail = _log1mexp(torch.logsumexp(kept, dim=-1, keepdim=True))
    buckets = torch.cat([kept, tail], dim=-1)
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:
        temp = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(temperature)
        temp = temp.to(buckets).reshape(*temp.shape, *([1] * (buckets.dim() - temp.dim())))
        buckets = torch.log_softmax(buckets / temp, dim=-1)
    return buckets


def bucket_logprobs_student(student_logits: torch.Tensor, indices: torch.Tensor,
                            temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Student log-probabilities over the teacher's k kept tokens plus the tail, [B, L, k+1]."""
    z = student_logits.float()
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:
        temp = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(temperature)
        z = z / temp.to(z).reshape(*temp.shape, *([1] * (z.dim() - temp.dim())))
    logq = F.log_softmax(z, dim=-1)
    kept = torch.gather(logq, -1, indices.long())
    tail = _log1mexp(torch.logsumexp(kept, dim=-1, keepdim=True))
    return torch.cat([kept, tail], dim=-1)


def sparse_kd_loss(student_logits: torch.Tensor, teacher: SparseLogits, mask: torch.Tensor,
                   temperature: float | torch.Tensor = 1.0, denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL(p_T || q_S) over k+1 buckets, summed over masked positions / `denom`, times T^2.

    `mask` [B, L] selects the positions whose next-token distribution is distilled.
    `temperature` is a float or a per-sequence [B] tensor (Stage II couples it to advantage).
    The T^2 factor keeps gradient scale independent of T (Hinton et al., 2015).
    `denom` defaults to the number of masked positions (a per-token mean); data-parallel
    training passes the global count so that every rank's tokens weigh the same.
    """
    logp = bucket_logprobs_teacher(teacher, temperature)
    logq = bucket_logprobs_student(student_logits, teacher.indices, temperature)
    kl = (logp.exp() * (logp - logq)).sum(-1)                   # [B, L]
    if isinstance(temperature, torch.Tensor):
        kl = kl * temperature.to(kl).reshape(-1, *([1] * (kl.dim() - 1))) ** 2
    else:
        kl = kl * temperature ** 2
    m = mask.to(kl.dtype)
    return (kl * m).sum() / (m.sum().clamp(min=1.0) if denom is None else denom)


def full_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Reference full-vocabulary forward KL, same reduction as `sparse_kd_loss`."""
    logp = F.log_softmax(teacher_logits.float() / temperature, -1)
    logq = F.log_softmax(student_logits.float() / temperature, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * temperature ** 2
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1.0)
