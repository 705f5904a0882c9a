"""The PADD router, plugged into DeepSpeed AutoEP (the one place that touches its internals).

AutoEP builds each MoE layer's router from the module global
`deepspeed.module_inject.auto_ep_layer.TokenChoiceTopKRouter` (there is no config key for a
custom router, see PLATFORM_NOTES). `padd_router_installed()` rebinds that global to
`PaddRouter` while the engine is built and restores it afterwards:

    with padd_router_installed():
        engine = deepspeed.initialize(...)
    set_routing(engine.module, "uniform_all")     # Stage I warmup
    ... routers(engine.module)[l].last_scores     # router probabilities with grad (path KL)
    set_routing(engine.module, "learned")

What it adds over DeepSpeed's router:
- routing modes: `learned` (top-k of the router scores), and the two readings of Stage I's
  "router frozen at uniform": `uniform_all` (every expert, weight 1/N; the layer's top_k is
  raised to N while it is on) and `uniform_random_topk` (k experts drawn uniformly per
  token, weight 1/k). In the uniform modes the gate still runs, so its probabilities can be
  trained towards the teacher's path distribution without deciding any route.
- `last_scores`: the router probabilities [T, N] of the last forward, kept with their graph
  when `record` is on (Stage I path KL, Stage III drift).
- `padd_bias` [N]: a persistent per-expert bias added to the scores before top-k only
  (Stage IV); the combine weights stay the unbiased scores, as in DeepSeek-V3.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F

from deepspeed.moe.ep_count import count_tokens_per_expert
from deepspeed.moe.ep_router import TokenChoiceTopKRouter

class RouterFit:
    """Least-squares router weights from per-token targets (Stage I's centroid projection).

    A centroid router in the teacher's space gives token x the logit z_j = x_T . c_j (c_j =
    the mean gate row of cluster j), which the teacher streams per token. The student's
    router sees another hidden state x_S (other width, other basis), so a map is needed; the
    paper gives none. Ours (`stage1.projection: lstsq`): M with x_T ~ x_S M, fitted on D_A,
    applied to the centroids, w_j = M c_j. min_W ||X_S W - X_T C||^2 has the solution
    (X_S^T X_S)^-1 X_S^T (X_T C) = M C, so accumulating X_S^T X_S and X_S^T Z over batches and
    ranks (Z = the streamed centroid logits) gives the projected centroids without ever
    shipping the teacher's hidden states. A small ridge term (relative to the mean diagonal)
    keeps the solve stable when D_A has few tokens.

        fit = RouterFit(num_layers, hidden, num_experts)
        fit.add(layer, x_student [T, H_S], z_teacher [T, N])   # per D_A batch, valid tokens
        weights = fit.solve(all_reduce_)                       # [L] x [N, H_S], same on every rank
    """

    def __init__(self, num_layers: int, hidden: int, num_experts: int, ridge: float = 1e-3):
        self.xtx = torch.zeros(num_layers, hidden, hidden, dtype=torch.float64)
        self.xtz = torch.zeros(num_layers, hidden, num_experts, dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, dtype=torch.float64)
        self.ridge = ridge

    def add(self, layer: int, x: torch.Tensor, z: torch.Tensor) -> None:
        if x.shape[0] != z.shape[0]:
            raise ValueError(f"router fit: {x.shape[0]} student tokens vs {z.shape[0]} teacher tokens")
        x, z = x.detach().double(), z.detach().double()
        self.xtx[layer] += (x.T @ x).to(self.xtx.device)  # products where the tokens are, sums on the host
        self.xtz[layer] += (x.T @ z).to(self.xtz.device)
        self.tokens[layer] += x.shape[0]

    def solve(self, all_reduce: Callable[[torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        """Router weights [N, H] per layer; `all_reduce` sums the statistics over student ranks
        first, so every rank gets the same weights."""
        if all_reduce is not None:
            for t in (self.xtx, self.xtz, self.tokens):
                all_reduce(t)
        out = []
        for l in range(self.xtx.shape[0]):
            if self.tokens[l] < 1:
                raise RuntimeError(f"router fit: no D_A tokens reached MoE layer {l}")
            a = self.xtx[l]
            a = a + self.ridge * a.diagonal().mean().clamp(min=1e-12) * torch.eye(a.shape[0], dtype=a.dtype)
            out.append(torch.linalg.solve(a, self.xtz[l]).T.float().contiguous())  # [N, H]
        return out


RoutingMode = Literal["learned", "uniform_all", "uniform_random_topk"]
MODES = ("learned", "uniform_all", "uniform_random_topk")


class PaddRouter(TokenChoiceTopKRouter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode: RoutingMode = "learned"
        self.record = False
        self.last_scores: torch.Tensor | None = None
        self.last_selected: torch.Tensor | None = None  # [T, k] experts used (recorded with scores)
        self.last_own: torch.Tensor | None = None  # [T, k] its own top-k (differs from the above under replay)
        self.replay: torch.Tensor | None = None  # [T, k] experts to use instead (routing replay); rows < 0: its own
        self.keep_input = False  # Stage I router fit, Stage III drift: keep the router's input [T, H]
        self.last_input: torch.Tensor | None = None
        self.register_buffer("padd_bias", torch.zeros(self.num_experts, dtype=torch.float32), persistent=True)
        # Random top-k draws use their own stream, so turning the mode on never shifts the
        # global RNG (dropout, sampling) of the rest of the run. Reseeded by set_routing.
        self.generator = torch.Generator()
        self.last_draw: torch.Tensor | None = None  # [T, k] the last random top-k, for a checkpoint recompute

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None):
        self.last_input = x.detach() if self.keep_input else None
        logits = self.gate(x).float()
        scores = torch.sigmoid(logits) if self.score_func == "sigmoid" else F.softmax(logits, dim=-1)
        self.last_scores = scores if self.record else None
        T, N = scores.shape
        if self.mode == "uniform_all":
            selected = torch.arange(N, device=x.device).expand(T, N).contiguous()
            return (torch.full((T, N), 1.0 / N, device=x.device), selected,
                    count_tokens_per_expert(selected, N))
        if self.mode == "uniform_random_topk":
            selected = self._random_topk(T, N, x.device)
            return (torch.full((T, self.top_k), 1.0 / self.top_k, device=x.device), selected,
                    count_tokens_per_expert(selected, N))
        choice = scores.detach() + self.padd_bias.to(scores.device)
        if expert_bias is not None:
            choice = choice + expert_bias
        if self.e_score_correction_bias is not None:
            choice = choice + self.e_score_correction_bias.unsqueeze(0)
        if self.num_expert_groups is not None:
            choice = self._get_node_limited_routing_scores(choice)
        own = torch.topk(choice, k=self.top_k, dim=-1, sorted=False).indices
        selected = own if self.replay is None else self._replayed(own)
        self.last_selected = selected if self.record else None
        self.last_own = own if self.record else None
        top = scores.gather(1, selected)
        if self.route_norm:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        return top * self.route_scale, selected, count_tokens_per_expert(selected, N)

    def _replayed(self, own: torch.Tensor) -> torch.Tensor:
        """The experts the rollout engine chose where it gave some, this router's elsewhere; the
        weights are still this router's scores of the experts used, so the gradient flows as usual."""
        replay = self.replay.to(own.device)
        if replay.shape != own.shape:
            raise RuntimeError(f"routing replay: {tuple(replay.shape)} routes for a forward of {tuple(own.shape)} "
                               "(tokens x top-k); replay routes must be cut like the micro-batch")
        return torch.where(replay[:, :1] >= 0, replay.to(own.dtype), own)

    def _random_topk(self, T: int, N: int, device: torch.device) -> torch.Tensor:
        """k uniformly random experts per token. An activation-checkpoint recompute runs inside
        backward and must route as its forward did (and leave the stream where it was), so
        there the forward's draw is repeated."""
        if torch._C._current_graph_task_id() != -1:  # inside backward: a recompute
            if self.last_draw is None or self.last_draw.shape[0] != T:
                raise RuntimeError(f"a checkpoint recompute of {T} tokens in uniform_random_topk routing has no "
                                   "forward draw to repeat; run each micro-batch's backward before the next forward")
            return self.last_draw
        draw = torch.rand(T, N, generator=self.generator).to(device)
        self.last_draw = draw.topk(self.top_k, dim=-1).indices
        return self.last_draw


