"""Stage IV: reward-augmented load balancing through a per-expert router bias.

After every optimiser step, for each MoE layer l and routed expert j:

    f_j   = counts_j / sum_j counts_j                    (share of this step's top-k assignments)
    a_j   = adv_sum_j / adv_count_j                      (mean advantage of the tokens routed to j)
    EMA_j = ema_decay * EMA_j + (1 - ema_decay) * a_j    (only experts that received tokens)
    balancing:  b_j <- b_j - eta * (f_j - 1/N) + gamma * EMA_j   (overloaded experts lose bias)
    as_written: b_j <- b_j + eta * (f_j - 1/N) + gamma * EMA_j   (the notes' sign: positive feedback)

with eta = stage4.balance_rate and gamma = stage4.advantage_rate.

The router adds b to its scores before top-k. An expert that received no token this step
keeps its EMA: "no evidence" is not "advantage 0", and decaying it would pull an idle
expert's quality estimate towards neutral only because the router skipped it. The EMA
starts at 0 (no preference before any evidence), so early estimates are damped towards 0.

The controller is process-local and deterministic: the trainer all-reduces counts, adv_sum
and adv_count over the data-parallel group first, so every rank applies the same update and
holds bit-identical biases. Which tokens count (we suggest the response tokens, each top-k
assignment once, with its response's advantage) is the trainer's choice.
"""

from __future__ import annotations

import torch

from padd_ds.config import Stage4Config
from padd_ds.launch.comm import all_reduce_
from padd_ds.models.export import engine_routes, fold_router_bias, same_experts
from padd_ds.models.router import set_bias, write_router_weights


class BiasController:
    """Per-layer expert bias [L, E] and per-expert advantage EMA [L, E] (float32, CPU)."""

    def __init__(self, num_layers: int, num_experts: int, cfg: Stage4Config):
        if num_layers < 1 or num_experts < 2:
            raise ValueError(f"BiasController needs >= 1 MoE layer and >= 2 experts, got {num_layers} layers, "
                             f"{num_experts} experts")
        if cfg.bias_sign not in ("balancing", "as_written"):
            raise ValueError(f"stage4.bias_sign={cfg.bias_sign!r}; choose balancing or as_written")
        self.cfg = cfg
        self.bias = torch.zeros(num_layers, num_experts)
        self.adv_ema = torch.zeros(num_layers, num_experts)
        self.steps = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.bias.shape)

    def _check(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) != self.shape:
            raise ValueError(f"{name} must be [layers, experts]={list(self.shape)}, got {tuple(t.shape)}")
        t = t.detach().to(device="cpu", dtype=torch.float32)
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
        return t

    def update(self, counts: torch.Tensor, adv_sum: torch.Tensor, adv_count: torch.Tensor) -> dict[str, float]:
        """Apply one step's statistics (all [L, E], already all-reduced). Returns load stats."""
        counts, adv_sum, adv_count = (self._check(n, t) for n, t in
                                      (("counts", counts), ("adv_sum", adv_sum), ("adv_count", adv_count)))
        if (counts < 0).any() or (adv_count < 0).any():
            raise ValueError("counts and adv_count must be >= 0")
        totals = counts.sum(dim=1, keepdim=True)
        if (totals <= 0).any():
            empty = int((totals.squeeze(1) <= 0).nonzero()[0])
            raise ValueError(f"counts of MoE layer {empty} are all zero; pass the step's routed-token counts per expert")
        num_experts = counts.shape[1]
        f = counts / totals
        seen = adv_count > 0
        step_adv = adv_sum / adv_count.clamp(min=1.0)
        d = self.cfg.ema_decay
        self.adv_ema = torch.where(seen, d * self.adv_ema + (1.0 - d) * step_adv, self.adv_ema)
        excess = f - 1.0 / num_experts
        sign = -1.0 if self.cfg.bias_sign == "balancing" else 1.0
        self.bias = self.bias + sign * self.cfg.balance_rate * excess + self.cfg.advantage_rate * self.adv_ema
        self.steps += 1
        return {
            "load_max_over_mean": float((f * num_experts).max(dim=1).values.mean()),
            "load_cv": float((f.std(dim=1, unbiased=False) * num_experts).mean()),
            "bias_abs_max": float(self.bias.abs().max()),
            "adv_ema_abs_max": float(self.adv_ema.abs().max()),
        }

    def state_dict(self) -> dict:
        return {"bias": self.bias.clone(), "adv_ema": self.adv_ema.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        missing = {"bias", "adv_ema", "steps"} - set(state)
        if missing:
            raise ValueError(f"Stage IV controller state lacks {sorted(missing)}; was it saved by BiasController?")
        for key in ("bias", "adv_ema"):
            if tuple(state[key].shape) != self.shape:
                raise ValueError(f"Stage IV controller state '{key}' has shape {tuple(state[key].shape)}, the model "
                                 f"has [layers, experts]={list(self.shape)}")
        self.bias = state["bias"].detach().to(device="cpu", dtype=torch.float32).clone()
        self.adv_ema = state["adv_ema"].detach().to(device="cpu", dtype=torch.float32).clone()
        self.steps = int(state["steps"])


def switch_aux_loss(router_probs: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss N * sum_j f_j * P_j, averaged over layers (the baseline).

    router_probs [L, T, E]: softmax over experts per token (with gradient); counts [L, E]:
    top-k assignments per expert (f_j = counts_j / sum counts, no gradient); mask [T]: the
    tokens that count. P_j is expert j's mean router probability over those tokens. The loss
    is 1 for uniform routing and grows as probability and load concentrate on the same experts.
    """
    if router_probs.dim() != 3 or counts.shape != (router_probs.shape[0], router_probs.shape[2]):
        raise ValueError(f"router_probs must be [L, T, E] and counts [L, E], got {tuple(router_probs.shape)} and "
                         f"{tuple(counts.shape)}")
    num_experts = router_probs.shape[2]
    c = counts.detach().to(router_probs.dtype)
    f = c / c.sum(dim=1, keepdim=True).clamp(min=1.0)
    if mask is None:
        p = router_probs.mean(dim=1)
    else:
        w = mask.to(router_probs.dtype).reshape(1, -1, 1)
        p = (router_probs * w).sum(dim=1) / w.sum().clamp(min=1.0)
    return (num_experts * (f * p).sum(dim=1)).mean()


def fold_bias_into_routers(engine, batches: list, controller: BiasController) -> float | None:
    """Stage IV `fold_every` / `settle_steps`: fold the current bias into the router weights
    and restart it from zero (collective over the student ranks). The fold is the export's
    (`fold_router_bias`, fitted on `batches`); afterwards the engine routes with the folded
    weights plus a bias that grows again from 0 (or stays 0 while settling). Returns the fraction of the batches'
    (token, layer) routes the folded routers keep (in-sample), or None when the bias is 0."""
    folded, before = fold_router_bias(engine, batches)
    if folded is None:
        return None
    write_router_weights(engine.module, folded)
    controller.bias.zero_()
    set_bias(engine.module, controller.bias)
    after = engine_routes(engine, batches)
    kept = torch.zeros(2, dtype=torch.float64)
    for b, was, now in zip(batches, before, after):
        valid = b.attention_mask.bool().reshape(-1)
        for x, y in zip(was, now):
            kept[0] += float(same_experts(x, y).cpu()[valid].sum())  # routes on the device, the mask on the host
            kept[1] += float(valid.sum())
    all_reduce_(kept)
    return float(kept[0] / kept[1].clamp(min=1))
