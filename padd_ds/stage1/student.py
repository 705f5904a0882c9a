"""Stage I on the student ranks, in order:

    1. measure   on D_D: how well the student's current routes agree with the teacher's paths
    2. targets   on D_A: stream the teacher's per-cluster gate logits and fit the router
                 (`models.router.RouterFit`), or keep / randomise it (`stage1.router_init`)
    3. measure   on D_D again (the effect of the init alone)
    4. warmup    on D_B: dispatch frozen at uniform, L_LM + alpha L_KD + beta path KL
                 (alpha = stage1.kd_weight, beta = stage1.path_kl_weight)
    5. measure   on D_D (the effect of the warmup)

Every measurement uses the learned router (the routes Stage II will start from) and
reports path agreement (top-1 and top-k, see `warmup.path_agreement`), the path KL, and the
KD loss to the teacher. All student ranks take part in every forward (AutoEP).
"""

from __future__ import annotations

import time
from typing import Callable

import deepspeed.comm as dist
import torch
from scipy.optimize import linear_sum_assignment

from padd_ds.config import PaddConfig
from padd_ds.data.batch import lm_loss
from padd_ds.engine.guard import NonFiniteGuard
from padd_ds.engine.meter import Meter
from padd_ds.launch.bridge import OUT_CLUSTER_ACTS, OUT_CLUSTER_GATE
from padd_ds.launch.comm import all_reduce_, all_sum
from padd_ds.launch.device import rank_device
from padd_ds.models.router import RouterFit, random_router_weights, routers, routing_trace, write_router_weights
from padd_ds.stage1.warmup import path_agreement, path_kl, path_log_probs
from padd_ds.teacher.feed import BatchPlan, RankBatches, TeacherFeed
from padd_ds.teacher.sparse import sparse_kd_loss


