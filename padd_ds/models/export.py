"""ZeRO-3 + AutoEP engine -> native transformers checkpoint.

DeepSpeed's `zero_to_fp32` and `save_16bit_model` raise NotImplementedError for AutoEP
under ZeRO-3, so we gather ourselves: every student rank walks the parameters in the same
order, ZeRO-3 gathers each one, expert shards are all-gathered over the layer's
expert-parallel group, and rank 0 renames AutoEP's layout back to the HF one:

    mlp.router.gate.weight             -> mlp.gate.weight
    mlp.experts.w1 [E,I,H], w3 [E,I,H] -> mlp.experts.gate_up_proj [E,2I,H] (cat on dim 1)
    mlp.experts.w2 [E,H,I]             -> mlp.experts.down_proj
    mlp.gate.* (AutoEP's alias of .router) is dropped

Rank 0 streams tensors into safetensors shards, so its memory holds one shard at a time,
and checks every name and shape against the architecture built on the meta device.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from safetensors.torch import load_file, save_file

from padd_ds.launch.comm import all_reduce_
from padd_ds.launch.device import rank_device
from padd_ds.models.router import routers, routing_trace
from padd_ds.models.router import router_weights as current_router_weights  # export_engine's argument has the name

SHARD_BYTES = 4 * 1024**3
# Written next to a folded export: each MoE layer's unfolded router weight and Stage IV bias.
EXACT_ROUTING_FILE = "padd_routing.safetensors"
_EXPERT = re.compile(r"^(.*\.experts)\.(w1|w2|w3)$")
_ROUTER = re.compile(r"^(.*)\.router\.gate\.(weight|bias)$")
_SCORE_BIAS = re.compile(r"^(.*)\.router\.e_score_correction_bias$")


def has_bias_slot(module: torch.nn.Module) -> bool:
    """True when the routers carry DeepSeek-V3's selection bias (`e_score_correction_bias`):
    the Stage IV bias then exports exactly (added to it), with no fold."""
    return all(getattr(r, "e_score_correction_bias", None) is not None for r in routers(module))


def _is_expert_param(p) -> bool:
    return str(getattr(p, "group_name", "")).startswith("ep_size_")


def gather_full(engine, name: str, p) -> torch.Tensor:
    """Full tensor of one parameter on every rank (ZeRO-3 gather, then EP all-gather)."""
    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        t = p.data.detach().clone().float() if p.data.dtype != torch.float32 else p.data.detach().clone()
    t = t.to(torch.float32)
    if _is_expert_param(p):
        layer = engine.module.get_submodule(name.rsplit(".experts.", 1)[0])
        group = layer.ep_group
        ep = dist.get_world_size(group=group) if group is not None else 1
        if ep > 1:
            parts = [torch.empty_like(t) for _ in range(ep)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=0)
    return t


def hf_name_and_tensor(name: str, t: torch.Tensor, pending: dict) -> list[tuple[str, torch.Tensor]]:
    """Map one AutoEP parameter to zero or more HF tensors (w1/w3 wait for each other)."""
    m = _ROUTER.match(name)
    if m:
        return [(f"{m.group(1)}.gate.{m.group(2)}", t)]
    m = _EXPERT.match(name)
    if m:
        prefix, w = m.groups()
        if w == "w2":
            return [(f"{prefix}.down_proj", t)]
        pending.setdefault(prefix, {})[w] = t
        if len(pending[prefix]) == 2:
            d = pending.pop(prefix)
            return [(f"{prefix}.gate_up_proj", torch.cat([d["w1"], d["w3"]], dim=1))]
        return []
    return [(name, t)]


def _expected_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(hf_config)
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def fit_layout(name: str, t: torch.Tensor, want: tuple[int, ...]) -> torch.Tensor:
    """Some transformers builds store fused experts transposed ([E, H, 2I]); follow the target."""
    if tuple(t.shape) == want:
        return t
    if t.dim() == 3 and tuple(t.transpose(1, 2).shape) == want:
        return t.transpose(1, 2).contiguous()
    raise ValueError(f"export: {name} has shape {tuple(t.shape)} but the architecture expects {want}")


def export_engine(engine, out_dir: str | os.PathLike, tokenizer=None, dtype: torch.dtype = torch.float32,
                  metadata: dict | None = None, router_weights: list[torch.Tensor] | None = None) -> Path | None:
    """Write the engine's model as an HF checkpoint at `out_dir` (collective; rank 0 writes).

    `router_weights` (one [N, H] per MoE layer, e.g. from `fold_router_bias`) replace the
    routers' gate weights in the checkpoint; the engine's own router weights and Stage IV
    biases then go to `EXACT_ROUTING_FILE` beside it (see `load_exact_routing`). Returns the
    directory on rank 0, None elsewhere.
    The write goes to a temp dir that is renamed at the end, so a crash never leaves a
    checkpoint that looks complete.
    """
    rank = dist.get_rank()
    hf_config = engine.module.config
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    expected = _expected_shapes(hf_config) if rank == 0 else {}
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    shards = _ShardWriter(tmp)
    routing = _write_parameters(engine, shards, expected, dtype, router_weights, write=rank == 0)
    if rank != 0:
        dist.barrier()
        return None

    _finish_shards(engine.module, shards, expected, dtype)
    _save_config(hf_config, dtype, tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if routing:
        save_file(routing, str(tmp / EXACT_ROUTING_FILE), metadata={"format": "pt"})
    (tmp / "padd_export.json").write_text(json.dumps(metadata or {}, indent=2, default=str))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    dist.barrier()
    return out_dir


def write_weights(engine, folder: Path | None, dtype: torch.dtype) -> None:
    """Collective: every student rank gathers each parameter, and each rank given a `folder`
    writes the whole model there (HF names and layout, safetensors shards, config.json), with
    the routers as they are (no fold). The vLLM weight sync: several ranks may write, one copy
    per rollout engine."""
    write = folder is not None
    expected = _expected_shapes(engine.module.config) if write else {}
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    shards = _ShardWriter(folder)
    _write_parameters(engine, shards, expected, dtype, None, write=write)
    if write:
        _finish_shards(engine.module, shards, expected, dtype)
        _save_config(engine.module.config, dtype, folder)


def _finish_shards(module: torch.nn.Module, shards: "_ShardWriter", expected: dict[str, tuple[int, ...]],
                   dtype: torch.dtype) -> None:
    """The last shard (with DeepSeek-V3's selection biases), every expected tensor present, HF shard names."""
    _write_score_biases(module, shards, expected, dtype)
    shards.flush()
    tied = getattr(module.config, "tie_word_embeddings", False)
    missing = [k for k in expected if k not in shards.weight_map and not (tied and k == "lm_head.weight")]
    if missing:
        raise ValueError(f"export: the engine has no tensor for {missing[:5]} ({len(missing)} missing)")
    shards.name_shards()


class _ShardWriter:
    """Streams tensors into safetensors shards of about SHARD_BYTES in `folder`, so memory
    holds one shard at a time; `name_shards` gives them the HF names once their number is known."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = 0
        self.shards: list[str] = []
        self.weight_map: dict[str, str] = {}  # tensor name -> shard file

    def add(self, name: str, t: torch.Tensor, flush_when_full: bool = True) -> None:
        self.shard[name] = t.cpu()  # gathered on the rank's device; the shard waits on the host
        self.shard_bytes += t.numel() * t.element_size()
        if flush_when_full and self.shard_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.shard:
            fname = f"model-{len(self.shards) + 1:05d}.safetensors"
            save_file(self.shard, str(self.folder / fname), metadata={"format": "pt"})
            self.shards.append(fname)
            self.weight_map.update({k: fname for k in self.shard})
            self.shard, self.shard_bytes = {}, 0

    def name_shards(self) -> None:
        n = len(self.shards)
        renames = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
                   for i, f in enumerate(self.shards)}
        for old, new in renames.items():
            os.replace(self.folder / old, self.folder / new)
        if n > 1:
            index = {"metadata": {"total_size": sum((self.folder / f).stat().st_size for f in renames.values())},
                     "weight_map": {k: renames[v] for k, v in self.weight_map.items()}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_parameters(engine, shards: _ShardWriter, expected: dict[str, tuple[int, ...]], dtype: torch.dtype,
                      router_weights: list[torch.Tensor] | None, write: bool) -> dict[str, torch.Tensor]:
    """Every parameter in HF layout into `shards` (collective: every rank gathers, the ranks
    with `write` write). Returns, for a folded export, the engine's own routers for
    `EXACT_ROUTING_FILE`."""
    module = engine.module
    router_names = [n for n, _ in module.named_parameters() if _ROUTER.match(n) and n.endswith(".weight")]
    if router_weights is not None and len(router_weights) != len(router_names):
        raise ValueError(f"export: {len(router_weights)} router weights for {len(router_names)} MoE layers")
    replace = dict(zip(router_names, router_weights or []))
    pending: dict = {}
    routing: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        t = gather_full(engine, name, p)
        if not write:
            continue
        if name in replace:
            prefix = _ROUTER.match(name).group(1)
            routing[f"{prefix}.gate.weight"] = t.to(dtype).cpu().contiguous()
            bias = module.get_submodule(f"{prefix}.router").padd_bias
            routing[f"{prefix}.gate.padd_bias"] = bias.detach().float().cpu()
            t = replace[name].to(t)
        for hf_name, ht in hf_name_and_tensor(name, t, pending):
            if hf_name not in expected:
                raise ValueError(f"export: engine parameter {name} maps to '{hf_name}', which the "
                                 f"{type(module).__name__} architecture does not have")
            shards.add(hf_name, fit_layout(hf_name, ht, expected[hf_name]).to(dtype).contiguous())
    if pending:
        raise ValueError(f"export: unpaired expert weights for {sorted(pending)}")
    return routing


def score_biases(module: torch.nn.Module):
    """(engine buffer name, HF name, fp32 host tensor) of each DeepSeek-V3 selection bias. It is
    a buffer: selection there is top-k(scores + e_score_correction_bias), ours top-k(scores +
    padd_bias + e_score_correction_bias), so their sum in the slot reproduces the engine's routes."""
    for name, buf in module.named_buffers():
        m = _SCORE_BIAS.match(name)
        if m is not None:
            padd = module.get_submodule(name.rsplit(".", 1)[0]).padd_bias
            yield name, f"{m.group(1)}.gate.e_score_correction_bias", buf.detach().float().cpu() + padd.detach().float().cpu()


def _write_score_biases(module: torch.nn.Module, shards: _ShardWriter, expected: dict[str, tuple[int, ...]],
                        dtype: torch.dtype) -> None:
    for name, hf_name, bias in score_biases(module):
        if hf_name not in expected:
            raise ValueError(f"export: engine buffer {name} maps to '{hf_name}', which the architecture does not have")
        shards.add(hf_name, bias.to(dtype).contiguous(), flush_when_full=False)  # they join the last shard


def _save_config(hf_config, dtype: torch.dtype, folder: Path) -> None:
    cfg = hf_config.__class__.from_dict(hf_config.to_dict())
    if hasattr(cfg, "output_router_logits"):
        cfg.output_router_logits = False
    cfg.dtype = str(dtype).replace("torch.", "")
    cfg.save_pretrained(folder)


# ----------------------------------------------------------------------------------------
# Stage IV bias: fold it into the router when the architecture has no slot for it
# ----------------------------------------------------------------------------------------

def fold_router_bias(engine, batches: list, max_tokens: int = 4096, iters: int = 100
                     ) -> tuple[list[torch.Tensor] | None, list]:
    """Router weights W' whose plain top-k reproduces the engine's biased choice, or None
    when every bias is zero (the checkpoint is then exact as it is).

    Qwen3-MoE and Mixtral routers have no bias slot: they pick top-k of softmax(W x), while
    the engine picks top-k of p + b with p = softmax(W x). The fold fits W' (starting from W)
    so that softmax(W' x) matches the biased distribution q = (p + b)+ / sum on held-out
    router inputs: min_W' sum_tokens KL(q || softmax(W' x)), a convex softmax regression
    solved with L-BFGS. KL weights each expert by q, so the fit is most accurate where
    selection happens (the top of q) and ignores the order of experts nobody picks. Its
    quality is measured by the caller as routing fidelity (same top-k set per token and
    layer). Collective: every student rank passes its own `batches` (TokenBatch list); the
    loss and gradients are summed over ranks, so every rank ends with the same W'. Returns
    (weights, the engine's choices on this rank's batches [batch][layer] -> [T, k]).
    """
    biases = torch.stack([r.padd_bias.detach().float().cpu() for r in routers(engine.module)])
    xs, qs, chosen = _biased_targets(engine, batches, biases)
    current = current_router_weights(engine.module)  # collective under ZeRO-3: before any early return
    if not bool((biases != 0).any()):
        return None, chosen
    folded = [_fit_router(torch.cat(x)[:max_tokens], torch.cat(q)[:max_tokens], w, iters)
              for x, q, w in zip(xs, qs, current)]
    return folded, chosen


@torch.no_grad()
def _biased_targets(engine, batches: list, biases: torch.Tensor) -> tuple[list, list, list]:
    """Per MoE layer, the router inputs x [T, H] and biased targets q [T, N] of every real
    token of `batches` (one tensor per batch), and the engine's choices [batch][layer]."""
    n_layers = biases.shape[0]
    xs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    qs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    chosen = []
    was_training = engine.module.training
    engine.eval()
    with routing_trace(engine.module, inputs=True) as trace:
        for b in batches:
            b = b.to(rank_device())
            engine(input_ids=b.ids, attention_mask=b.attention_mask)
            valid = b.attention_mask.bool().reshape(-1)
            for l, (x, p) in enumerate(zip(trace.inputs(), trace.scores())):
                q = (p.float() + biases[l].to(p.device)).clamp(min=1e-6)
                xs[l].append(x[valid].float())
                qs[l].append((q / q.sum(-1, keepdim=True))[valid])
            chosen.append([s.clone() for s in trace.selected()])
    engine.train(was_training)
    return xs, qs, chosen


def _fit_router(x: torch.Tensor, q: torch.Tensor, w0: torch.Tensor, iters: int) -> torch.Tensor:
    """argmin_W sum_tokens KL(q || softmax(W x)) from W = w0 by L-BFGS, with the loss and
    gradient summed over ranks (collective), so every rank ends with the same W."""
    n_tok = torch.tensor([float(x.shape[0])], dtype=torch.float64)
    all_reduce_(n_tok)
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(x @ w.T, dim=-1)
        loss = -(q * logp).sum() / float(n_tok)
        loss.backward()
        packed = torch.cat([loss.detach().reshape(1), w.grad.reshape(-1)]).double()
        all_reduce_(packed)  # every rank sees the global loss and gradient
        w.grad.copy_(packed[1:].view_as(w.grad).to(w.grad.dtype))
        return packed[0].to(loss.dtype)

    opt.step(closure)
    return w.detach().clone()


@torch.no_grad()
def engine_routes(engine, batches: list) -> list[list[torch.Tensor]]:
    """The engine's chosen experts [batch][layer] -> [T, k] on this rank's `batches` (collective)."""
    was_training = engine.module.training
    engine.eval()
    out = []
    with routing_trace(engine.module) as trace:
        for b in batches:
            b = b.to(rank_device())
            engine(input_ids=b.ids, attention_mask=b.attention_mask)
            out.append([s.clone() for s in trace.selected()])
    engine.train(was_training)
    return out


def same_experts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[T] bool: token t chose the same set of experts in `a` and `b` ([T, k] ids, any order)."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


@torch.no_grad()
def routing_fidelity(hf_model, batches: list, engine_choices: list) -> float:
    """Fraction of (token, MoE layer) pairs whose top-k expert set in `hf_model` equals the
    engine's (`engine_choices` from `engine_routes`, on the same batches). The experts are
    read from what each transformers router returns (logits, weights, chosen ids), not
    re-derived from the logits: selection biases (DeepSeek-V3's, `load_exact_routing`'s)
    change the choice without changing the logits."""
    chosen: list[torch.Tensor] = []
    gates = [m for name, m in hf_model.named_modules() if name.endswith(".mlp.gate")]
    hooks = [g.register_forward_hook(lambda m, a, o: chosen.append(o[2].reshape(-1, o[2].shape[-1]))) for g in gates]
    same = total = 0
    try:
        for b, eng in zip(batches, engine_choices):
            chosen.clear()
            b = b.to(rank_device())
            hf_model(input_ids=b.ids, attention_mask=b.attention_mask)
            if len(chosen) != len(eng):
                raise RuntimeError(f"routing fidelity: the exported model ran {len(chosen)} routers, the engine "
                                   f"{len(eng)} MoE layers")
            valid = b.attention_mask.bool().reshape(-1)
            for mine, theirs in zip(chosen, eng):
                same += int(same_experts(mine, theirs)[valid].sum())
                total += int(valid.sum())
    finally:
        for h in hooks:
            h.remove()
    return same / max(total, 1)


# ----------------------------------------------------------------------------------------
# Exact routing for a folded export
# ----------------------------------------------------------------------------------------

def load_exact_routing(model: torch.nn.Module, export_dir: str | os.PathLike) -> torch.nn.Module:
    """Make `model` (loaded from a folded export with `from_pretrained`) route exactly like
    the engine: restore each router's unfolded weight from `EXACT_ROUTING_FILE` and add the Stage
    IV bias to the scores before top-k, with the combine weights from the unbiased scores
    (PaddRouter's rule). A forward hook on each transformers router does it, so the model
    stays a plain transformers model (no remote code). Supports the routers of Qwen3-MoE,
    Mixtral and DeepSeek-V2 (greedy and group-limited); DeepSeek-V3 exports are exact
    without this. Returns `model`; a no-op when the export has no routing file (no bias)."""
    path = Path(export_dir) / EXACT_ROUTING_FILE
    if not path.exists():
        return model
    state = load_file(str(path))
    biased = sorted(k[: -len(".padd_bias")] for k in state if k.endswith(".padd_bias"))
    for prefix in biased:
        gate = model.get_submodule(prefix)
        with torch.no_grad():
            gate.weight.copy_(state[f"{prefix}.weight"].to(gate.weight))
        gate.register_forward_hook(biased_selection(model.config, state[f"{prefix}.padd_bias"]))
    return model


def biased_selection(config, bias: torch.Tensor):
    """Forward hook for a transformers router returning (logits, top-k weights, top-k ids):
    experts chosen on softmax + `bias`, weighted by the unbiased scores (PaddRouter's rule)."""
    cfg = config.get_text_config()
    kind = cfg.model_type
    if kind not in ("qwen3_moe", "mixtral", "deepseek_v2"):
        raise ValueError(f"no exact routing for model_type '{kind}' (supported: qwen3_moe, mixtral, deepseek_v2; "
                         "deepseek_v3 carries the bias in its own e_score_correction_bias)")
    norm = {"qwen3_moe": bool(getattr(cfg, "norm_topk_prob", False)), "mixtral": True, "deepseek_v2": False}[kind]
    scale = float(getattr(cfg, "routed_scaling_factor", 1.0)) if kind == "deepseek_v2" else 1.0
    groups = ((cfg.n_group, cfg.topk_group) if kind == "deepseek_v2" and cfg.topk_method == "group_limited_greedy"
              else None)

    def hook(module, args, out):
        logits = out[0]
        scores = logits.float().softmax(dim=-1)
        choice = scores + bias.to(scores.device)
        if groups is not None:  # DeepSpeed's node-limited rule: groups ranked by their best biased score
            n_group, top_groups = groups
            grouped = choice.view(choice.shape[0], n_group, -1)
            keep = grouped.max(dim=-1).values.topk(top_groups, dim=-1).indices
            mask = torch.ones(grouped.shape[:2], dtype=torch.bool, device=choice.device).scatter_(1, keep, False)
            choice = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).view_as(choice)
        selected = choice.topk(out[2].shape[-1], dim=-1).indices
        weights = scores.gather(1, selected)
        if norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, (weights * scale).to(out[1].dtype), selected

    return hook
