"""Stage I router initialisation for a pre-trained MoE student, across hidden sizes.

The paper starts the router "from the cluster centroids". A centroid router in the
teacher's space gives token x the logit z_j = x_T . c_j (c_j = the mean gate row of cluster
j), which the teacher streams per token (`OUT_CLUSTER_GATE`). The student's router sees a
different hidden state x_S (other width, other basis), so a map is needed; the paper does
not give one. Ours (`stage1.projection: lstsq`): the least-squares map M with x_T ~ x_S M,
fitted on paired hidden states of D_A, applied to the centroids: w_j = M c_j. We never ship
the teacher's hidden states: min_W ||X_S W - X_T C||^2 has the solution
W = (X_S^T X_S)^-1 X_S^T (X_T C) = M C, so accumulating X_S^T X_S and X_S^T Z over D_A
(Z = the streamed centroid logits) gives exactly the projected centroids. A small ridge
term (relative to the mean diagonal) keeps the solve stable when D_A has few tokens.

    fit = RouterFit(num_layers, hidden, num_experts)
    fit.add(layer, x_student [T, H_S], z_teacher [T, N])     # per D_A batch, valid tokens only
    weights = fit.solve(all_reduce)                          # [L] x [N, H_S], same on every rank
    write_router_weights(engine.module, weights)
"""

from __future__ import annotations

import contextlib
import torch

from padd_ds.models.router import RouterFit  # noqa: F401  (re-exported: the Stage I fit)


def _gathered_for_write(params: list[torch.nn.Parameter]):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


@torch.no_grad()
def write_router_weights(module: torch.nn.Module, weights: list[torch.Tensor]) -> None:
    """Set each MoE layer's router gate to `weights[l]` (ZeRO-3: every rank calls this with the
    same values; rank 0's copy is what gets re-partitioned).

    DeepSpeed's optimizer keeps its own fp32 master copy of every parameter (with bf16/fp16,
    and in fp32 too unless the partition already lives on the optimizer's device) and copies
    it back into the model after each step, so a write to the model's weights alone would be
    undone by the first step: the master copy is set too (`safe_set_full_fp32_param`)."""
    from deepspeed.utils import safe_set_full_fp32_param

    from padd_ds.models.router import routers

    rs = routers(module)
    if len(rs) != len(weights):
        raise ValueError(f"router init: {len(weights)} weight matrices for {len(rs)} MoE layers")
    for r, w in zip(rs, weights):
        params = [r.gate.weight] + ([r.gate.bias] if r.gate.bias is not None else [])
        with _gathered_for_write(params):
            if tuple(r.gate.weight.shape) != tuple(w.shape):
                raise ValueError(f"router init: weight {tuple(w.shape)} does not fit gate {tuple(r.gate.weight.shape)}")
            r.gate.weight.copy_(w.to(r.gate.weight.dtype))
            if r.gate.bias is not None:
                r.gate.bias.zero_()
        if _has_master_copy(r.gate.weight):
            safe_set_full_fp32_param(r.gate.weight, w.float())
            if r.gate.bias is not None:
                safe_set_full_fp32_param(r.gate.bias, torch.zeros(tuple(getattr(r.gate.bias, "ds_shape", r.gate.bias.shape))))


def _has_master_copy(p) -> bool:
    """True once DeepSpeed's optimizer holds an fp32 copy of `p` (ZeRO-3, or ZeRO-1/2/bf16)."""
    return getattr(p, "_z3_optimizer", None) is not None or hasattr(p, "_hp_mapping")


@torch.no_grad()
def random_router_weights(module: torch.nn.Module, seed: int, std: float = 0.02) -> list[torch.Tensor]:
    """Freshly initialised routers (HF's normal(0, 0.02)): the "no Stage I" comparison."""
    from padd_ds.models.router import routers

    g = torch.Generator().manual_seed(seed)
    out = []
    for r in routers(module):
        shape = getattr(r.gate.weight, "ds_shape", r.gate.weight.shape)
        out.append(torch.randn(tuple(shape), generator=g) * std)
    return out
