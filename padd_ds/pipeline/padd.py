"""Stages II-IV on D_C (`train.mode=padd`), one training step at a time:

    rollout batch: this rank's stage3.prompts_per_step / (student ranks) prompts x G responses,
      sampled in one phase (all ranks in step) -> rewards -> group advantages
    -> the teacher scores each micro-batch of train.micro_batch_size rollouts (all requests
       in flight at once, while the student trains on the micro-batches before)
    -> per micro-batch: Stage III policy loss with router drift against the previous step's
       routers + Stage II advantage-tempered KD on the response tokens (+ optional aux balance
       loss) -> backward; one optimiser step over the whole rollout batch (per update)
    -> Stage IV: all-reduced expert loads and advantages -> router bias

Ablations and baselines are config switches of this one loop: stage2.enabled=false (no
teacher: MoE-GRPO), stage2.temperature_coupling=fixed (online KD + GRPO), stage3.enabled=false
(plain GRPO ratio), stage3.policy=rspo|gspo, stage4.enabled=false. With one update per
rollout batch (stage3.updates_per_batch=1) the sampling policy is the current one, so the ratio
pi/pi_old is 1 at the update; the drift term compares against the routers of the previous
step (the method's "previous routers"), which is where routes jump.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from padd_ds.data.batch import micro_batches
from padd_ds.engine.guard import NonFiniteGuard
from padd_ds.engine.meter import Meter, Totals
from padd_ds.eval.heldout import heldout_accuracy
from padd_ds.eval.routing import RoutingLog
from padd_ds.launch.comm import all_reduce_
from padd_ds.models.export import has_bias_slot
from padd_ds.models.router import router_weights, routers, set_bias
from padd_ds.pipeline.records import LoopResult, ResumeState, RunContext
from padd_ds.pipeline.summary import progress_bar
from padd_ds.rl.balance import BiasController, fold_bias_into_routers
from padd_ds.rl.rewards import group_advantages, score, shuffled
from padd_ds.rl.rollout import RolloutBatch, RolloutSampling, rollout_policy, sample_rollouts
from padd_ds.rl.step import StepResult, policy_config, update_on_rollouts
from padd_ds.rl.vllm_policy import VllmPolicy, engine_spec
from padd_ds.teacher.feed import BatchPlan


@dataclass
class ExpertStats:
    """One step's Stage IV statistics, [L, N] each, summed over micro-batches (then over ranks)."""

    counts: torch.Tensor
    adv_sum: torch.Tensor
    adv_count: torch.Tensor

    @classmethod
    def zeros(cls, layers: int, experts: int) -> "ExpertStats":
        return cls(*(torch.zeros(layers, experts, dtype=torch.float64) for _ in range(3)))

    def add(self, res: StepResult) -> None:
        self.counts += res.counts
        self.adv_sum += res.adv_sum
        self.adv_count += res.adv_count

    def all_reduce(self) -> None:
        for t in (self.counts, self.adv_sum, self.adv_count):
            all_reduce_(t)

    def load(self) -> torch.Tensor:
        """f_j per layer: each expert's share of the step's top-k assignments."""
        return (self.counts / self.counts.sum(1, keepdim=True).clamp(min=1)).float()