class Stage1:
    def __init__(self, cfg: PaddConfig, engine, teacher, encode: Callable, parts: dict,
                 log: Callable[[dict, int], None]):
        self.cfg, self.engine, self.teacher, self.encode, self.parts, self.log = cfg, engine, teacher, encode, parts, log
        self.rank, self.num_students = dist.get_rank(), dist.get_world_size()  # the students' world
        self.top_k = routers(engine.module)[0].top_k
        self.per_rank = cfg.train.micro_batch_size
        # perm[l, e] = the teacher cluster that student expert e stands for in layer l.
        n_layers, n_experts = len(routers(engine.module)), routers(engine.module)[0].num_experts
        self.perm = torch.arange(n_experts).expand(n_layers, n_experts).clone()

    def _cluster_order(self, t: torch.Tensor) -> torch.Tensor:
        """Teacher per-cluster values [B, S, L, N] reordered to the student's expert order."""
        perm = self.perm.to(t.device)
        idx = perm.reshape(1, 1, *perm.shape).expand(*t.shape[:2], *perm.shape)
        return t.gather(-1, idx)

    def _feed(self, problems: list[dict], steps: int, outputs: int, seed: int, grad_accum: int = 1) -> TeacherFeed:
        plan = BatchPlan(len(problems), self.per_rank, self.num_students, grad_accum, seed)
        return TeacherFeed(self.teacher, RankBatches(problems, plan, self.rank, self.encode), range(steps),
                           self.cfg.teacher.prefetch, outputs=outputs)

    @staticmethod
    def _on_device(batch, out):
        """A feed's batch and teacher outputs (host tensors) on the rank's device, for the forward."""
        return batch.to(rank_device()), out.to(rank_device())

    def _batches_for(self, n_problems: int) -> int:
        return max(1, n_problems // (self.per_rank * self.num_students))

    # -- 1, 3, 5 ---------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        problems = self.parts["D"][: self.cfg.stage1.eval_problems]
        meter = Meter()
        self.engine.eval()
        with routing_trace(self.engine.module) as trace:
            for _, _, host, out in self._feed(problems, self._batches_for(len(problems)), OUT_CLUSTER_ACTS,
                                              self.cfg.run.seed + 17):
                batch, out = self._on_device(host, out)
                logits = self.engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
                valid = batch.attention_mask.bool()
                log_pt = path_log_probs(self._cluster_order(out.cluster_acts), self.cfg.stage1.path_temperature)
                scores = trace.scores()
                for key, value in path_agreement(scores, log_pt, valid, self.top_k).items():
                    meter.add(key, value)
                meter.add("kl", path_kl(scores, log_pt, valid, 1.0))
                meter.add("kd", sparse_kd_loss(logits, out.logits, batch.loss_mask, 1.0, denom=1.0))
                meter.add("kd_count", host.loss_mask.sum())
        self.engine.train()
        tot = meter.totals()
        return {"agreement_top1": tot["top1"] / tot["tokens"], "agreement_topk": tot["topk"] / tot["tokens"],
                "path_kl": tot["kl"] / tot["tokens"] / len(routers(self.engine.module)),
                "kd_loss": tot["kd"] / tot["kd_count"]}

    # -- 2 -----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_router(self, decompressed: bool) -> str:
        s1 = self.cfg.stage1
        mod = self.engine.module
        if s1.router_init == "keep" or (s1.router_init == "centroids" and decompressed):
            # A decompressed student's router already is the centroid router, in the teacher's
            # own hidden space (its embeddings and attention are the teacher's).
            return "centroids (from decompression)" if decompressed else "kept"
        if s1.router_init == "random":
            write_router_weights(mod, random_router_weights(mod, self.cfg.run.seed))
            return "random"
        fit, co = self.fit_centroid_router()
        if s1.pairing == "matched":
            # Expert e stands for the cluster its current routes overlap most (Hungarian on
            # the co-occurrence): the fitted router then disturbs the pre-trained routes least.
            for l in range(co.shape[0]):
                rows, cols = linear_sum_assignment(co[l].numpy(), maximize=True)
                self.perm[l, torch.as_tensor(rows)] = torch.as_tensor(cols)
        weights = [w[self.perm[l]] for l, w in enumerate(fit.solve(all_reduce_))]  # row e <- cluster perm[l, e]
        write_router_weights(mod, weights)
        return (f"least-squares projection of the teacher centroids ({int(fit.tokens[0])} D_A tokens, "
                f"{s1.pairing} pairing)")

    def fit_centroid_router(self) -> tuple[RouterFit, torch.Tensor]:
        """Over D_A: the least-squares fit of the streamed centroid logits, and the co-occurrence
        [L, N, N] of the student's current routes with the teacher's paths (all-reduced)."""
        s1, mod = self.cfg.stage1, self.engine.module
        problems = self.parts["A"][: s1.targets_max_problems] if s1.targets_max_problems else self.parts["A"]
        first = routers(mod)[0]
        hidden = getattr(first.gate.weight, "ds_shape", first.gate.weight.shape)[1]
        n_layers, n = len(routers(mod)), first.num_experts
        fit = RouterFit(n_layers, hidden, n)
        co = torch.zeros(n_layers, n, n, dtype=torch.float64)
        self.engine.eval()
        with routing_trace(mod, inputs=True) as trace:
            for _, _, host, out in self._feed(problems, self._batches_for(len(problems)),
                                              OUT_CLUSTER_GATE | OUT_CLUSTER_ACTS, self.cfg.run.seed + 11):
                batch, out = self._on_device(host, out)
                self.engine(input_ids=batch.ids, attention_mask=batch.attention_mask)
                valid = batch.attention_mask.bool().reshape(-1)
                p_t = path_log_probs(out.cluster_acts, s1.path_temperature).exp()
                for l, (x, p_s) in enumerate(zip(trace.inputs(), trace.scores())):
                    z = out.cluster_gate[..., l, :].reshape(-1, n)
                    fit.add(l, x[valid], z[valid])
                    co[l] += (p_s[valid].double().T @ p_t[..., l, :].reshape(-1, n)[valid].double()).cpu()
        self.engine.train()
        all_reduce_(co)
        return fit, co

    # -- 4 -----------------------------------------------------------------------------------
    def warmup(self) -> list[dict]:
        s1, cfg = self.cfg.stage1, self.cfg
        if s1.warmup_steps == 0:
            return []
        groups = self.engine.optimizer.param_groups
        main_lrs = [g["lr"] for g in groups]
        if s1.lr is not None:
            for g in groups:
                g["lr"] = s1.lr * g.get("lr_scale", 1.0)  # train.router_lr_scale's ratio holds in warmup too
        self.engine.train()  # activation checkpointing acts in train mode only
        with routing_trace(self.engine.module, s1.warmup_router, seed=cfg.run.seed) as trace:
            history = self._warmup_steps(trace)
        for g, lr in zip(groups, main_lrs):
            g["lr"] = lr
        return history

    def _warmup_steps(self, trace) -> list[dict]:
        """L_LM + alpha L_KD + beta path KL on D_B, with the dispatch frozen by the trace's mode."""
        s1, cfg = self.cfg.stage1, self.cfg
        # A warmup step is one optimiser step of the engine: as many micro-batches as it accumulates
        # (train.mode=padd: the rollout batch's), so the RL steps after it start on a boundary.
        gas = self.engine.gradient_accumulation_steps()
        feed = self._feed(self.parts["B"], s1.warmup_steps, OUT_CLUSTER_ACTS, cfg.run.seed + 13, gas)
        # A NaN/inf loss on any rank skips the step on all of them (engine/guard.py), as in the main phase.
        guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        meter, history = Meter(), []
        for step, micro, host, out in feed:
            count, tokens = all_sum([float(host.loss_mask.sum()), float(host.lengths.sum())])
            batch, out = self._on_device(host, out)
            logits = self.engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
            # Per-rank sums over the global counts: the update equals one process on the global batch.
            denom, tdenom = count / self.num_students, tokens / self.num_students
            lm = lm_loss(logits, batch, denom=denom)
            kd = sparse_kd_loss(logits, out.logits, batch.loss_mask, cfg.train.kd_temperature, denom=denom)
            kl = path_kl(trace.scores(), path_log_probs(self._cluster_order(out.cluster_acts), s1.path_temperature),
                         batch.attention_mask.bool(), tdenom)
            if not guard.backward_step(self.engine, lm + s1.kd_weight * kd + s1.path_kl_weight * kl, step):
                meter.add("lm", lm.item() * denom)
                meter.add("kd", kd.item() * denom)
                meter.add("kl", kl.item() * tdenom)
                meter.add("count", host.loss_mask.sum())
                meter.add("tokens", host.lengths.sum())
            if micro == gas - 1 and ((step + 1) % cfg.train.log_every == 0 or step + 1 == s1.warmup_steps):
                tot = meter.totals()
                c, t = tot.get("count", 0.0), tot.get("tokens", 0.0)
                row = {"stage1/warmup_lm_loss": tot["lm"] / c if c else None,
                       "stage1/warmup_kd_loss": tot["kd"] / c if c else None,
                       "stage1/warmup_path_kl": tot["kl"] / t if t else None,
                       "stage1/warmup_tokens_per_s": t / tot.seconds,
                       "stage1/warmup_nonfinite_skipped": guard.skipped, **self.teacher.health()}
                history.append({"step": step + 1, **row})
                self.log(row, step + 1)
        return history

    def run(self, decompressed: bool) -> dict:
        t0 = time.perf_counter()
        report = {"before": self.measure()}
        report["router_init"] = self.init_router(decompressed)
        report["after_init"] = self.measure()
        report["warmup"] = self.warmup()
        report["after_warmup"] = self.measure()
        report["expert_to_cluster"] = self.perm.tolist()
        report["seconds"] = time.perf_counter() - t0
        return report
