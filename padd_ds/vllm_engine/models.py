"""PADD routing inside vLLM (runs in the vLLM environment only).

vLLM's stock MoE models route by plain softmax top-k, and their `load_weights` skips a
checkpoint's unknown `*_bias` tensors without a word, so a student with a Stage IV bias would
sample with other experts than it trains with. The variants here keep the stock model and
replace each MoE layer's router by one with a custom routing function (vLLM's extension
point for routing; honoured by its CPU and CUDA MoE paths alike) that does what
models/router.PaddRouter does:

    scores = softmax(router logits)                     fp32
    experts = top-k(scores + b)                         b: the layer's Stage IV bias
              (DeepSeek-V2's group-limited routing: within the groups whose best scores + b rank highest)
    weights = scores[experts] (/ their sum where the model renormalises) (x routed_scaling_factor
              where the stock router applied it)

The bias arrives with the weights as `model.layers.<i>.<moe block>.gate.padd_bias` [N].
"""

from __future__ import annotations

import re

import torch
from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter
from vllm.model_executor.layers.fused_moe.router.router_factory import create_fused_moe_router
from vllm.model_executor.models.deepseek_v2 import DeepseekV2ForCausalLM
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

_BIAS = re.compile(r"^model\.layers\.(\d+)\.[\w.]*\.padd_bias$")


class BiasedTopK:
    """One MoE layer's custom_routing_function; `bias` is updated in place by load_weights."""

    def __init__(self, bias: torch.Tensor, groups: tuple[int, int] | None = None, scale: float = 1.0):
        self.bias, self.groups, self.scale = bias, groups, scale

    def __call__(self, hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool):
        scores = gating_output.float().softmax(dim=-1)
        choice = scores + self.bias
        if self.groups is not None:  # DeepSpeed's node-limited rule: groups ranked by their best biased score
            n_group, top_groups = self.groups
            grouped = choice.view(choice.shape[0], n_group, -1)
            keep = grouped.max(dim=-1).values.topk(top_groups, dim=-1).indices
            mask = torch.ones(grouped.shape[:2], dtype=torch.bool, device=choice.device).scatter_(1, keep, False)
            choice = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).view_as(choice)
        experts = choice.topk(topk, dim=-1).indices
        weights = scores.gather(1, experts)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # PaddRouter's epsilon
        return weights * self.scale, experts.to(torch.int32)


def moe_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, the MoE runner owning `.router`) of every MoE layer, in layer order."""
    out = []
    for i, layer in enumerate(model.model.layers):
        runner = next((m for m in layer.modules() if isinstance(getattr(m, "router", None), FusedMoERouter)), None)
        if runner is not None:
            out.append((i, runner))
    return out


class PaddRouting:
    """Mixin: the stock model, each MoE layer routed by BiasedTopK."""

    def _install_padd_routing(self) -> None:
        self.padd_biases: dict[int, torch.Tensor] = {}
        for i, runner in moe_routers(self):
            old = runner.router
            if getattr(old, "scoring_func", "softmax") != "softmax" or getattr(old, "e_score_correction_bias", None) is not None:
                raise RuntimeError(f"{type(self).__name__}: layer {i} routes by {old.scoring_func} with a selection-bias "
                                   "slot (DeepSeek-V3); PADD routing here covers softmax routers")
            n_group = getattr(old, "num_expert_group", None) or 1
            groups = (n_group, old.topk_group) if getattr(old, "use_grouped_topk", False) and n_group > 1 else None
            bias = torch.zeros(old.global_num_experts, dtype=torch.float32)  # built on vLLM's device context
            self.padd_biases[i] = bias
            runner.router = create_fused_moe_router(
                top_k=old.top_k, global_num_experts=old.global_num_experts, eplb_state=old.eplb_state,
                renormalize=old.renormalize,
                custom_routing_function=BiasedTopK(bias, groups, float(getattr(old, "routed_scaling_factor", 1.0))))
        if not self.padd_biases:
            raise RuntimeError(f"{type(self).__name__}: no MoE router found to route by PADD's rule")

    def load_weights(self, weights):
        loaded: set[str] = set()

        def stock(items):  # a generator: the stock loader sees every other tensor as it streams
            for name, tensor in items:
                m = _BIAS.match(name)
                if m is None:
                    yield name, tensor
                    continue
                layer = int(m.group(1))
                if layer not in self.padd_biases:
                    raise KeyError(f"{name}: layer {layer} has no MoE router")
                self.padd_biases[layer].copy_(tensor.float())
                loaded.add(name)

        return set(super().load_weights(stock(weights)) or ()) | loaded


class PaddQwen3MoeForCausalLM(PaddRouting, Qwen3MoeForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_padd_routing()


class PaddMixtralForCausalLM(PaddRouting, MixtralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_padd_routing()


class PaddDeepseekV2ForCausalLM(PaddRouting, DeepseekV2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_padd_routing()
