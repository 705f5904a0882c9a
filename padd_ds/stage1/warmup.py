"""Stage I warmup: experts adapt under a router frozen at uniform routing, while the router's
own distribution is pulled towards the teacher's path distribution.

    L_warmup = L_LM + alpha * L_KD + beta * sum_l KL(p_S,l || p_T,l)

p_S (the paper leaves it to us): the student router's probabilities softmax(W_l x) of MoE
layer l. "Frozen at uniform" is read as the *dispatch*: every token goes to all experts
(weight 1/N, `uniform_all`) or to k uniformly random ones (`uniform_random_topk`), so no
expert is starved or favoured by a half-trained router (the cold-start problem). The
router's weights receive gradient only from the path KL: the routes it will take once
Stage II starts are learned from the teacher's clusters, never from its own early choices.
p_T,l = softmax(mean activation of each teacher cluster / xi) on the mapped teacher layer
(xi = stage1.path_temperature, alpha = stage1.kd_weight, beta = stage1.path_kl_weight).
KL(p_S || p_T) is summed over layers and averaged over the non-padding tokens of the global
batch (prompt and response: the teacher's paths exist on every token).
"""

from __future__ import annotations

import torch


def path_kl(router_scores: list[torch.Tensor], log_p_t: torch.Tensor, valid: torch.Tensor,
            denom: float | torch.Tensor) -> torch.Tensor:
    """sum_l KL(p_S,l || p_T,l), summed over valid tokens / denom.

    router_scores[l]: [B*S, N] student router probabilities (row-major over [B, S]);
    log_p_t: [B, S, n_layers, N] teacher path log-probabilities; valid: [B, S] bool."""
    v = valid.reshape(-1)
    total = log_p_t.new_zeros(())
    for l, p_s in enumerate(router_scores):
        p = p_s[v].float()
        log_t = log_p_t[..., l, :].reshape(-1, log_p_t.shape[-1])[v]
        total = total + (p * (torch.log(p.clamp(min=1e-20)) - log_t)).sum()
    return total / denom


@torch.no_grad()
def path_agreement(router_scores: list[torch.Tensor], log_p_t: torch.Tensor, valid: torch.Tensor,
                   top_k: int) -> dict[str, float]:
    """Token-level agreement between the student's routing and the teacher's clusters, as sums
    (the caller all-reduces and divides by `tokens`): `top1` counts tokens whose most likely
    expert is the teacher's most active cluster; `topk` counts, out of k * tokens, how many of
    the teacher's k most active clusters are among the student's k chosen experts."""
    v = valid.reshape(-1)
    top1 = topk = 0.0
    for l, p_s in enumerate(router_scores):
        p = p_s[v]
        t = log_p_t[..., l, :].reshape(-1, log_p_t.shape[-1])[v]
        top1 += float((p.argmax(-1) == t.argmax(-1)).sum())
        s_k = torch.nn.functional.one_hot(p.topk(top_k, -1).indices, p.shape[-1]).sum(1)
        t_k = torch.nn.functional.one_hot(t.topk(top_k, -1).indices, p.shape[-1]).sum(1)
        topk += float((s_k * t_k).sum()) / top_k
    n_layers = len(router_scores)
    return {"top1": top1 / n_layers, "topk": topk / n_layers, "tokens": float(v.sum())}


def path_log_probs(cluster_acts: torch.Tensor, xi: float) -> torch.Tensor:
    """log p_T = log softmax(mean cluster activation / xi) over the last (cluster) dim."""
    return torch.log_softmax(cluster_acts.float() / xi, dim=-1)
