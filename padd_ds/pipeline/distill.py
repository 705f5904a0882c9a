"""Online distillation on D_C (`train.mode=distill`): the teacher's sparse logits for each
batch of reference solutions, requested `teacher.prefetch` steps ahead, KD + LM loss.

    for each micro-batch: teacher targets (already in flight) -> forward -> KD + LM -> backward, step
"""

from __future__ import annotations

from padd_ds.data.batch import TokenBatch, lm_loss
from padd_ds.engine.guard import NonFiniteGuard
from padd_ds.engine.meter import Meter
from padd_ds.launch.comm import all_sum
from padd_ds.launch.device import rank_device
from padd_ds.pipeline.records import LoopResult, ResumeState, RunContext
from padd_ds.pipeline.summary import progress_bar
from padd_ds.teacher.feed import BatchPlan, RankBatches, TeacherFeed
from padd_ds.teacher.sparse import sparse_kd_loss


def step_token_count(batches: RankBatches, step: int, first: TokenBatch) -> float:
    """Loss positions of the whole optimiser step (its micro-batch `first` and the rest of this
    rank's, encoded again here) summed over all student ranks.

    Each micro-batch's loss sum is divided by this count over (ranks x micro-steps); DeepSpeed
    averages gradients over both, so the update is the token mean of the step's global batch
    however it is cut into ranks and micro-steps (a per-rank or per-micro-step mean would
    overweight short sequences, and a resume on another number of ranks cuts it differently)."""
    rest = sum(float(batches(step, m).loss_mask.sum()) for m in range(1, batches.plan.grad_accum))
    return all_sum([float(first.loss_mask.sum()) + rest])[0]


def train_distill(ctx: RunContext, state: ResumeState | None) -> LoopResult:
    cfg, engine = ctx.cfg, ctx.engine
    start = state.step if state else 0
    history = list(state.history) if state else []
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)  # NaN/inf loss on any rank: skip the step everywhere
    guard.load_state_dict(state and state.nonfinite)
    problems = ctx.parts["C"]
    plan = BatchPlan(len(problems), cfg.train.micro_batch_size, ctx.num_students, cfg.train.grad_accum, cfg.run.seed)
    batches = RankBatches(problems, plan, ctx.rank, ctx.encode)
    feed = TeacherFeed(ctx.teacher, batches, range(start, cfg.train.steps), cfg.teacher.prefetch)
    progress = progress_bar(cfg, ctx.world)
    meter, waited = Meter(), feed.wait_s
    engine.train()
    stopped = None
    for step, micro, batch, out in feed:
        if micro == 0:
            denom = step_token_count(batches, step, batch) / (ctx.num_students * cfg.train.grad_accum)
        dev = batch.to(rank_device())  # the feed's batches and teacher targets are on the host
        logits = engine(input_ids=dev.ids, attention_mask=dev.attention_mask).logits
        kd = sparse_kd_loss(logits, out.logits.to(dev.ids.device), dev.loss_mask, cfg.train.kd_temperature, denom=denom)
        lm = lm_loss(logits, dev, denom=denom)
        guard.backward_step(engine, cfg.stage2.kd_weight * kd + cfg.train.lm_weight * lm, step)
        meter.add("kd", kd.item() * denom)        # back to sums, for exact global means
        meter.add("lm", lm.item() * denom)
        meter.add("count", batch.loss_mask.sum())
        meter.add("tokens", int(batch.lengths.sum()))
        if micro != cfg.train.grad_accum - 1:
            continue
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            meter.add("wait", feed.wait_s - waited)
            waited = feed.wait_s
            tot = meter.totals()
            row = {"train/kd_loss": tot["kd"] / tot["count"], "train/lm_loss": tot["lm"] / tot["count"],
                   "teacher/wait_fraction": tot["wait"] / ctx.num_students / tot.seconds,
                   "train/tokens_per_s": tot["tokens"] / tot.seconds,
                   "train/lr": engine.get_lr()[0], "train/nonfinite_skipped": guard.skipped,
                   **ctx.teacher.health()}  # with replicas: how many are alive
            history.append({"step": step + 1, **row})
            ctx.logger.log(row, step + 1)
            progress.update(step + 1, row)
        if ctx.save_if_due(step + 1, {"history": history, "nonfinite": guard.state_dict()}):
            stopped = step + 1
            break
    progress.close()
    return LoopResult(history, stopped)
