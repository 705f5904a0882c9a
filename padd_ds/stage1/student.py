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

import torch

from padd_ds.config import PaddConfig
from padd_ds.launch.bridge import OUT_CLUSTER_ACTS, OUT_CLUSTER_GATE
from padd_ds.engine.guard import NonFiniteGuard
from padd_ds.models.router import (RouterFit, keep_router_inputs, random_router_weights, router_inputs, router_scores,
                                   routers, set_routing, write_router_weights)
from padd_ds.stage1.warmup import path_agreement, path_kl, path_log_probs
from padd_ds.teacher.feed import BatchPlan, TeacherFeed
from padd_ds.teacher.sparse import sparse_kd_loss


def _all_sum(values: list[float]) -> list[float]:
    from padd_ds.launch.comm import all_sum

    return all_sum(values)


def _all_reduce_(t: torch.Tensor) -> None:
    from padd_ds.launch.comm import all_reduce_

    all_reduce_(t)


def _lm_sum(logits: torch.Tensor, batch) -> torch.Tensor:
    m = batch.loss_mask[:, :-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1][m].float(), batch.ids[:, 1:][m], reduction="sum")


class Stage1:
    def __init__(self, cfg: PaddConfig, engine, teacher, encode: Callable, parts: dict, rank: int,
                 num_students: int, log: Callable[[dict, int], None]):
        self.cfg, self.engine, self.teacher, self.encode, self.parts = cfg, engine, teacher, encode, parts
        self.rank, self.num_students, self.log = rank, num_students, log
        self.top_k = routers(engine.module)[0].top_k
        self.per_rank = cfg.train.micro_batch_size
        # perm[l, e] = the teacher cluster that student expert e stands for in layer l.
        n_layers, n_experts = len(routers(engine.module)), routers(engine.module)[0].num_experts
        self.perm = torch.arange(n_experts).expand(n_layers, n_experts).clone()

    def _cluster_order(self, t: torch.Tensor) -> torch.Tensor:
        """Teacher per-cluster values [B, S, L, N] reordered to the student's expert order."""
        idx = self.perm.reshape(1, 1, *self.perm.shape).expand(*t.shape[:2], *self.perm.shape)
        return t.gather(-1, idx)

    def _feed(self, problems: list[dict], steps: int, outputs: int, seed: int) -> TeacherFeed:
        plan = BatchPlan(len(problems), self.per_rank, self.num_students, 1, seed)
        return TeacherFeed(self.teacher, self.encode, problems, plan, self.rank, steps,
                           self.cfg.teacher.prefetch, outputs=outputs)

    def _batches_for(self, n_problems: int) -> int:
        return max(1, n_problems // (self.per_rank * self.num_students))

    # -- 1, 3, 5 ---------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        problems = self.parts["D"][: self.cfg.stage1.eval_problems]
        steps = self._batches_for(len(problems))
        self.engine.eval()
        set_routing(self.engine.module, "learned", record=True)
        sums = {"top1": 0.0, "topk": 0.0, "tokens": 0.0, "kl": 0.0, "kd": 0.0, "kd_count": 0.0}
        for _, _, batch, out in self._feed(problems, steps, OUT_CLUSTER_ACTS, self.cfg.run.seed + 17):
            logits = self.engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
            valid = batch.attention_mask.bool()
            log_pt = path_log_probs(self._cluster_order(out.cluster_acts), self.cfg.stage1.path_temperature)
            scores = router_scores(self.engine.module)
            agree = path_agreement(scores, log_pt, valid, self.top_k)
            for k in ("top1", "topk", "tokens"):
                sums[k] += agree[k]
            sums["kl"] += float(path_kl(scores, log_pt, valid, 1.0))
            sums["kd"] += float(sparse_kd_loss(logits, out.logits, batch.loss_mask, 1.0, denom=1.0))
            sums["kd_count"] += float(batch.loss_mask.sum())
        set_routing(self.engine.module, "learned", record=False)
        self.engine.train()
        top1, topk, tokens, kl, kd, kd_count = _all_sum([sums[k] for k in
                                                         ("top1", "topk", "tokens", "kl", "kd", "kd_count")])
        return {"agreement_top1": top1 / tokens, "agreement_topk": topk / tokens,
                "path_kl": kl / tokens / len(routers(self.engine.module)), "kd_loss": kd / kd_count}

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
        problems = self.parts["A"][: s1.targets_max_problems] if s1.targets_max_problems else self.parts["A"]
        first = routers(mod)[0]
        hidden = getattr(first.gate.weight, "ds_shape", first.gate.weight.shape)[1]
        n_layers, n = len(routers(mod)), first.num_experts
        fit = RouterFit(n_layers, hidden, n)
        # Co-occurrence of the student's current routes and the teacher's paths, for pairing.
        co = torch.zeros(n_layers, n, n, dtype=torch.float64)
        self.engine.eval()
        keep_router_inputs(mod, True)
        set_routing(mod, "learned", record=True)
        for _, _, batch, out in self._feed(problems, self._batches_for(len(problems)),
                                           OUT_CLUSTER_GATE | OUT_CLUSTER_ACTS, self.cfg.run.seed + 11):
            self.engine(input_ids=batch.ids, attention_mask=batch.attention_mask)
            valid = batch.attention_mask.bool().reshape(-1)
            p_t = path_log_probs(out.cluster_acts, s1.path_temperature).exp()
            for l, (x, p_s) in enumerate(zip(router_inputs(mod), router_scores(mod))):
                z = out.cluster_gate[..., l, :].reshape(-1, n)
                fit.add(l, x[valid], z[valid])
                co[l] += p_s[valid].double().T @ p_t[..., l, :].reshape(-1, n)[valid].double()
        keep_router_inputs(mod, False)
        set_routing(mod, "learned", record=False)
        self.engine.train()
        _all_reduce_(co)
        if s1.pairing == "matched":
            # Expert e stands for the cluster its current routes overlap most (Hungarian on
            # the co-occurrence): the fitted router then disturbs the pre-trained routes least.
            from scipy.optimize import linear_sum_assignment

            for l in range(n_layers):
                rows, cols = linear_sum_assignment(co[l].numpy(), maximize=True)
                self.perm[l, torch.as_tensor(rows)] = torch.as_tensor(cols)
        weights = [w[self.perm[l]] for l, w in enumerate(fit.solve(_all_reduce_))]  # row e <- cluster perm[l, e]
        write_router_weights(mod, weights)
        return (f"least-squares projection of the teacher centroids ({int(fit.tokens[0])} D_A tokens, "
                f"{s1.pairing} pairing)")

    # -- 4 -----------------------------------------------------------------------------------
    def warmup(self) -> list[dict]:
        s1, cfg = self.cfg.stage1, self.cfg
        history: list[dict] = []
        if s1.warmup_steps == 0:
            return history
        mod = self.engine.module
        set_routing(mod, s1.warmup_router, record=True, seed=cfg.run.seed)
        groups = self.engine.optimizer.param_groups
        main_lrs = [g["lr"] for g in groups]
        if s1.lr is not None:
            for g in groups:
                g["lr"] = s1.lr
        feed = self._feed(self.parts["B"], s1.warmup_steps, OUT_CLUSTER_ACTS, cfg.run.seed + 13)
        # A NaN/inf loss on any rank skips the step on all of them (engine/guard.py), as in the main phase.
        guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        win = {"lm": 0.0, "kd": 0.0, "kl": 0.0, "count": 0.0, "tokens": 0.0, "t0": time.perf_counter()}
        for step, _, batch, out in feed:
            count, tokens = _all_sum([float(batch.loss_mask.sum()), float(batch.lengths.sum())])
            logits = self.engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
            # Per-rank sums over the global counts: the update equals one process on the global batch.
            denom, tdenom = count / self.num_students, tokens / self.num_students
            lm = _lm_sum(logits, batch) / denom
            kd = sparse_kd_loss(logits, out.logits, batch.loss_mask, cfg.train.kd_temperature, denom=denom)
            kl = path_kl(router_scores(mod), path_log_probs(self._cluster_order(out.cluster_acts), s1.path_temperature),
                         batch.attention_mask.bool(), tdenom)
            if not guard.backward_step(self.engine, lm + s1.kd_weight * kd + s1.path_kl_weight * kl, step):
                win["lm"] += lm.item() * denom
                win["kd"] += kd.item() * denom
                win["kl"] += kl.item() * tdenom
                win["count"] += float(batch.loss_mask.sum())
                win["tokens"] += float(batch.lengths.sum())
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == s1.warmup_steps:
                lm_s, kd_s, kl_s, c, t = _all_sum([win[k] for k in ("lm", "kd", "kl", "count", "tokens")])
                row = {"stage1/warmup_lm_loss": lm_s / c if c else None, "stage1/warmup_kd_loss": kd_s / c if c else None,
                       "stage1/warmup_path_kl": kl_s / t if t else None,
                       "stage1/warmup_tokens_per_s": t / (time.perf_counter() - win["t0"]),
                       "stage1/warmup_nonfinite_skipped": guard.skipped}
                history.append({"step": step + 1, **row})
                self.log(row, step + 1)
                win = {"lm": 0.0, "kd": 0.0, "kl": 0.0, "count": 0.0, "tokens": 0.0, "t0": time.perf_counter()}
        set_routing(mod, "learned", record=False)
        for g, lr in zip(groups, main_lrs):
            g["lr"] = lr
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
