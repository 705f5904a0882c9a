"""Stage II and III losses: advantage-tempered KD on sparse teacher targets, PR-GRPO and the
policy baselines (GRPO, RSPO, GSPO), router drift, and a k3 KL to a reference policy (unused
by the trainer: config.py refuses stage3.ref_kl > 0).

Everything here is a pure function of tensors: no process groups, no models. Each loss sums
over the positions `mask` selects and divides by `denom` (default: the local count), so a
data-parallel trainer passes the global count and every rank's tokens weigh the same.

Stage II temperature on sparse targets
--------------------------------------
The target is p* = softmax(z_T / T) with T from the advantage (`effective_temperature`).
The teacher sends only its top-k logits and the full log-sum-exp, so softmax(z / T) over
the whole vocabulary is unknown for T != 1: it needs the tail's logits. What is known
exactly is the split head (the k kept tokens) / tail (the rest) at T = 1 and the head's
logits. We therefore temper *within the head* and keep the tail's mass:

    p*_i = (1 - m) * softmax(z_K / T)_i  for kept i,     p*_tail = m  (exact T = 1 tail mass)

Properties: exact at T = 1 (it is then the k+1-bucket KL of `teacher.sparse`); exact for
every T when the tail is empty (k = V); and the same map applied to the student
(`temper_student`) sends identical models to zero loss at every T. (Tempering the k+1
buckets with the tail as one token, as `sparse_kd_loss` does, treats thousands of tail
tokens as one and leaves identical models a non-zero loss at T != 1.) With the default
`temper_student=False` the student is compared at T = 1, so the KD optimum is itself
sharper (T < 1, good paths) or softer (T > 1, bad paths) than the teacher, which is what
the temperature is for; no T^2 factor then, since no student-side 1/T scales the gradient.
Sampled targets (`teacher.logits_mode: sampled`) are importance-reweighted towards p*
instead, with Z_T = sum_j p_j^(1/T) estimated without bias from the same draws.

Stage III policy losses
-----------------------
All share the clipped surrogate  -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)  and differ in
rho, built from the log-ratio  log pi_new - log pi_old + log w_t:
  grpo     w_t = 1;
  pr_grpo  w_t = exp(-lambda * Gamma_t) on tokens of negative-advantage responses, else 1
           (lambda = stage3.drift_penalty);
  rspo     w_t = max(exp(-lambda * Gamma_t), rspo_min_weight) on every token. RSPO's
           published form rescales the importance ratio by a stop-gradient router-shift
           weight with a lower floor *before* clipping, and so do we (it then also moves the
           clip decision, unlike a weight on the loss). Its shift measure is the mean
           |delta log-score| of the old top-K experts; we use the same Gamma as PR-GRPO so the
           comparison isolates where the damping applies;
  gspo     the ratio is per response: exp(masked mean of the token log-ratios), clipped with
           `seq_clip_low` / `seq_clip_high`, and the loss is the mean over responses of each response's token
           mean (seq-mean-token-mean, GSPO's definition) whatever `stage3.loss_agg` says.
           `ratio_level: sequence` uses the same ratio for grpo/pr_grpo/rspo (the geometric
           mean of their damped token ratios), aggregated by `loss_agg`.
With `stage3.tis_cap` > 0 every policy's per-token surrogate is further weighted by
min(pi_old / pi_rollout, tis_cap), pi_rollout the rollout engine's probability of the token
(truncated importance sampling against the training-inference mismatch).
Gamma and w carry no gradient. Note that Gamma is zero when the policy being trained is the
one that sampled (one update per rollout batch): the damping acts from the second update
on a batch, or when "old" is an earlier step's router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from padd_ds.config import Stage2Config, Stage3Config
from padd_ds.teacher.sparse import SparseLogits

# exp(20) = 4.9e8: a larger ratio means old_logp came from another policy; bounding the
# log-ratio keeps the surrogate and its gradient finite (the token is clipped anyway for A > 0).
_MAX_LOG_RATIO = 20.0


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0; x is kept below -1e-7 so a full head leaves a tiny tail."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision inputs (the log-softmax needs it); float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------
# Stage II: advantage-coupled KD temperature
# --------------------------------------------------------------------------------------


def effective_temperature(advantages: torch.Tensor, cfg: Stage2Config) -> torch.Tensor:
    """Per-response KD temperature [B] from advantages [B] (no gradient).

    Phi(A) = max(1 + tanh(kappa * A), floor) with kappa = advantage_scale, floor =
    coupling_floor; with tau = base_temperature, as_intended: tau / Phi (good paths sharper),
    as_written: tau * Phi (the notes' formula), fixed: tau.
    """
    a = advantages.detach()
    a = a.to(torch.float64) if a.dtype == torch.float64 else a.float()
    if cfg.temperature_coupling == "fixed":
        return torch.full_like(a, cfg.base_temperature)
    phi = (1.0 + torch.tanh(cfg.advantage_scale * a)).clamp(min=cfg.coupling_floor)
    if cfg.temperature_coupling == "as_intended":
        return cfg.base_temperature / phi
    if cfg.temperature_coupling == "as_written":
        return cfg.base_temperature * phi
    raise ValueError(f"stage2.temperature_coupling={cfg.temperature_coupling!r}; choose as_intended, as_written or fixed")


def _temperature_column(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Temperature as [B, L, 1] (or a scalar) broadcasting against [B, L, k] tensors."""
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device).detach()
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise ValueError("KD temperature must be finite and > 0; check stage2.base_temperature and stage2.coupling_floor")
    B, L = like.shape[:2]
    if t.dim() == 0:
        return t
    if t.shape == (B,):
        return t.reshape(B, 1, 1)
    if t.shape == (B, L):
        return t.unsqueeze(-1)
    raise ValueError(f"temperature must be a float, [B]={B} or [B, L]=[{B}, {L}], got shape {tuple(t.shape)}")