class PaddLoop:
    def __init__(self, ctx: RunContext, state: ResumeState | None):
        cfg = ctx.cfg
        s2, s3, s4 = cfg.stage2, cfg.stage3, cfg.stage4
        self.ctx, self.cfg, self.engine, self.mod = ctx, cfg, ctx.engine, ctx.engine.module
        self.problems = ctx.parts["C"]
        # Each rank's prompts of a step: its share of stage3.prompts_per_step (validated to split evenly).
        self.plan = BatchPlan(len(self.problems), s3.prompts_per_step // ctx.num_students, ctx.num_students, 1,
                              cfg.run.seed)
        self.L, self.N = len(routers(self.mod)), routers(self.mod)[0].num_experts
        self.controller = BiasController(self.L, self.N, s4)
        self.slotless = s4.enabled and not has_bias_slot(self.mod)  # a slot exports the bias exactly: never fold
        self.settle = s4.settle_steps if self.slotless else 0
        self.policy_cfg = policy_config(s3)
        self.use_teacher = s2.enabled and s2.kd_weight > 0
        self.start, self.history, self.snap_prev = 0, [], None
        if state is not None:
            self.start, self.history, self.snap_prev = state.step, list(state.history), state.router_snapshot
            self.controller.load_state_dict(state.balance)
            set_bias(self.mod, self.controller.bias)
        # Training wall time so far, evaluations excluded (the learning curves' time axis).
        self.train_s = self.history[-1].get("train/elapsed_s", 0.0) if self.history else 0.0
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)  # NaN/inf on any rank: skip the step everywhere
        self.guard.load_state_dict(state and state.nonfinite)
        # Per-layer expert loads over training, for the report's heatmap.
        self.routing_log = RoutingLog(Path(cfg.run.output_dir) / "routing.json") if ctx.world.is_main else None
        self.progress = progress_bar(cfg, ctx.world)
        self.meter = Meter()
        self.vllm = (VllmPolicy(engine_spec(cfg, ctx.num_students, next(self.mod.parameters()).dtype), ctx.rank,
                                ctx.num_students, Path(cfg.run.output_dir)) if cfg.rollout.backend == "vllm" else None)

    def run(self) -> LoopResult:
        try:
            return self._steps()
        finally:
            if self.vllm is not None:
                self.vllm.close()

    def _steps(self) -> LoopResult:
        every = self.cfg.eval.every
        for step in range(self.start, self.cfg.train.steps):
            t0 = time.perf_counter()
            snap_cur = router_weights(self.mod)   # the routers of this step: the next one's drift reference
            prev = self.snap_prev if self.snap_prev is not None else snap_cur
            stats = ExpertStats.zeros(self.L, self.N)
            rb = self.rollout(step)
            res = update_on_rollouts(self.engine, rb, prev, self.cfg, self.teacher_logits(rb), self.guard, step)
            stats.add(res)
            self.measure(rb, res)
            stats.all_reduce()
            self.balance(step, stats)
            self.snap_prev = snap_cur
            self.maybe_fold(step, rb.rollouts.batch)
            self.meter.add("steps", 1)
            self.train_s += time.perf_counter() - t0
            # An evaluation step also closes a logging window, so every history row is whole.
            held = self.evaluate() if every and (step + 1) % every == 0 else None
            if (step + 1) % self.cfg.train.log_every == 0 or step + 1 == self.cfg.train.steps or held is not None:
                self.log(step, stats, res, held)
            if self.ctx.save_if_due(step + 1, self.checkpoint_state()):
                self.progress.close()
                return LoopResult(self.history, step + 1)
        self.progress.close()
        return LoopResult(self.history, None)

    # -- the phases of a step ------------------------------------------------------------------
    def rollout(self, step: int) -> RolloutBatch:
        """The rollout batch: G sampled responses per prompt, rewarded, each micro-batch of it
        sent to the teacher for scoring (all before the first update, so scoring overlaps it)."""
        s3 = self.cfg.stage3
        probs = [self.problems[i] for i in self.plan.indices(step, 0, self.ctx.rank)]
        t0 = time.perf_counter()
        with rollout_policy(self.engine, self.cfg.rollout.backend, self.ctx.num_students, self.vllm) as (model, synced):
            ro = sample_rollouts(model, self.ctx.tok, probs, RolloutSampling.from_config(self.cfg), synced)
        seconds = time.perf_counter() - t0
        # The KD term reads the teacher on the response positions only: its head skips the prompts.
        rids = ([self.ctx.teacher.submit(step, mb.ids, mb.lengths, scored_from=mb.loss_mask.int().argmax(dim=1))
                 for mb in micro_batches(ro.batch, self.cfg.train.micro_batch_size)] if self.use_teacher else [])
        rewards, parts = score(ro.responses, probs, s3.group_size, self.policy_cfg)
        adv, group_stats = group_advantages(rewards)
        adv = adv.reshape(-1)
        if s3.shuffle_advantages:  # the control arm: the same step sizes, no reward information
            adv = shuffled(adv, (self.cfg.run.seed * 1_000_003 + step) * 4099 + self.ctx.rank)
        return RolloutBatch(ro, rewards, adv, sum(d["correct"] for d in parts), group_stats, rids, seconds)

    def teacher_logits(self, rb: RolloutBatch):
        """A callable i -> the teacher's answer for micro-batch i (Stage II), fetched after its forward."""
        if not self.use_teacher:
            return None
        teacher = self.ctx.teacher

        def fetch(i: int):
            w0 = teacher.stats.wait_s
            out = teacher.result(rb.requests[i])
            self.meter.add("wait_s", teacher.stats.wait_s - w0)
            return out.logits
        return fetch

    def measure(self, rb: RolloutBatch, res: StepResult) -> None:
        m, ro = self.meter, rb.rollouts
        m.add("gen_s", rb.seconds)
        for key, value in res.stats.items():
            m.add(key, value)
        for key, value in res.mismatch.items():
            (m.add_max if key.endswith("_max") else m.add)(key, value)
        m.add("drift_sum", res.drift.sum())
        m.add("drift_p95", torch.quantile(res.drift, 0.95) if res.drift.numel() else 0.0)
        m.add("drift_n", res.drift.numel())
        m.add("reward", rb.rewards.sum())
        m.add("correct", rb.correct)
        m.add("responses", len(ro.responses))
        m.add("zero_var_groups", rb.group_stats["zero_variance_groups"])
        m.add("groups", rb.group_stats["groups"])
        m.add("resp_tokens", ro.response_lengths.sum())
        m.add("tokens", ro.batch.lengths.sum())
        m.add("batches", 1)

    def balance(self, step: int, stats: ExpertStats) -> None:
        """Stage IV: the bias follows the step's all-reduced loads and advantages (it stays 0
        through the settle_steps)."""
        if self.cfg.stage4.enabled and step < self.cfg.train.steps - self.settle:
            self.controller.update(stats.counts, stats.adv_sum, stats.adv_count)
            set_bias(self.mod, self.controller.bias)

    def maybe_fold(self, step: int, batch) -> None:
        """Fold the bias into the routers every stage4.fold_every steps and once before the
        settle_steps. Never on the last step: the export folds what is left, so its routing
        fidelity still measures a fold against the engine as trained."""
        s4, T = self.cfg.stage4, self.cfg.train.steps
        due = (s4.fold_every and (step + 1) % s4.fold_every == 0) or (self.settle and step + 1 == T - self.settle)
        if not (self.slotless and step + 1 < T and due):
            return
        kept = fold_bias_into_routers(self.engine, micro_batches(batch, self.cfg.train.micro_batch_size),
                                      self.controller)
        if kept is not None:
            self.meter.add("folds", 1)
            self.meter.add("fold_kept", kept)
            # A fold re-expresses the routes, it is not a policy update: the next step's drift
            # is measured from the folded routers.
            self.snap_prev = router_weights(self.mod)

    def evaluate(self) -> dict:
        """Held-out accuracy of the live student, Stage IV bias included (every student rank in
        step; a vLLM run evaluates on the engine, since the suite decodes with generate())."""
        backend = "hf_gathered" if self.cfg.rollout.backend == "hf_gathered" else "hf"
        t0 = time.perf_counter()
        with rollout_policy(self.engine, backend, self.ctx.num_students) as (model, synced):
            held = heldout_accuracy(model, self.ctx.tok, self.cfg, synced=synced,
                                    share=(self.ctx.rank, self.ctx.num_students))
        self.meter.exclude(time.perf_counter() - t0)  # the window's throughput is training's
        return held

    def log(self, step: int, stats: ExpertStats, res: StepResult, held: dict | None = None) -> None:
        row = self.metrics_row(self.meter.totals(), stats.load())
        row["train/elapsed_s"] = self.train_s
        if held is not None:
            row["eval/heldout_acc"] = held["accuracy"]
        self.history.append({"step": step + 1, **row})
        self.ctx.logger.log(row, step + 1)
        if self.routing_log is not None:
            self.routing_log.add_counts(step + 1, {l: stats.counts[l].tolist() for l in range(self.L)}, drift=res.drift)
        self.progress.update(step + 1, row)

    def metrics_row(self, tot: Totals, load: torch.Tensor) -> dict:
        n = self.ctx.num_students
        nl = self.N * load                                                        # 1 = perfectly even
        row = {"train/reward": tot["reward"] / tot["responses"], "train/accuracy": tot["correct"] / tot["responses"],
               "train/policy_loss": tot["policy_loss"] / max(tot["policy_units"], 1),  # the loss's own units
               "train/clip_frac": tot["clip_frac"] / max(tot["resp_tokens"], 1),
               "train/zero_variance_groups": tot["zero_var_groups"] / tot["groups"],
               "train/response_tokens": tot["resp_tokens"] / tot["responses"],
               "train/tokens_per_s": tot["tokens"] / tot.seconds, "train/generate_fraction": tot["gen_s"] / n / tot.seconds,
               "routing/drift_mean": tot["drift_sum"] / max(tot["drift_n"], 1),
               "routing/drift_p95": tot["drift_p95"] / tot["batches"],
               "routing/load_cv": float((load.std(1, unbiased=False) / load.mean(1)).mean()),
               "routing/load_max": float(nl.max()), "routing/load_min": float(nl.min()),
               "routing/load_entropy": float(-(load * load.clamp(min=1e-12).log()).sum(1).mean() / math.log(self.N)),
               "routing/bias_norm": float(self.controller.bias.norm()),
               "train/lr": self.engine.get_lr()[0], "train/nonfinite_skipped": self.guard.skipped}
        if "logp_diff_max" in tot:  # the rollout engine against the trainer, on the sampled tokens
            row["rollout/logprob_diff_mean"] = tot["logp_diff_sum"] / max(tot["resp_tokens"], 1)
            row["rollout/logprob_diff_max"] = tot["logp_diff_max"]
        if "route_pairs" in tot:
            row["rollout/route_agreement"] = tot["route_agree"] / max(tot["route_pairs"], 1)
        if "move_tokens" in tot:  # stage3.measure_movement: how far the step's updates moved the policy
            row["train/policy_move"] = tot["move_sum"] / max(tot["move_tokens"], 1)
        if "tis_weight" in tot:
            row["train/tis_weight"] = tot["tis_weight"] / max(tot["resp_tokens"], 1)
        if tot.get("folds"):  # Stage IV folds in this window: share of routes they kept
            row["routing/fold_kept"] = tot["fold_kept"] / tot["folds"]
        if self.use_teacher:
            row.update({"train/kd_loss": tot["kd_loss"] / max(tot["resp_tokens"], 1),
                        "train/kd_temperature": tot["kd_temperature"] / tot["responses"],
                        "teacher/wait_fraction": tot["wait_s"] / n / tot.seconds, **self.ctx.teacher.health()})
        return row

    def checkpoint_state(self) -> dict:
        return {"history": self.history, "balance": self.controller.state_dict(), "router_snapshot": self.snap_prev,
                "nonfinite": self.guard.state_dict()}


def train_padd(ctx: RunContext, state: ResumeState | None) -> LoopResult:
    return PaddLoop(ctx, state).run()
