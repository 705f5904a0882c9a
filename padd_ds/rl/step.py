"""The optimiser step(s) of Stages II-IV on a batch of scored rollouts
(`stage3.updates_per_batch`, 1 by default: strictly on-policy).

    res = update_on_rollouts(engine, rollout_batch, prev_routers, cfg, teacher_logits=fetch)

Forward (routes and router inputs recorded) -> router drift against the previous step's
routers -> Stage III policy loss -> Stage II advantage-tempered KD (the teacher's answer is
only fetched here, after the forward, so its scoring overlaps with it) -> optional auxiliary
balance loss -> backward and step -> this rank's Stage IV statistics (expert loads and
per-expert advantage sums, to be all-reduced by the caller). The trainer and
bench/step_overhead.py run exactly this function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import deepspeed.comm as dist
import torch

from padd_ds.config import PaddConfig, Stage3Config
from padd_ds.data.batch import TokenBatch
from padd_ds.launch.comm import all_sum
from padd_ds.launch.device import rank_device
from padd_ds.models.router import routers, routing_trace
from padd_ds.rl.balance import switch_aux_loss
from padd_ds.rl.losses import (PolicyInputs, adaptive_kd_loss, aggregation_units, policy_aggregation, policy_loss,
                               router_drift)
from padd_ds.rl.rollout import RolloutBatch, token_logprobs


@dataclass
class StepResult:
    counts: torch.Tensor         # [L, N] top-k assignments of real tokens on this rank
    adv_sum: torch.Tensor        # [L, N] sum of the advantages of response tokens routed to each expert
    adv_count: torch.Tensor      # [L, N] how many response-token assignments that sum covers
    drift: torch.Tensor          # [response tokens] router drift Gamma
    stats: dict[str, float] = field(default_factory=dict)  # sums, for exact global means


def policy_config(s3: Stage3Config) -> Stage3Config:
    """The policy loss actually run: stage3.enabled=false ablates PR-GRPO to plain GRPO."""
    return s3 if s3.enabled else dataclasses.replace(s3, policy="grpo")


def update_on_rollouts(engine, rb: RolloutBatch, prev_routers: list[torch.Tensor], cfg: PaddConfig,
                       teacher_logits: Callable[[], object] | None = None, guard=None, step: int = 0) -> StepResult:
    host, pcfg = rb.rollouts.batch, policy_config(cfg.stage3)
    batch, adv = host.to(rank_device()), rb.advantages.to(rank_device())  # what the engine and the losses see
    num_students = dist.get_world_size()
    # Global normalisers: every rank's tokens (or, for a per-response mean, responses) weigh
    # the same; DeepSpeed averages the ranks' gradients, hence the division by num_students.
    agg = policy_aggregation(pcfg)
    units = aggregation_units(host.loss_mask, agg)
    n_resp_tokens, n_units = all_sum([float(host.loss_mask.sum()), float(units)])
    denom, kd_denom = n_units / num_students, n_resp_tokens / num_students
    n_updates = pcfg.updates_per_batch
    old_logp = None
    if n_updates > 1:  # the sampling policy's log-probs: every update's ratio is against them
        with torch.no_grad():
            old_logp = token_logprobs(engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits, batch)
    target, stats = None, {}
    for update in range(n_updates):
        with routing_trace(engine.module, inputs=True) as trace:
            logits = engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
            new_logp = token_logprobs(logits, batch)
            drift = _drift(trace, prev_routers).view(batch.ids.shape)                      # [B, S]
            # With one update the sampling policy is the current one (ratio 1 at the update).
            loss, pstats = policy_loss(PolicyInputs(new_logp, new_logp.detach() if old_logp is None else old_logp, adv,
                                                    batch.loss_mask, drift=drift), pcfg, denom=denom)
            part = {"policy_loss": float(pstats["pg_loss"]) * denom, "policy_units": units,
                    "clip_frac": float(pstats["clip_frac"]) * float(host.loss_mask.sum())}
            if teacher_logits is not None:
                # Fetched once, after the first forward; it arrives on the host.
                target = teacher_logits().to(batch.ids.device) if target is None else target
                kd, kstats = adaptive_kd_loss(logits, target, batch.loss_mask, adv, cfg.stage2, denom=kd_denom)
                loss = loss + cfg.stage2.kd_weight * kd
                part["kd_loss"] = kd.item() * kd_denom
                part["kd_temperature"] = float(kstats["kd_temperature_mean"]) * batch.ids.shape[0]
            cur = trace.selected()
            if cfg.stage4.aux_loss_coeff > 0:
                loss = loss + cfg.stage4.aux_loss_coeff * _aux_loss(trace, cur, batch)
            if guard is None:
                engine.backward(loss)
                engine.step()
            else:  # engine/guard.py: a non-finite loss on any rank skips this step on all of them
                guard.backward_step(engine, loss, step)
        for key, value in part.items():  # the batch's statistics: the mean over its updates
            stats[key] = stats.get(key, 0.0) + value / n_updates
        if update == 0:  # Stage IV counts and the drift log: the routes of the sampling policy
            sel, gamma = cur, drift
    # Stage IV statistics on the host, where the caller all-reduces and logs them.
    n_experts = routers(engine.module)[0].num_experts
    return _expert_stats(host, rb.advantages, [s.cpu() for s in sel], gamma.cpu(), n_experts, stats)


@torch.no_grad()
def _drift(trace, prev_routers: list[torch.Tensor]) -> torch.Tensor:
    """Gamma per token: how far the current routers moved from the previous step's on the same inputs."""
    p_new = torch.stack([p.detach().float() for p in trace.scores()])                         # [L, T, N]
    # A resumed run's previous routers come from the checkpoint, maybe on the host.
    p_old = torch.stack([torch.softmax(x.float() @ w.to(x.device).T, dim=-1)
                         for x, w in zip(trace.inputs(), prev_routers)])
    return router_drift(p_new, p_old)


def _aux_loss(trace, cur: list[torch.Tensor], batch: TokenBatch) -> torch.Tensor:
    valid = batch.attention_mask.bool().reshape(-1)
    scores = trace.scores()
    n_experts = scores[0].shape[-1]
    local = torch.stack([torch.bincount(x[valid].flatten(), minlength=n_experts) for x in cur]).float()
    return switch_aux_loss(torch.stack(scores), local, valid)


def _expert_stats(batch: TokenBatch, adv: torch.Tensor, sel: list[torch.Tensor], gamma: torch.Tensor,
                  n_experts: int, stats: dict) -> StepResult:
    """Stage IV statistics: every top-k assignment of a real token; advantages of response tokens."""
    valid = batch.attention_mask.bool().reshape(-1)
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
