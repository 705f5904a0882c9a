"""Decompression: build a native transformers MoE from a dense teacher (PADD Stage I, item 6).

    moe, provenance = decompress(teacher, num_experts=8, top_k=2)
    save_decompressed(moe, provenance, "runs/x/decompressed", tokenizer)
    AutoModelForCausalLM.from_pretrained("runs/x/decompressed")   # no remote code

Each FFN layer's d_ff neurons are split into N equal clusters (`balanced_kmeans` on the
neurons' input rows). Expert j takes cluster j: its rows of gate_proj and up_proj and the
matching columns of down_proj. A SwiGLU FFN is a sum over neurons,

    down(act(gate x) * up x) = sum_n down[:, n] * act(gate[n] . x) * (up[n] . x),

so the sum of all N experts at routing weight 1 is the dense FFN, exactly (up to float
summation order). Everything else - embeddings, attention, norms, lm_head, tied or not -
is copied unchanged; student layer l takes teacher layer l (L_S = L_T, so the Stage I map
floor(l * L_T / L_S) is the identity).

Architectures:
    Qwen3ForCausalLM             -> Qwen3MoeForCausalLM (every layer sparse, norm_topk_prob)
    LlamaForCausalLM, Mistral... -> MixtralForCausalLM

Router init (`mlp.gate.weight`, [N, H]) - the paper says "from the cluster centroids" but
not which centroids. "centroids" (default): row j is the mean of cluster j's raw gate_proj
rows, so a token's router logit for expert j is the mean gate pre-activation of j's
neurons - the cluster's average "how much would these neurons open" signal. We use the raw
gate rows rather than the (normalised, gate+up) clustering points because the router acts
on the same hidden state the gate rows do, in the same units. "zeros": every logit is 0,
i.e. uniform routing (ties broken by expert index in top-k).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from padd_ds.models.clustering import ClusterResult, balanced_kmeans, neuron_points

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PROVENANCE_FILE = "padd_provenance.json"
ROUTER_INITS = ("centroids", "zeros")
CLUSTER_INPUTS = ("gate_up", "gate", "up")

_EXPERT_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")
_DENSE_FFN_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass
class _Target:
    """How one dense family maps onto a transformers MoE family."""

    moe_model_type: str
    build_config: Callable[[Any, int, int], Any]  # (teacher config, num_experts, top_k) -> MoE config
    model_class: str  # transformers class name of the MoE causal LM


def _shared_fields(tc: Any) -> dict[str, Any]:
    """Attention / norm / embedding settings both families spell the same way."""
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
             "tie_word_embeddings", "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id")
    out = {n: copy.deepcopy(getattr(tc, n)) for n in names}
    # head_dim is not always hidden / heads (Qwen3 defaults to 128): carry it explicitly.
    out["head_dim"] = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    out["rope_parameters"] = copy.deepcopy(tc.rope_parameters)
    return out


def _qwen3_moe_config(tc: Any, num_experts: int, top_k: int):
    from transformers import Qwen3MoeConfig

    layer_types = getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers
    sliding = [t == "sliding_attention" for t in layer_types]
    if any(sliding) and not all(sliding):
        raise ValueError(
            f"decompress: this Qwen3 teacher uses sliding-window attention on {sum(sliding)} of "
            f"{len(sliding)} layers (max_window_layers={getattr(tc, 'max_window_layers', None)}); Qwen3-MoE applies "
            "one window to all layers or none, so it cannot reproduce it. Use a teacher with "
            "use_sliding_window=false (or sliding on every layer)"
        )
    return Qwen3MoeConfig(
        **_shared_fields(tc),
        attention_bias=tc.attention_bias,
        use_sliding_window=all(sliding) and tc.sliding_window is not None,
        sliding_window=tc.sliding_window,
        intermediate_size=tc.intermediate_size,  # unused (no dense layers); kept as the teacher's width
        moe_intermediate_size=tc.intermediate_size // num_experts,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    )


def _mixtral_config(tc: Any, num_experts: int, top_k: int):
    from transformers import MixtralConfig

    for flag in ("attention_bias", "mlp_bias"):
        if getattr(tc, flag, False):
            raise ValueError(f"decompress: the teacher has {flag}=True but Mixtral has no such biases; "
                             "only bias-free Llama/Mistral teachers can be decompressed exactly")
    return MixtralConfig(
        **_shared_fields(tc),
        sliding_window=getattr(tc, "sliding_window", None),  # Mistral's; Llama has none
        intermediate_size=tc.intermediate_size // num_experts,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
    )


_TARGETS = {
    "qwen3": _Target("qwen3_moe", _qwen3_moe_config, "Qwen3MoeForCausalLM"),
    "llama": _Target("mixtral", _mixtral_config, "MixtralForCausalLM"),
    "mistral": _Target("mixtral", _mixtral_config, "MixtralForCausalLM"),
}
_SUPPORTED = "Qwen3ForCausalLM (-> Qwen3MoeForCausalLM), LlamaForCausalLM and MistralForCausalLM (-> MixtralForCausalLM)"


def _check_args(teacher: Any, num_experts: int, top_k: int, cluster_input: str, router_init: str) -> tuple[Any, _Target]:
    tc = getattr(teacher, "config", None)
    model_type = getattr(tc, "model_type", None)
    if model_type not in _TARGETS or not hasattr(teacher, "lm_head"):
        raise ValueError(f"decompress: teacher {type(teacher).__name__} (model_type={model_type!r}) is not supported; "
                         f"supported: {_SUPPORTED}")
    for name, v in (("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"decompress: {name} must be an integer >= 1, got {v!r}")
    if top_k > num_experts:
        raise ValueError(f"decompress: top_k={top_k} is larger than num_experts={num_experts}; "
                         "choose top_k <= num_experts")
    d_ff = tc.intermediate_size
    if d_ff % num_experts != 0:
        raise ValueError(f"decompress: the teacher's FFN width d_ff={d_ff} is not divisible by N={num_experts}; "
                         "choose a number of experts that divides the FFN width")
    if cluster_input not in CLUSTER_INPUTS:
        raise ValueError(f"decompress: cluster_input must be one of {', '.join(CLUSTER_INPUTS)}, got {cluster_input!r}")
    if router_init not in ROUTER_INITS:
        raise ValueError(f"decompress: router_init must be one of {', '.join(ROUTER_INITS)}, got {router_init!r}")
    return tc, _TARGETS[model_type]


@dataclass
class _LayerExperts:
    """The fused expert tensors of one MoE layer, built from one teacher FFN."""

    gate_up: torch.Tensor  # [N, 2I, H]: gate rows of expert j, then its up rows
    down: torch.Tensor  # [N, H, I]
    router: torch.Tensor  # [N, H]
    neurons: list[list[int]]  # teacher neuron ids of each expert, ascending
    clusters: ClusterResult


@torch.no_grad()
def _split_layer(mlp: torch.nn.Module, num_experts: int, cluster_input: str, router_init: str,
                 seed: int) -> _LayerExperts:
    gate = mlp.gate_proj.weight.detach().to("cpu", torch.float32)  # [d_ff, H]
    up = mlp.up_proj.weight.detach().to("cpu", torch.float32)  # [d_ff, H]
    down = mlp.down_proj.weight.detach().to("cpu", torch.float32)  # [H, d_ff]
    res = balanced_kmeans(neuron_points(gate, up, cluster_input), num_experts, seed=seed)
    # Expert j = cluster j, neurons in teacher order; stable sort keeps ascending ids per cluster.
    order = torch.argsort(res.assignment, stable=True).view(num_experts, -1)  # [N, I]
    gate_up = torch.cat([gate[order], up[order]], dim=1)  # [N, 2I, H]
    down_e = down[:, order].permute(1, 0, 2)  # [H, N, I] -> [N, H, I]
    router = gate[order].mean(dim=1) if router_init == "centroids" else torch.zeros(num_experts, gate.shape[1])
    return _LayerExperts(gate_up=gate_up, down=down_e, router=router, neurons=order.tolist(), clusters=res)


def _name_or_path(teacher: Any) -> str:
    return str(getattr(teacher, "name_or_path", "") or getattr(teacher.config, "_name_or_path", "") or "")


@dataclass(frozen=True)
class _Settings:
    """The decompression's knobs, in the order config.json's `padd_decompression` lists them."""

    num_experts: int
    top_k: int
    cluster_input: str
    router_init: str
    seed: int
    expert_scale: float


@torch.no_grad()
def decompress(teacher: PreTrainedModel, num_experts: int, top_k: int, cluster_input: str = "gate_up",
               seed: int = 0, router_init: str = "centroids", expert_scale: float = 1.0) -> tuple[PreTrainedModel, dict]:
    """Dense teacher -> (MoE causal LM, provenance dict). See the module docstring.

    `expert_scale` multiplies every expert's down_proj. 1: all experts at routing weight 1
    sum to the dense FFN. The trainer uses N: then the Stage I warmup's uniform router
    (weight 1/N on every expert) is exactly the teacher from its first step, and a
    normalised top-k router with equal weights gives (N/k) * (sum of the k chosen
    clusters), the unbiased estimate of the dense FFN from a random k of its N clusters.

    The MoE is built on CPU in the teacher's dtype (clustering runs in float32), in eval
    mode like a `from_pretrained` model. Layer l's clustering uses seed + l.
    """
    tc, target = _check_args(teacher, num_experts, top_k, cluster_input, router_init)
    settings = _Settings(num_experts, top_k, cluster_input, router_init, seed, expert_scale)
    moe = _empty_moe(teacher, target, settings)
    writer = _ParamWriter(moe, target.model_class)
    _copy_shared_weights(teacher, writer)
    # FFNs one layer at a time: a 7B layer's float32 expert copies are ~0.8 GB, all at once ~20 GB.
    records = [_write_experts(writer, i, layer.mlp, settings) for i, layer in enumerate(teacher.model.layers)]
    missing = [n for n in writer.params if n not in writer.written]
    if missing:
        raise ValueError(f"decompress: {target.model_class} weights {missing[:4]} have no source in the teacher "
                         f"({len(teacher.model.layers)} layers); this teacher/MoE layout is not supported")
    _copy_buffers(teacher, moe)
    if getattr(teacher, "generation_config", None) is not None:
        moe.generation_config = copy.deepcopy(teacher.generation_config)
    moe.eval()

    provenance = {
        "teacher": _name_or_path(teacher),
        "teacher_model_type": tc.model_type,
        "student_model_type": target.moe_model_type,
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_intermediate_size": tc.intermediate_size // num_experts,
        "cluster_input": cluster_input,
        "router_init": router_init,
        "seed": seed,
        "expert_scale": expert_scale,
        "layers": records,
    }
    return moe, provenance


def _empty_moe(teacher: PreTrainedModel, target: _Target, settings: _Settings) -> PreTrainedModel:
    """The MoE architecture in the teacher's dtype, weights uninitialised, config carrying the padd_* summary."""
    import transformers
    from transformers.initialization import no_init_weights

    tc = teacher.config
    dtype = next(teacher.parameters()).dtype
    config = target.build_config(tc, settings.num_experts, settings.top_k)
    config.padd_decompressed_from = _name_or_path(teacher)
    config.padd_decompression = {**asdict(settings), "provenance": PROVENANCE_FILE}
    model_cls = getattr(transformers, target.model_class)
    # Weights are all overwritten below: skip the (for a 7B model, minutes-long) random init.
    kwargs = {"attn_implementation": tc._attn_implementation} if tc._attn_implementation else {}
    with no_init_weights():
        moe = model_cls._from_config(config, dtype=dtype, **kwargs)
    moe.tie_weights()  # no_init_weights also skips init_weights(), which is where tying happens
    return moe