@contextlib.contextmanager
def padd_router_installed() -> Iterator[None]:
    """AutoEP layers built inside this block get a PaddRouter (restored on exit, even on error)."""
    from deepspeed.module_inject import auto_ep_layer

    saved = auto_ep_layer.TokenChoiceTopKRouter
    auto_ep_layer.TokenChoiceTopKRouter = PaddRouter
    try:
        yield
    finally:
        auto_ep_layer.TokenChoiceTopKRouter = saved


def moe_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The AutoEP MoE layers of a model (or engine), in layer order."""
    return [m for m in module.modules() if getattr(m, "_is_autoep_layer", False)]


def routers(module: torch.nn.Module) -> list[PaddRouter]:
    found = [layer.router for layer in moe_layers(module)]
    if not found or not all(isinstance(r, PaddRouter) for r in found):
        raise RuntimeError("the model has no PADD routers: build the engine inside padd_router_installed() "
                           "with DeepSpeed expert_parallel (AutoEP) enabled")
    return found


def set_routing(module: torch.nn.Module, mode: RoutingMode, record: bool | None = None, seed: int | None = None) -> None:
    """Switch every PADD router to `mode` (and keep each layer's dispatch width in step)."""
    if mode not in MODES:
        raise ValueError(f"routing mode must be one of {MODES}, got {mode!r}")
    for i, (layer, router) in enumerate(zip(moe_layers(module), routers(module))):
        router.mode, router.last_draw = mode, None
        layer.top_k = router.num_experts if mode == "uniform_all" else router.top_k
        if record is not None:
            router.record = record
            router.last_scores = None
        if seed is not None:
            router.generator.manual_seed(seed * 1009 + i)


class RoutingTrace:
    """What the routers recorded in the forwards inside `routing_trace(...)` (the last one)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def scores(self) -> list[torch.Tensor]:
        return router_scores(self.module)

    def inputs(self) -> list[torch.Tensor]:
        return router_inputs(self.module)

    def selected(self) -> list[torch.Tensor]:
        return router_selected(self.module)

    def own(self) -> list[torch.Tensor]:
        """Each layer's own top-k of the last forward: what it chose, replayed routes or not."""
        out = [r.last_own for r in routers(self.module)]
        if any(x is None for x in out):
            raise RuntimeError("no routing decisions recorded; set_routing(module, 'learned', record=True) first")
        return out


@contextlib.contextmanager
def replayed_routes(module: torch.nn.Module, per_layer: list[torch.Tensor] | None) -> Iterator[None]:
    """Route every forward inside the block (an activation-checkpoint recompute in its backward
    included) through `per_layer` [T, k] experts, rows < 0 by the router itself; None: no replay."""
    rs = routers(module)
    if per_layer is not None and len(per_layer) != len(rs):
        raise ValueError(f"routing replay: routes for {len(per_layer)} MoE layers, the model has {len(rs)}")
    for r, x in zip(rs, per_layer or [None] * len(rs)):
        r.replay = x
    try:
        yield
    finally:
        for r in rs:
            r.replay = None


@contextlib.contextmanager
def routing_trace(module: torch.nn.Module, mode: RoutingMode = "learned", inputs: bool = False,
                  seed: int | None = None) -> Iterator[RoutingTrace]:
    """Route in `mode` and record every router's scores (with their graph) and chosen experts,
    plus its inputs when `inputs`; on exit routing is learned again and nothing is kept."""
    set_routing(module, mode, record=True, seed=seed)
    keep_router_inputs(module, inputs)
    try:
        yield RoutingTrace(module)
    finally:
        keep_router_inputs(module, False)
        set_routing(module, "learned", record=False)


def keep_router_inputs(module: torch.nn.Module, on: bool) -> None:
    for r in routers(module):
        r.keep_input, r.last_input = on, None


def router_inputs(module: torch.nn.Module) -> list[torch.Tensor]:
    """Each layer's router input [T, H] from the last forward (needs keep_router_inputs(on=True))."""
    out = [r.last_input for r in routers(module)]
    if any(x is None for x in out):
        raise RuntimeError("router inputs were not kept; call keep_router_inputs(module, True) before the forward")
    return out


def router_selected(module: torch.nn.Module) -> list[torch.Tensor]:
    """Each layer's chosen experts [T, k] from the last learned-mode forward (needs record=True)."""
    out = [r.last_selected for r in routers(module)]
    if any(x is None for x in out):
        raise RuntimeError("no routing decisions recorded; set_routing(module, 'learned', record=True) first")
    return out


def router_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """A copy of every router's gate weight [N, H] (gathered under ZeRO-3; every rank calls)."""
    out = []
    for r in routers(module):
        ctx = contextlib.nullcontext()
        if hasattr(r.gate.weight, "ds_id"):
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([r.gate.weight], modifier_rank=None)
        with ctx:
            out.append(r.gate.weight.detach().float().clone())
    return out


def set_bias(module: torch.nn.Module, bias: torch.Tensor) -> None:
    """Stage IV: every layer's per-expert selection bias from `bias` [L, N]."""
    rs = routers(module)
    if tuple(bias.shape) != (len(rs), rs[0].num_experts):
        raise ValueError(f"bias must be [{len(rs)}, {rs[0].num_experts}], got {tuple(bias.shape)}")
    with torch.no_grad():
        for r, b in zip(rs, bias):
            r.padd_bias.copy_(b.to(r.padd_bias))


def router_scores(module: torch.nn.Module) -> list[torch.Tensor]:
    """Each layer's router probabilities [T, N] from the last forward (needs record=True)."""
    out = []
    for i, r in enumerate(routers(module)):
        if r.last_scores is None:
            raise RuntimeError(f"router of MoE layer {i} recorded no scores; call set_routing(..., record=True) "
                               "before the forward")
        out.append(r.last_scores)
    return out


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
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in routers(module):
        shape = getattr(r.gate.weight, "ds_shape", r.gate.weight.shape)
        out.append(torch.randn(tuple(shape), generator=g) * std)
    return out
