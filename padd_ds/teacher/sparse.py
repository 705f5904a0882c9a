"""Compressed teacher logits and the KD loss that consumes them.

A full-vocabulary fp16 logit row costs 2*V bytes per token (300 KB for V=152k). The teacher
sends only its top-k logits (float32 values, int32 indices) plus the log-sum-exp of the
whole row, so the kept probabilities p_i = exp(z_i - lse) are exact and the tail mass
1 - sum(p_i) is known exactly too. The student-side loss treats the distribution as
k + 1 buckets: the kept tokens and one "tail" bucket.

At temperature T != 1 the full-vocabulary log-sum-exp of z/T is unknown; we temper the
(k+1)-bucket distribution instead, giving the tail the logit log(tail_mass) + lse. This is
exact at T = 1 and a documented approximation otherwise.

Top-k is biased: it drops the tail's shape. The sampled variant (`teacher.logits_mode:
sampled`, after the random-sampling KD of the sparse-logit-sampling literature) draws k
tokens from p with replacement and sends the distinct ones with their empirical weights
w = count / k and exact logits. sum_i w_i (log p_i - log q_i) is then an unbiased estimate
of KL(p || q), and its gradient q - w is an unbiased estimate of the full-vocabulary one.
At T != 1 the weights are importance-reweighted by p_i^(1/T - 1) and renormalised
(consistent, not unbiased).
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
    # Sampled mode only: [B, L, k] empirical weights (count / k; 0 for unused slots).
    weights: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.values, self.indices, self.lse] + ([self.weights] if self.weights is not None else [])

    @staticmethod
    def specs(batch: int, seqlen: int, k: int, sampled: bool = False):
        s = [((batch, seqlen, k), torch.float32), ((batch, seqlen, k), torch.int32), ((batch, seqlen), torch.float32)]
        return s + ([((batch, seqlen, k), torch.float32)] if sampled else [])

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> "SparseLogits":
        return cls(*tensors)

    def to(self, device: str | torch.device) -> "SparseLogits":
        """On `device`: the wire form is on the host, the KD loss runs where the student's logits are."""
        return SparseLogits.from_tensors([t.to(device) for t in self.tensors()])

    def bytes_per_token(self) -> int:
        return self.k * (4 + 4 + (4 if self.weights is not None else 0)) + 4


def encode_topk(logits: torch.Tensor, k: int) -> SparseLogits:
    """Compress [B, L, V] logits to their top-k entries plus the full log-sum-exp."""
    if k > logits.shape[-1]:
        raise ValueError(f"teacher.logits_top_k={k} exceeds the vocabulary size {logits.shape[-1]}")
    logits = logits.float()
    values, indices = torch.topk(logits, k, dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    return SparseLogits(values.contiguous(), indices.to(torch.int32).contiguous(), lse.contiguous())


def encode_sampled(logits: torch.Tensor, k: int, generator: torch.Generator | None = None) -> SparseLogits:
    """Draw k tokens per position from softmax(logits) with replacement; keep distinct ones
    with weight count / k (unused slots: weight 0, index of the first draw)."""
    logits = logits.float()
    B, L, V = logits.shape
    probs = torch.softmax(logits, -1).reshape(B * L, V)
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)      # [BL, k]
    draws, _ = draws.sort(-1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    # weight of a distinct token = its count; slots that repeat an earlier draw get 0
    counts = torch.zeros_like(draws, dtype=torch.float32)
    group = first.cumsum(-1) - 1                                                     # [BL, k]
    counts.scatter_add_(1, group, torch.ones_like(counts))
    idx = torch.zeros_like(draws)
    idx.scatter_(1, group, draws)                       # distinct ids packed to the front
    used = counts > 0
    idx = torch.where(used, idx, draws[:, :1].expand_as(idx))
    values = torch.gather(logits.reshape(B * L, V), 1, idx)
    lse = torch.logsumexp(logits, dim=-1)
    return SparseLogits(values.reshape(B, L, k).contiguous(), idx.to(torch.int32).reshape(B, L, k).contiguous(),
                        lse.contiguous(), (counts / k).reshape(B, L, k).contiguous())


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
    if teacher.weights is not None:
        kl = _sampled_kl(student_logits, teacher, temperature)
    else:
        logp = bucket_logprobs_teacher(teacher, temperature)
        logq = bucket_logprobs_student(student_logits, teacher.indices, temperature)
        kl = (logp.exp() * (logp - logq)).sum(-1)               # [B, L]
    if isinstance(temperature, torch.Tensor):
        kl = kl * temperature.to(kl).reshape(-1, *([1] * (kl.dim() - 1))) ** 2
    else:
        kl = kl * temperature ** 2
    m = mask.to(kl.dtype)
    return (kl * m).sum() / (m.sum().clamp(min=1.0) if denom is None else denom)


def _as_temp(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature))
    return t.to(like).reshape(*t.shape, *([1] * (like.dim() - t.dim())))


def _sampled_kl(student_logits: torch.Tensor, t: SparseLogits, temperature) -> torch.Tensor:
    """sum_i w_i (log p_i - log q_i): unbiased for KL(p || q) at T = 1 (see module doc)."""
    temp = _as_temp(temperature, t.values)
    w = t.weights
    logp = t.values / temp
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:
        # importance weights towards p_T, and p_T's normaliser estimated from the same draws
        raw = w * torch.exp((t.values - t.lse.unsqueeze(-1)) * (1.0 / temp - 1.0))
        w = raw / raw.sum(-1, keepdim=True).clamp(min=1e-30)
        logp = logp - torch.logsumexp(torch.where(t.weights > 0, logp, torch.full_like(logp, -1e30)), -1,
                                      keepdim=True)
    else:
        logp = t.values - t.lse.unsqueeze(-1)
    z = student_logits.float() / _as_temp(temperature, student_logits.float())
    logq = torch.gather(torch.log_softmax(z, -1), -1, t.indices.long())
    return (w * (logp - logq)).sum(-1)


def full_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Reference full-vocabulary forward KL, same reduction as `sparse_kd_loss`."""
    logp = F.log_softmax(teacher_logits.float() / temperature, -1)
    logq = F.log_softmax(student_logits.float() / temperature, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * temperature ** 2
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1.0)