class _ParamWriter:
    """Copies tensors into the MoE's parameters by name, checking name and shape, and keeps
    the names written."""

    def __init__(self, moe: torch.nn.Module, model_class: str):
        self.params = dict(moe.named_parameters())
        self.model_class = model_class
        self.written: set[str] = set()

    def put(self, name: str, src: torch.Tensor) -> None:
        p = self.params.get(name)
        if p is None:
            raise ValueError(f"decompress: {self.model_class} has no parameter '{name}'; this teacher/MoE "
                             "layout is not supported")
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(f"decompress: shape mismatch for '{name}': MoE {tuple(p.shape)} vs source "
                             f"{tuple(src.shape)}; this teacher variant is not supported")
        p.copy_(src.to(device=p.device, dtype=p.dtype))
        self.written.add(name)


def _copy_shared_weights(teacher: PreTrainedModel, writer: _ParamWriter) -> None:
    """Everything outside the MoE blocks keeps its name: embeddings, attention, norms, lm_head."""
    teacher_params = dict(teacher.named_parameters())
    for name in writer.params:
        if not _EXPERT_PARAM.match(name):
            if name not in teacher_params:
                raise ValueError(f"decompress: {writer.model_class} needs '{name}' but the teacher "
                                 f"{type(teacher).__name__} has no such weight; this teacher variant is not supported")
            writer.put(name, teacher_params[name])
    left = [n for n in teacher_params if n not in writer.written and not _DENSE_FFN_PARAM.match(n)]
    if left:
        raise ValueError(f"decompress: teacher weights {left[:4]} have no counterpart in {writer.model_class}; "
                         "this teacher variant (e.g. extra biases) is not supported")


