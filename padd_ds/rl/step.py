"""The optimiser step(s) of Stages II-IV on a batch of scored rollouts
(`stage3.updates_per_batch`, 1 by default: strictly on-policy).

    res = update_on_rollouts(engine, batch, adv, prev_routers, cfg, policy_cfg, num_students,
                             teacher_logits=lambda: teacher.result(rid).logits)

Forward (routes and router inputs recorded) -> router drift against the previous step's
routers -> Stage III policy loss -> Stage II advantage-tempered KD (the teacher's answer is
only fetched here, after the forward, so its scoring overlaps with it) -> optional auxiliary
balance loss -> backward and step -> this rank's Stage IV statistics (expert loads and
per-expert advantage sums, to be all-reduced by the caller). The trainer and
bench/step_overhead.py run exactly this function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from padd_ds.config import PaddConfig, Stage3Config
from padd_ds.data.batch import TokenBatch
from padd_ds.models.router import (keep_router_inputs, router_inputs, router_scores, router_selected, routers,
                                   set_routing)
from padd_ds.rl.balance import switch_aux_loss
from padd_ds.rl.losses import PolicyInputs, adaptive_kd_loss, policy_loss, router_drift
from padd_ds.rl.rollout import token_logprobs


@dataclass
class StepResult:
    counts: torch.Tensor         # [L, N] top-k assignments of real tokens on this rank
    adv_sum: torch.Tensor        # [L, N] sum of the advantages of response tokens routed to each expert
    adv_count: torch.Tensor      # [L, N] how many response-token assignments that sum covers
    drift: torch.Tensor          # [response tokens] router drift Gamma
    stats: dict[str, float] = field(default_factory=dict)  # sums, for exact global means


def _all_sum(values: list[float]) -> list[float]:
    from padd_ds.launch.comm import all_sum

    return all_sum(values)


def update_on_rollouts(engine, batch: TokenBatch, adv: torch.Tensor, prev_routers: list[torch.Tensor],
                       cfg: PaddConfig, policy_cfg: Stage3Config, num_students: int,
                       teacher_logits: Callable[[], object] | None = None, guard=None, step: int = 0) -> StepResult:
    s2, s4 = cfg.stage2, cfg.stage4
    mod = engine.module
    n_experts = routers(mod)[0].num_experts
    # Global normalisers: every rank's tokens (or responses) weigh the same.
    n_resp_tokens, = _all_sum([float(batch.loss_mask.sum())])
    denom = (n_resp_tokens if policy_cfg.loss_agg == "token_mean" else batch.ids.shape[0] * num_students) / num_students
    kd_denom = n_resp_tokens / num_students

    n_updates = policy_cfg.updates_per_batch
    old_logp = None
    if n_updates > 1:  # the sampling policy's log-probs: every update's ratio is against them
        with torch.no_grad():
            old_logp = token_logprobs(engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits, batch)
    target = None
    stats: dict[str, float] = {}
    for update in range(n_updates):
        set_routing(mod, "learned", record=True)
        keep_router_inputs(mod, True)
        logits = engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
        new_logp = token_logprobs(logits, batch)
        valid = batch.attention_mask.bool().reshape(-1)
        scores = router_scores(mod)
        with torch.no_grad():
            p_new = torch.stack([p.detach().float() for p in scores])                        # [L, T, N]
            p_old = torch.stack([torch.softmax(x.float() @ w.T, dim=-1)
                                 for x, w in zip(router_inputs(mod), prev_routers)])
            drift = router_drift(p_new, p_old).view(batch.ids.shape)                         # [B, S]
        # With one update the sampling policy is the current one (ratio 1 at the update).
        loss, pstats = policy_loss(PolicyInputs(new_logp, new_logp.detach() if old_logp is None else old_logp, adv,
                                                batch.loss_mask, drift=drift), policy_cfg, denom=denom)
        part = {"policy_loss": float(pstats["pg_loss"]) * denom,
                "clip_frac": float(pstats["clip_frac"]) * float(batch.loss_mask.sum())}
        if teacher_logits is not None:
            target = teacher_logits() if target is None else target  # fetched once, after the first forward
            kd, kstats = adaptive_kd_loss(logits, target, batch.loss_mask, adv, s2, denom=kd_denom)
            loss = loss + s2.kd_weight * kd
            part["kd_loss"] = kd.item() * kd_denom
            part["kd_temperature"] = float(kstats["kd_temperature_mean"]) * batch.ids.shape[0]
        cur = router_selected(mod)
        if s4.aux_loss_coeff > 0:
            local = torch.stack([torch.bincount(x[valid].flatten(), minlength=n_experts) for x in cur]).float()
            loss = loss + s4.aux_loss_coeff * switch_aux_loss(torch.stack(scores), local, valid)
        if guard is None:
            engine.backward(loss)
            engine.step()
        else:  # engine/guard.py: a non-finite loss on any rank skips this step on all of them
            guard.backward_step(engine, loss, step)
        keep_router_inputs(mod, False)
        set_routing(mod, "learned", record=False)
        for key, value in part.items():  # the batch's statistics: the mean over its updates
            stats[key] = stats.get(key, 0.0) + value / n_updates
        if update == 0:  # Stage IV counts and the drift log: the routes of the sampling policy
            sel, gamma = cur, drift

    # Stage IV statistics: every top-k assignment of a real token; advantages of response tokens.
    resp_tok = torch.zeros_like(batch.loss_mask)
    resp_tok[:, 1:] = batch.loss_mask[:, :-1]               # the token at t is a response token
    resp = resp_tok.reshape(-1)
    tok_adv = adv.view(-1, 1).expand_as(batch.loss_mask).reshape(-1)
    L = len(sel)
    counts, adv_sum, adv_cnt = (torch.zeros(L, n_experts, dtype=torch.float64) for _ in range(3))
    for l, x in enumerate(sel):
        k = x.shape[1]
        counts[l] = torch.bincount(x[valid].flatten(), minlength=n_experts).double()
        adv_sum[l] = torch.bincount(x[resp].flatten(), weights=tok_adv[resp].repeat_interleave(k).double(),
                                    minlength=n_experts)
        adv_cnt[l] = torch.bincount(x[resp].flatten(), minlength=n_experts).double()
    return StepResult(counts, adv_sum, adv_cnt, gamma.reshape(-1)[resp], stats)
