"""The optimiser step(s) of Stages II-IV on a rollout batch of scored rollouts
(`stage3.updates_per_batch`, 1 by default: strictly on-policy).

    res = update_on_rollouts(engine, rollout_batch, prev_routers, cfg, teacher_logits=fetch)

Each update is one optimiser step over the whole rollout batch, accumulated over its
micro-batches of `train.micro_batch_size` sequences. Per micro-batch: forward (routes and
router inputs recorded) -> router drift against the previous step's routers -> Stage III
policy loss -> Stage II advantage-tempered KD (the teacher's answer for that micro-batch is
only fetched here, after its first forward, so its scoring overlaps with the work before) ->
optional auxiliary balance loss -> backward (the engine steps after the last micro-batch).
The losses are divided by denominators of the whole rollout batch over all ranks, so the
accumulated gradient equals one pass over the whole batch. Then this rank's Stage IV
statistics of the first update (expert loads and per-expert advantage sums, to be
all-reduced by the caller). The trainer and bench/step_overhead.py run exactly this function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import deepspeed.comm as dist
import torch

from padd_ds.config import PaddConfig, Stage3Config
from padd_ds.data.batch import TokenBatch, micro_batches
from padd_ds.launch.comm import all_sum
from padd_ds.launch.device import rank_device
from padd_ds.models.router import replayed_routes, routers, routing_trace
from padd_ds.rl.balance import switch_aux_loss
from padd_ds.rl.losses import (PolicyInputs, adaptive_kd_loss, aggregation_units, policy_aggregation, policy_loss,
                               router_drift)
from padd_ds.rl.rollout import RolloutBatch, token_logprobs
from padd_ds.rl.routes import replay_routes, route_agreement


@dataclass
class StepResult:
    counts: torch.Tensor         # [L, N] top-k assignments of real tokens on this rank
    adv_sum: torch.Tensor        # [L, N] sum of the advantages of response tokens routed to each expert
    adv_count: torch.Tensor      # [L, N] how many response-token assignments that sum covers
    drift: torch.Tensor          # [response tokens] router drift Gamma
    stats: dict[str, float] = field(default_factory=dict)  # sums, for exact global means
    # The sampler against the trainer under the sampling policy (first update), this rank's
    # response tokens: |log pi_trainer - log pi_rollout| sum and max, (token, layer) routes
    # agreeing and compared; keys only for what the rollouts carry
    mismatch: dict[str, float] = field(default_factory=dict)


def policy_config(s3: Stage3Config) -> Stage3Config:
    """The policy loss actually run: stage3.enabled=false ablates PR-GRPO to plain GRPO."""
    return s3 if s3.enabled else dataclasses.replace(s3, policy="grpo")


def update_on_rollouts(engine, rb: RolloutBatch, prev_routers: list[torch.Tensor], cfg: PaddConfig,
                       teacher_logits: Callable[[int], object] | None = None, guard=None, step: int = 0) -> StepResult:
    """`stage3.updates_per_batch` optimiser steps on the rollout batch `rb`, each accumulated over
    its micro-batches of `train.micro_batch_size` sequences (the engine's accumulation steps).
    `teacher_logits(i)`: the teacher's targets for micro-batch i, asked for once, after its first forward."""
    pcfg = policy_config(cfg.stage3)
    engine.train()  # a loaded model is in eval mode, where activation checkpointing does nothing
    mbs = cfg.train.micro_batch_size
    parts, advs = micro_batches(rb.rollouts.batch, mbs), rb.advantages.split(mbs)
    _check_accumulation(engine, len(parts), rb.rollouts.batch.ids.shape[0], mbs)
    denom, kd_denom = _normalisers(rb.rollouts.batch, pcfg)
    n_updates = pcfg.updates_per_batch
    # The sampling policy's log-probs: every update's ratio is against them (one update: the current policy).
    measure = cfg.stage3.measure_movement
    temperature = cfg.rollout.temperature  # the policy is the one the rollouts sample
    old = _sampling_logprobs(engine, parts, temperature) if n_updates > 1 or measure else [None] * len(parts)
    rollout_logp = _rows_like(rb.rollouts.logprobs, parts, mbs)
    rollout_routes = _rows_like(rb.rollouts.routes, parts, mbs)
    targets: list = [None] * len(parts)

    def target(i: int):
        if targets[i] is None:  # fetched once, after the micro-batch's first forward
            targets[i] = teacher_logits(i)
        return targets[i]

    stats, sampled, mismatch = {}, [], {}
    for update in range(n_updates):
        for i, (mb, adv) in enumerate(zip(parts, advs)):
            m = _MicroBatch(mb, adv, old[i] if n_updates > 1 else None, denom, kd_denom, len(parts), rollout_logp[i],
                            rollout_routes[i])
            part, sel, drift = _micro_update(engine, m, prev_routers, cfg,
                                             None if teacher_logits is None else lambda: target(i), guard, step)
            found = {k: part.pop(k) for k in _MISMATCH if k in part}
            for key, value in part.items():  # the batch's statistics: the mean over its updates
                stats[key] = stats.get(key, 0.0) + value / n_updates
            if update == 0:  # Stage IV counts, the drift log, the mismatch: the sampling policy's
                sampled.append(_expert_stats(mb, adv, sel, drift, routers(engine.module)[0].num_experts))
                for key, value in found.items():
                    mismatch[key] = max(mismatch.get(key, 0.0), value) if key.endswith("_max") else \
                        mismatch.get(key, 0.0) + value
    if measure:
        stats.update(_movement(engine, parts, old, temperature))
    return StepResult(sum(r.counts for r in sampled), sum(r.adv_sum for r in sampled),
                      sum(r.adv_count for r in sampled), torch.cat([r.drift for r in sampled]), stats, mismatch)


@torch.no_grad()
def _movement(engine, parts: list[TokenBatch], old: list[torch.Tensor], temperature: float) -> dict[str, float]:
    """Sum over response tokens of |log pi_new - log pi_old| after the step's updates, and the tokens."""
    new = _sampling_logprobs(engine, parts, temperature)
    move = sum(float(((n - o).abs() * p.loss_mask.to(n.device)).sum()) for n, o, p in zip(new, old, parts))
    return {"move_sum": move, "move_tokens": float(sum(int(p.loss_mask.sum()) for p in parts))}


# The sampler-trainer mismatch of the first update (StepResult.mismatch): sums, and one maximum.
_MISMATCH = ("logp_diff_sum", "logp_diff_max", "route_agree", "route_pairs")


def _rows_like(t: torch.Tensor | None, parts: list[TokenBatch], mbs: int) -> list[torch.Tensor | None]:
    """A per-row rollout tensor [rows, L, ...] cut like `parts` (each micro-batch to its own length)."""
    if t is None:
        return [None] * len(parts)
    return [t[i * mbs:(i + 1) * mbs, :p.ids.shape[1]] for i, p in enumerate(parts)]


def _check_accumulation(engine, n_parts: int, rows: int, mbs: int) -> None:
    """Each update must be exactly one optimiser step of the engine: as many micro-batches as
    it accumulates, starting on an accumulation boundary."""
    gas = engine.gradient_accumulation_steps()
    if n_parts != gas:
        raise ValueError(f"a rollout batch of {rows} sequences is {n_parts} micro-batches of {mbs}, but the engine "
                         f"accumulates {gas} per optimiser step")
    if engine.micro_steps % gas:
        raise RuntimeError(f"the engine is {engine.micro_steps % gas} micro-batches into an optimiser step of {gas}; "
                           "whatever ran before left it off an accumulation boundary")


@dataclass
class _MicroBatch:
    batch: TokenBatch
    adv: torch.Tensor                # [b] advantages of its rows
    old_logp: torch.Tensor | None    # the sampling policy's log-probs (None: the current policy's)
    denom: float                     # policy-loss units of the whole step over all ranks, per rank
    kd_denom: float                  # response tokens of the whole step over all ranks, per rank
    n_micro: int                     # micro-batches in the step
    rollout_logp: torch.Tensor | None = None  # the rollout engine's log-probs of the sampled tokens
    routes: torch.Tensor | None = None  # [b, S, layers, k] the rollout engine's experts per token


def _normalisers(batch: TokenBatch, pcfg: Stage3Config) -> tuple[float, float]:
    """Global denominators over the whole rollout batch of every rank: every token (or, for a
    per-response mean, response) weighs the same whichever micro-batch and rank holds it. Each
    micro-batch's loss is its sum over them, so the accumulated gradient is the step's mean;
    DeepSpeed averages the ranks' gradients, hence the division by the number of ranks."""
    num_students = dist.get_world_size()
    units = aggregation_units(batch.loss_mask, policy_aggregation(pcfg))
    n_resp_tokens, n_units = all_sum([float(batch.loss_mask.sum()), float(units)])
    return n_units / num_students, n_resp_tokens / num_students


@torch.no_grad()
def _sampling_logprobs(engine, parts: list[TokenBatch], temperature: float) -> list[torch.Tensor]:
    out = []
    for host in parts:
        mb = host.to(rank_device())
        out.append(token_logprobs(engine(input_ids=mb.ids, attention_mask=mb.attention_mask).logits, mb, temperature))
    return out


def _micro_update(engine, m: _MicroBatch, prev_routers: list[torch.Tensor], cfg: PaddConfig,
                  target: Callable[[], object] | None, guard, step: int) -> tuple[dict, list[torch.Tensor], torch.Tensor]:
    """Forward, losses and backward of one micro-batch (the engine steps at the last one).
    Returns its statistics (sums), the selected experts per layer and the drift [b, S]."""
    pcfg = policy_config(cfg.stage3)
    batch, adv = m.batch.to(rank_device()), m.adv.to(rank_device())  # what the engine and the losses see
    replay = replay_routes(m.routes, batch.ids.shape[1], batch.ids.device) \
        if m.routes is not None and cfg.rollout.route_replay else None
    if cfg.rollout.route_replay and m.routes is None:
        raise ValueError("rollout.route_replay: the rollouts carry no routes (the rollout model's routers are "
                         "not recognised); turn rollout.route_replay off")
    # The replay spans the backward too: an activation-checkpoint recompute must route the same.
    with routing_trace(engine.module, inputs=True) as trace, replayed_routes(engine.module, replay):
        logits = engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
        new_logp = token_logprobs(logits, batch, cfg.rollout.temperature)
        drift = _drift(trace, prev_routers).view(batch.ids.shape)                      # [b, S]
        old_logp = new_logp.detach() if m.old_logp is None else m.old_logp
        rollout_logp = None if m.rollout_logp is None else m.rollout_logp.to(batch.ids.device)
        loss, pstats = policy_loss(PolicyInputs(new_logp, old_logp, adv, batch.loss_mask, drift=drift,
                                                rollout_logp=rollout_logp), pcfg, denom=m.denom)
        part = {"policy_loss": float(pstats["pg_loss"]) * m.denom,
                "policy_units": aggregation_units(m.batch.loss_mask, policy_aggregation(pcfg)),
                "clip_frac": float(pstats["clip_frac"]) * float(m.batch.loss_mask.sum())}
        if "tis_mean" in pstats:
            part["tis_weight"] = float(pstats["tis_mean"]) * float(m.batch.loss_mask.sum())
        if rollout_logp is not None:  # how far the trainer's log-probs are from the sampler's
            diff = (new_logp.detach() - rollout_logp).abs()[batch.loss_mask]
            part["logp_diff_sum"] = float(diff.sum())
            part["logp_diff_max"] = float(diff.max()) if diff.numel() else 0.0
        if m.routes is not None:  # and its routes: the trainer's own top-k, replayed or not
            part["route_agree"], part["route_pairs"] = route_agreement(trace.own(), m.routes, batch.loss_mask)
        if target is not None:
            # Fetched once per micro-batch, after its first forward; it arrives on the host.
            kd, kstats = adaptive_kd_loss(logits, target().to(batch.ids.device), batch.loss_mask, adv, cfg.stage2,
                                          denom=m.kd_denom)
            loss = loss + cfg.stage2.kd_weight * kd
            part["kd_loss"] = kd.item() * m.kd_denom
            part["kd_temperature"] = float(kstats["kd_temperature_mean"]) * batch.ids.shape[0]
        cur = trace.selected()
        if cfg.stage4.aux_loss_coeff > 0:  # a balance loss is no sum over sequences: the mean over micro-batches
            loss = loss + cfg.stage4.aux_loss_coeff * _aux_loss(trace, cur, batch) / m.n_micro
        # The loss is already over the whole step's denominators: DeepSpeed must not divide by
        # the accumulation steps again (scale_wrt_gas=False).
        if guard is None:
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
        else:  # engine/guard.py: a non-finite loss on any rank skips this step on all of them
            guard.backward_step(engine, loss, step, scale_wrt_gas=False)
    # Stage IV statistics on the host, where the caller all-reduces and logs them.
    return part, [s.cpu() for s in cur], drift.cpu()


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
                  n_experts: int) -> StepResult:
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
    return StepResult(counts, adv_sum, adv_cnt, gamma.reshape(-1)[resp])