def _write_experts(writer: _ParamWriter, i: int, mlp: torch.nn.Module, settings: _Settings) -> dict:
    """Layer i's router and experts from its dense FFN; returns the layer's provenance record."""
    lx = _split_layer(mlp, settings.num_experts, settings.cluster_input, settings.router_init, settings.seed + i)
    prefix = f"model.layers.{i}.mlp."
    writer.put(prefix + "gate.weight", lx.router)
    writer.put(prefix + "experts.gate_up_proj", lx.gate_up)
    writer.put(prefix + "experts.down_proj", lx.down * settings.expert_scale)
    return {
        "student_layer": i,
        "teacher_layer": i,
        "inertia": lx.clusters.inertia,
        "kmeans_iterations": lx.clusters.iterations,
        "experts": [{"expert": j, "teacher_layer": i, "cluster": j, "neurons": ids}
                    for j, ids in enumerate(lx.neurons)],
    }


def _copy_buffers(teacher: PreTrainedModel, moe: PreTrainedModel) -> None:
    """Non-persistent buffers (rotary inv_freq) are computed in __init__; take the teacher's
    where names match so both run on identical tables."""
    teacher_buffers = dict(teacher.named_buffers())
    for name, b in moe.named_buffers():
        src = teacher_buffers.get(name)
        if src is not None and src.shape == b.shape:
            b.copy_(src.to(device=b.device, dtype=b.dtype))


def save_decompressed(model: PreTrainedModel, provenance: dict, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a loadable checkpoint: safetensors weights + config (with the padd_* summary),
    padd_provenance.json, and the tokenizer if given. Loads with
    `AutoModelForCausalLM.from_pretrained(out_dir)`, no remote code."""
    if not isinstance(provenance, dict) or "layers" not in provenance:
        raise ValueError("save_decompressed: provenance must be the dict returned by decompress()")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # transformers 5 writes safetensors only
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
