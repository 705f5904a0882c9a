"""The experts the rollout engine chose for every token it ran, in the trainer's layout.

A MoE policy's log-probs depend on its routes; when the engine that samples and the one that
trains pick different experts for a token, the two policies differ (the training-inference
mismatch of MoE RL). `RouteCapture` hooks the routers of the generating model (the engine's
PADD routers, or a gathered transformers copy's gates, after their exact-routing hook) and
keeps each forward's choices; `align_routes` puts them where the trainer's forward will see the
same tokens. The trainer then measures how often its own top-k agrees
(`rollout/route_agreement`) and, with `rollout.route_replay`, routes through them instead.

    capture = RouteCapture(model)                  # None when the model's routers are unknown
    with capture: model.generate(...)
    routes = align_routes(capture.calls, prompt_lens, response_lens, width, L)   # [R, L, layers, k]
"""

from __future__ import annotations

import torch

from padd_ds.models.export import same_experts
from padd_ds.models.router import PaddRouter

# transformers MoE gates whose forward returns (logits, top-k weights, top-k ids)
_GATED = ("qwen3_moe", "mixtral", "deepseek_v2")


class RouteCapture:
    """Forward hooks on every router of `model`; `calls[c][l]` = layer l's [T, k] experts in
    forward call c. Build with `RouteCapture.of(model)`."""

    def __init__(self, modules: list[torch.nn.Module], index: int):
        self.modules, self.index = modules, index
        self.calls: list[list[torch.Tensor]] = []
        self._hooks: list = []

    @classmethod
    def of(cls, model: torch.nn.Module) -> RouteCapture | None:
        padd = [m for m in model.modules() if isinstance(m, PaddRouter)]
        if padd:
            return cls(padd, 1)  # PaddRouter returns (weights, experts, counts)
        cfg = getattr(model, "config", None)
        kind = cfg.get_text_config().model_type if cfg is not None else None
        gates = [m for n, m in model.named_modules() if n.endswith(".mlp.gate")]
        return cls(gates, 2) if kind in _GATED and gates else None

    def _record(self, layer: int):
        def hook(module, args, out):
            if layer == 0:
                self.calls.append([])
            self.calls[-1].append(out[self.index].detach().to(torch.int16))
        return hook

    def __enter__(self) -> RouteCapture:
        self.calls = []
        # registered last: they see what an exact-routing hook made of the gate's output
        self._hooks = [m.register_forward_hook(self._record(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def align_routes(calls: list[list[torch.Tensor]], prompt_lens: list[int], response_lens: list[int], width: int,
                 L: int) -> torch.Tensor:
    """`generate`'s forward calls -> [R, L, layers, k] int16 experts in the trainer's layout.

    Call 0 is the prefill of the R left-padded prompts [R, width]; call s >= 1 feeds each row's
    response token s-1, which the trainer sees at position prompt + s - 1. A row's last sampled
    token is never fed back, so its position (and padding) holds -1 (no route known). Calls past
    a row's response (synced ranks stepping on) are ignored."""
    R = len(prompt_lens)
    n_layers, k = len(calls[0]), calls[0][0].shape[-1]
    pre = torch.stack(calls[0], dim=1).cpu()
    if pre.shape[0] != R * width:
        raise RuntimeError(f"route capture: the prefill routed {pre.shape[0]} tokens, expected {R} rows x {width}")
    pre = pre.view(R, width, n_layers, k)
    steps = [torch.stack(c, dim=1).cpu() for c in calls[1:]]
    if any(s.shape[0] != R for s in steps):
        raise RuntimeError(f"route capture: a decode step routed {[s.shape[0] for s in steps]} tokens for {R} rows")
    dec = torch.stack(steps, dim=1) if steps else torch.empty(R, 0, n_layers, k, dtype=torch.int16)
    out = torch.full((R, L, n_layers, k), -1, dtype=torch.int16)
    for i, (n, m) in enumerate(zip(prompt_lens, response_lens)):
        out[i, :n] = pre[i, width - n:]
        fed = min(max(m - 1, 0), dec.shape[1])
        out[i, n:n + fed] = dec[i, :fed]
    return out


def route_agreement(own: list[torch.Tensor], routes: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(agreeing, compared) (token, layer) pairs: the trainer's own top-k sets `own` (per layer
    [b*S, k]) against the rollout engine's `routes` [b, S, layers, k] where `mask` [b, S] is on
    and a route is known."""
    b, S = mask.shape
    flat = routes[:, :S].reshape(b * S, len(own), -1).to(own[0].device)
    valid = mask.reshape(-1).to(flat.device) & (flat[:, 0, 0] >= 0)
    agree = sum(int(same_experts(o[valid], flat[valid, l].to(o.dtype)).sum()) for l, o in enumerate(own))
    return float(agree), int(valid.sum()) * len(own)


def replay_routes(routes: torch.Tensor, S: int, device: torch.device) -> list[torch.Tensor]:
    """[b, S_full, layers, k] -> per layer [b*S, k] on `device`, for `replayed_routes`."""
    cut = routes[:, :S].to(device=device, dtype=torch.int64)
    return [cut[:, :, l].reshape(-1, cut.shape[-1]) for l in range(cut.shape[2])]