def _head_tempered(kept: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """Log-probs over k kept tokens + tail, tempered within the head, tail mass unchanged."""
    head = torch.logsumexp(kept, dim=-1, keepdim=True)          # log(1 - tail mass)
    return torch.cat([head + F.log_softmax(kept / temp, dim=-1), _log1mexp(head)], dim=-1)


def tempered_kd_loss(student_logits: torch.Tensor, teacher: SparseLogits, mask: torch.Tensor,
                     temperature: float | torch.Tensor, *, temper_student: bool = False,
                     denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL(p*_T || q_S) on sparse teacher targets, summed over `mask` / `denom`.

    student_logits [B, L, V]; teacher: top-k or sampled `SparseLogits` for the same [B, L]
    positions; mask [B, L] selects the distilled positions; temperature is a float, a [B]
    (per response) or [B, L] tensor. The approximation for T != 1 is in the module doc.
    `temper_student=True`: the student is tempered the same way and the KL is scaled by T^2.
    """
    if student_logits.shape[:2] != teacher.values.shape[:2] or mask.shape != student_logits.shape[:2]:
        raise ValueError(f"student logits {tuple(student_logits.shape)}, teacher {tuple(teacher.values.shape)} and "
                         f"mask {tuple(mask.shape)} must share [B, L]")
    z = _compute_dtype(student_logits)
    temp = _temperature_column(temperature, z)
    logq_full = F.log_softmax(z / temp if (temper_student and teacher.weights is not None) else z, dim=-1)
    kept_q = torch.gather(logq_full, -1, teacher.indices.long())
    kept_p = teacher.values.to(z.dtype) - teacher.lse.to(z.dtype).unsqueeze(-1)   # exact log p_i at T = 1
    if teacher.weights is None:
        logp = _head_tempered(kept_p, temp)
        if temper_student:
            logq = _head_tempered(kept_q, temp)
        else:
            logq = torch.cat([kept_q, _log1mexp(torch.logsumexp(kept_q, dim=-1, keepdim=True))], dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:
        kl = _sampled_tempered_kl(kept_p, kept_q, teacher.weights.to(z.dtype), temp)
    if temper_student:
        kl = kl * (temp.squeeze(-1) if temp.dim() else temp) ** 2
    m = mask.bool()
    total = torch.where(m, kl, torch.zeros_like(kl)).sum()
    return total / (m.sum().clamp(min=1).to(kl.dtype) if denom is None else denom)


def _sampled_tempered_kl(logp: torch.Tensor, logq: torch.Tensor, w: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """sum_i w*_i (log p*_i - log q_i) over the distinct draws, w*_i ∝ w_i p_i^(1/T - 1).

    sum_i w_i p_i^(1/T - 1) is an unbiased estimate of Z_T = sum_j p_j^(1/T), the normaliser
    of p* = p^(1/T) / Z_T; at T = 1 this is exactly the unbiased estimator of `teacher.sparse`.
    """
    used = w > 0
    log_raw = torch.where(used, torch.log(w.clamp(min=1e-38)) + logp * (1.0 / temp - 1.0),
                          torch.full_like(logp, -math.inf))
    log_z = torch.logsumexp(log_raw, dim=-1, keepdim=True)
    w_star = torch.exp(log_raw - log_z)
    term = w_star * (logp / temp - log_z - logq)
    return torch.where(used, term, torch.zeros_like(term)).sum(-1)


def adaptive_kd_loss(student_logits: torch.Tensor, teacher: SparseLogits, mask: torch.Tensor,
                     advantages: torch.Tensor, cfg: Stage2Config,
                     denom: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage II: KD with each response's temperature coupled to its advantage [B].

    Returns the unweighted KD loss (the trainer multiplies by stage2.kd_weight) and detached
    stats: the temperatures' mean, min and max.
    """
    if advantages.shape != student_logits.shape[:1]:
        raise ValueError(f"advantages must be [B]={student_logits.shape[0]} (one per response), "
                         f"got shape {tuple(advantages.shape)}")
    temp = effective_temperature(advantages, cfg)
    loss = tempered_kd_loss(student_logits, teacher, mask, temp, temper_student=cfg.temper_student, denom=denom)
    return loss, {"kd": loss.detach(), "kd_temperature_mean": temp.mean(), "kd_temperature_min": temp.min(),
                  "kd_temperature_max": temp.max()}


# --------------------------------------------------------------------------------------
# Stage III: router drift and the policy losses
# --------------------------------------------------------------------------------------


@torch.no_grad()
def router_drift(p_new: torch.Tensor, p_old: torch.Tensor) -> torch.Tensor:
    """Gamma: L2 distance of router probability vectors, averaged over MoE layers (no gradient).

    p_new, p_old: [L, ..., E] (MoE layers first, experts last; e.g. [L, T, E] -> Gamma [T],
    [L, B, T, E] -> [B, T]), softmax probabilities over all routed experts before top-k.
    Each distance is in [0, sqrt(2)].
    """
    if p_new.shape != p_old.shape or p_new.dim() < 2:
        raise ValueError(f"router probabilities must be [L, ..., E] of one shape, got {tuple(p_new.shape)} and "
                         f"{tuple(p_old.shape)}")
    a, b = _compute_dtype(p_new), _compute_dtype(p_old)
    return torch.linalg.vector_norm(a - b, dim=-1).mean(dim=0)


def _token_mean(masked: torch.Tensor, m: torch.Tensor, denom: float | torch.Tensor | None) -> torch.Tensor:
    """Sum over masked tokens / denom (default: the local token count)."""
    return masked.sum() / (m.sum().clamp(min=1).to(masked.dtype) if denom is None else denom)


def _seq_mean(masked: torch.Tensor, m: torch.Tensor, denom: float | torch.Tensor | None) -> torch.Tensor:
    """Each response's masked token mean, summed / denom (default: responses with >= 1 token);
    veRL's seq-mean-token-mean."""
    n = m.sum(dim=1)
    per_seq = masked.sum(dim=1) / n.clamp(min=1).to(masked.dtype)
    return per_seq.sum() / ((n > 0).sum().clamp(min=1).to(masked.dtype) if denom is None else denom)


AGGREGATIONS = {"token_mean": _token_mean, "seq_mean": _seq_mean}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str,
              denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """per_token [B, T] reduced over `mask` by AGGREGATIONS[how]; `denom` counts tokens
    (token_mean) or responses (seq_mean), see `aggregation_units`."""
    if how not in AGGREGATIONS:
        raise ValueError(f"stage3.loss_agg={how!r}; choose token_mean or seq_mean")
    m = mask.bool()
    return AGGREGATIONS[how](torch.where(m, per_token, torch.zeros_like(per_token)), m, denom)


def aggregation_units(mask: torch.Tensor, how: str) -> int:
    """What `aggregate(.., how)` divides by without a denom: response tokens or responses with
    at least one token. A data-parallel caller sums it over ranks for the global denom."""
    m = mask.bool()
    return int(m.sum()) if how == "token_mean" else int((m.sum(dim=1) > 0).sum())


# The aggregation each policy's objective is defined with; None: stage3.loss_agg. GSPO's
# objective is a mean over responses of per-response means, so gspo ignores loss_agg (as
# veRL's core_algos does) rather than refusing the default token_mean.
_POLICY_AGGREGATION = {"grpo": None, "pr_grpo": None, "rspo": None, "gspo": "seq_mean"}


def policy_aggregation(cfg: Stage3Config) -> str:
    """The aggregation `policy_loss` applies under `cfg`: token_mean or seq_mean."""
    return _POLICY_AGGREGATION.get(cfg.policy) or cfg.loss_agg


@dataclass
class PolicyInputs:
    """The Stage III loss's per-token inputs: one row per response, [B, T] unless noted."""

    new_logp: torch.Tensor  # log pi_theta of the sampled tokens (with gradient)
    old_logp: torch.Tensor  # the same under the policy that sampled (no gradient)
    advantages: torch.Tensor  # [B], one per response
    mask: torch.Tensor  # the response tokens
    drift: torch.Tensor | None = None  # router drift Gamma (`router_drift`); pr_grpo and rspo need it
    rollout_logp: torch.Tensor | None = None  # log pi of the sampled tokens under the rollout engine (truncated IS)


# log w_t of each policy (see the module doc) from Gamma [B, T] and the advantages [B, 1];
# None: w_t = 1 and no drift needed. A new variant is a new entry.
def _pr_grpo_log_weight(g: torch.Tensor, adv: torch.Tensor, cfg: Stage3Config) -> torch.Tensor:
    return torch.where(adv < 0, -cfg.drift_penalty * g, torch.zeros_like(g))


def _rspo_log_weight(g: torch.Tensor, adv: torch.Tensor, cfg: Stage3Config) -> torch.Tensor:
    floor = math.log(cfg.rspo_min_weight) if cfg.rspo_min_weight > 0 else -math.inf
    return (-cfg.drift_penalty * g).clamp(min=floor)


_LOG_WEIGHT = {"grpo": None, "pr_grpo": _pr_grpo_log_weight, "rspo": _rspo_log_weight, "gspo": None}


def _check_policy_inputs(x: PolicyInputs, cfg: Stage3Config) -> None:
    B, T = x.new_logp.shape
    for name, t, shape in (("old_logp", x.old_logp, (B, T)), ("mask", x.mask, (B, T)),
                           ("advantages", x.advantages, (B,))):
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {list(shape)} to match new_logp, got {tuple(t.shape)}")
    if cfg.policy not in _LOG_WEIGHT:
        raise ValueError(f"stage3.policy={cfg.policy!r}; choose pr_grpo, grpo, rspo or gspo")


def _damping_log_weights(x: PolicyInputs, adv: torch.Tensor, cfg: Stage3Config) -> torch.Tensor:
    """log w_t [B, T] of `cfg.policy` (no gradient)."""
    weight = _LOG_WEIGHT[cfg.policy]
    if weight is None:
        return torch.zeros_like(x.new_logp)
    B, T = x.new_logp.shape
    if x.drift is None or x.drift.shape != (B, T):
        got = "nothing" if x.drift is None else f"shape {tuple(x.drift.shape)}"
        raise ValueError(f"stage3.policy={cfg.policy} needs drift=Gamma [{B}, {T}] (router_drift of the new and old "
                         f"router probabilities), got {got}")
    return weight(x.drift.detach().to(x.new_logp.dtype), adv, cfg)


def reference_kl(new_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, how: str = "token_mean",
                 denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """k3 = exp(r) - r - 1, r = ref - new: an unbiased non-negative estimate of
    KL(pi_theta || pi_ref) per token [B, T], aggregated by `how` over `mask`. Not part of
    `policy_loss`: the trainer builds no reference model (config.py refuses stage3.ref_kl > 0)."""
    m = mask.bool()
    r = torch.where(m, ref_logp.detach().to(new_logp.dtype) - new_logp, torch.zeros_like(new_logp))
    return aggregate(torch.exp(r) - r - 1.0, m, how, denom)


def policy_loss(x: PolicyInputs, cfg: Stage3Config,
                denom: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage III clipped-surrogate loss of `cfg.policy` (grpo | pr_grpo | rspo | gspo) on `x`,
    aggregated by `policy_aggregation(cfg)` over `denom` (its units: `aggregation_units`).

    Returns (loss, stats) with detached scalars: pg_loss, clip_frac (masked tokens whose
    clipped branch is active, i.e. with zero gradient), ratio_mean (of the rho used),
    damp_mean (mean w_t).
    """
    _check_policy_inputs(x, cfg)
    new_logp, m = x.new_logp, x.mask.bool()
    B, T = new_logp.shape
    dtype = new_logp.dtype
    adv = x.advantages.detach().to(dtype).unsqueeze(1)                    # [B, 1]
    log_w = _damping_log_weights(x, adv, cfg)
    log_ratio = torch.where(m, new_logp - x.old_logp.detach().to(dtype) + log_w, torch.zeros_like(new_logp))

    if cfg.policy == "gspo" or cfg.ratio_level == "sequence":
        n = m.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)
        log_ratio = (log_ratio.sum(dim=1, keepdim=True) / n).expand(B, T)
        low, high = cfg.seq_clip_low, cfg.seq_clip_high
    else:
        low = high = cfg.clip_eps
    ratio = torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO))
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - low, 1.0 + high) * adv)
    tis = _truncated_is_weights(x, cfg)
    if tis is not None:
        surrogate = surrogate * tis
    loss = aggregate(-surrogate, m, policy_aggregation(cfg), denom)

    with torch.no_grad():
        n_tok = m.sum().clamp(min=1).to(dtype)
        clipped = ((adv > 0) & (ratio > 1.0 + high)) | ((adv < 0) & (ratio < 1.0 - low))
        stats = {
            "pg_loss": loss.detach(),
            "clip_frac": (clipped & m).sum().to(dtype) / n_tok,
            "ratio_mean": torch.where(m, ratio, torch.zeros_like(ratio)).sum() / n_tok,
            "damp_mean": torch.where(m, log_w.exp(), torch.zeros_like(log_w)).sum() / n_tok,
        }
        if tis is not None:
            stats["tis_mean"] = torch.where(m, tis, torch.zeros_like(tis)).sum() / n_tok
    return loss, stats


def _truncated_is_weights(x: PolicyInputs, cfg: Stage3Config) -> torch.Tensor | None:
    """min(pi_old / pi_rollout, stage3.tis_cap) per token [B, T] (no gradient), or None when off.

    The rollout engine (a gathered copy, another kernel, vLLM) samples from a policy a little
    different from the trainer's pi_old; weighting each token's surrogate by the capped ratio
    corrects that mismatch without the variance of an uncapped one (truncated IS)."""
    if cfg.tis_cap <= 0:
        return None
    if x.rollout_logp is None or x.rollout_logp.shape != x.new_logp.shape:
        got = "nothing" if x.rollout_logp is None else f"shape {tuple(x.rollout_logp.shape)}"
        raise ValueError(f"stage3.tis_cap={cfg.tis_cap} needs rollout_logp {list(x.new_logp.shape)} (the rollout "
                         f"engine's log-probs of the sampled tokens), got {got}")
    dtype = x.new_logp.dtype
    log_w = (x.old_logp.detach().to(dtype) - x.rollout_logp.detach().to(dtype)).clamp(max=_MAX_LOG_RATIO)
    return torch.exp(log_w).clamp(max=cfg.tis_cap)
