"""Will this recipe fit this cluster? Per-GPU memory, divisibility and speed, before any launch.

    padd plan --recipe recipes/qwen25_72b_to_qwen3_30b_a3b.yaml --nodes 8 --gpus-per-node 8 --gpu-mem-gb 80

    cluster = Cluster(nodes=8, gpus_per_node=8, gpu_memory_gb=80)
    plan = make_plan(cfg, cluster)         # arithmetic on model shapes: no weights, no network
    print(plan.report())                   # last line: PLAN fits=<true|false> peak_gpu_gb=<x>
                                           #   [rollout_tok_s=<x> step_s=<y>] (train.mode=padd, GPUs)

Model shapes come from a local model's config.json, else from the Hugging Face cache, else
from KNOWN_CONFIGS below (the published config.json values of the models our recipes name).
The memory model follows what this code base actually runs (see each term's comment):
students train with DeepSpeed ZeRO (stage and offload from the DeepSpeed JSON) and AutoEP,
with or without activation checkpointing (train.activation_checkpointing); teachers score
full sequences in one forward without a KV cache, with full-vocabulary logits at every real
position before compressing them.
GB means 10^9 bytes throughout.

Speed: training from FLOPs at an MFU; in train.mode=padd the rollout phase from a decode model
per rollout.backend (`decode_hf`, `decode_gathered`, `decode_vllm`). Decoding is memory-bound:
a step reads the weights it uses (an MoE batch of n tokens touches E(1 - (1 - k/E)^n) experts
per layer, uniform routing) and the KV cache (at the mean context) over HBM; `hf` adds the
per-step ZeRO-3 gather over the links and its collectives, `hf_gathered` one gather per phase,
vllm a weight sync per phase and, when an engine's KV cache cannot hold its group's sequences,
waves. A phase is data.max_response_tokens steps (the worst case). Spec-sheet rates, no
efficiency factor and no kernel-launch or Python overhead: the times are lower bounds. The
report's last line then gains `rollout_tok_s=<x> step_s=<y>` for the configured backend. An
hf_gathered plan must also hold the whole student and its rollout KV cache beside the training
state, a vllm plan its engines' weights beside it. docs/cluster.md has the
assumptions and the 72B recipe's numbers.

`train.py` runs `plan_for_launch` on every rank before any process group exists and refuses
a plan that cannot fit (on CPU the "device" is this host's RAM, shared by its processes).

This module imports neither torch nor deepspeed (the CLI plans in a second).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from padd_ds.config import ConfigError, PaddConfig, accumulation_steps, rollout_batch_size, rollout_layout_problem
from padd_ds.engine.ds_config import read_deepspeed_config
from padd_ds.launch.roles import expand_tasks_per_node
from padd_ds.models.arch import expert_count, expert_parallel_size, model_field, uses_bf16
from padd_ds.models.files import read_model_config, resolve_model_path
from padd_ds.paths import REPO_ROOT
from padd_ds.validate import expert_groups_problem, experts_problem, positions_problem, teacher_split_problem

GB = 1e9

# --------------------------------------------------------------------------------------
# Published shapes of the models our recipes name (so planning needs no network)
# --------------------------------------------------------------------------------------
# Each entry holds the fields of the model's config.json on the Hugging Face hub that the
# planner reads, with the same names, so one parser serves these and local checkpoints. The
# parameter counts they give are checked against the published totals in tests/test_plan.py.

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    # huggingface.co/Qwen/Qwen2.5-Math-7B/blob/main/config.json (7.6B; 4k context, rope 10k)
    "Qwen/Qwen2.5-Math-7B": {
        "model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "max_position_embeddings": 4096, "tie_word_embeddings": False},
    # huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/config.json (72.7B, 70.0B non-embedding)
    "Qwen/Qwen2.5-72B-Instruct": {
        "model_type": "qwen2", "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 29568,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
        "max_position_embeddings": 32768, "tie_word_embeddings": False},
    # huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json (30.5B total, 3.3B activated;
    # head_dim 128 with 32 heads, so q_proj is 2048 -> 4096)
    "Qwen/Qwen3-30B-A3B": {
        "model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048, "intermediate_size": 6144,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "max_position_embeddings": 40960, "tie_word_embeddings": False},
    # huggingface.co/deepseek-ai/deepseek-math-7b-base/blob/main/config.json (6.9B, Llama
    # architecture, 4k context); the -instruct and -rl variants share it
    "deepseek-ai/deepseek-math-7b-base": {
        "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 4096, "intermediate_size": 11008,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 102400,
        "max_position_embeddings": 4096, "tie_word_embeddings": False},
    # huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json (15.7B total, 2.4B
    # activated): MLA without q compression, layer 0 dense (10944 wide), then 64 routed + 2
    # shared experts of 1408, top-6
    "deepseek-ai/DeepSeek-V2-Lite": {
        "model_type": "deepseek_v2", "num_hidden_layers": 27, "hidden_size": 2048, "intermediate_size": 10944,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 102400,
        "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "moe_intermediate_size": 1408, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "max_position_embeddings": 163840, "tie_word_embeddings": False},
}
# Same architecture, another checkpoint.
for _alias, _base in {"Qwen/Qwen2.5-Math-7B-Instruct": "Qwen/Qwen2.5-Math-7B",
                      "Qwen/Qwen2.5-72B": "Qwen/Qwen2.5-72B-Instruct",
                      "Qwen/Qwen3-30B-A3B-Base": "Qwen/Qwen3-30B-A3B",
                      "deepseek-ai/deepseek-math-7b-instruct": "deepseek-ai/deepseek-math-7b-base",
                      "deepseek-ai/deepseek-math-7b-rl": "deepseek-ai/deepseek-math-7b-base",
                      "deepseek-ai/DeepSeek-V2-Lite-Chat": "deepseek-ai/DeepSeek-V2-Lite"}.items():
    KNOWN_CONFIGS[_alias] = KNOWN_CONFIGS[_base]


# --------------------------------------------------------------------------------------
# Architecture: parameter counts, activations, KV cache
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """The shape numbers that memory and FLOPs depend on, for HF decoder-only LMs
    (Llama/Qwen2/Qwen3 dense, Qwen3-MoE/Qwen2-MoE/Mixtral, DeepSeek-V2 with MLA)."""

    name: str
    model_type: str
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int                 # FFN width of dense layers
    tied_embeddings: bool = False
    qkv_bias: bool = False            # Qwen2: bias on q, k, v
    o_bias: bool = False              # Llama attention_bias=true: bias on o_proj too
    qk_norm: bool = False             # Qwen3: RMSNorm over each head of q and k
    experts: int = 0                  # routed experts; 0 = dense model
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0      # total width of the always-on shared expert(s)
    shared_gate: bool = False         # Qwen2-MoE: sigmoid gate on the shared expert
    moe_layers: int = 0               # layers with routed experts (the others are dense)
    # Multi-head latent attention (DeepSeek-V2); kv_lora_rank 0 = ordinary attention.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    max_positions: int | None = None

    # -- widths --------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim if self.kv_lora_rank else self.head_dim)

    @property
    def k_dim(self) -> int:
        return self.q_dim if self.kv_lora_rank else self.kv_heads * self.head_dim

    @property
    def v_dim(self) -> int:
        return self.heads * self.v_head_dim if self.kv_lora_rank else self.kv_heads * self.head_dim

    @property
    def attn_out_dim(self) -> int:
        return self.heads * self.v_head_dim if self.kv_lora_rank else self.heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    # -- parameters (exact for the HF implementations; tests compare with transformers) ---
    def attention_params(self) -> int:
        h = self.hidden
        if self.kv_lora_rank:
            q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.q_dim if self.q_lora_rank
                 else h * self.q_dim)
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank  # + its RMSNorm
            kv_b = self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv_a + kv_b + self.attn_out_dim * h
        qkv = h * (self.q_dim + 2 * self.k_dim)
        if self.qkv_bias or self.o_bias:
            qkv += self.q_dim + 2 * self.k_dim
        o = self.attn_out_dim * h + (h if self.o_bias else 0)
        norms = 2 * self.head_dim if self.qk_norm else 0
        return qkv + o + norms

    def dense_ffn_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def expert_params(self) -> int:
        """One routed expert (SwiGLU: gate, up, down)."""
        return 3 * self.hidden * self.expert_intermediate

    def moe_non_expert_params(self) -> int:
        """Router, shared expert(s) and their gate in one MoE layer."""
        h = self.hidden
        return h * self.experts + 3 * h * self.shared_intermediate + (h if self.shared_gate else 0)

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def routed_expert_params(self) -> int:
        return self.moe_layers * self.experts * self.expert_params()

    def total_params(self) -> int:
        per_layer = self.attention_params() + 2 * self.hidden  # + input and post-attention RMSNorm
        ffn = self.dense_layers * self.dense_ffn_params() + self.moe_layers * self.moe_non_expert_params()
        return (self.layers * per_layer + ffn + self.routed_expert_params() + self.embedding_params()
                + self.lm_head_params() + self.hidden)

    def active_params(self) -> int:
        """Parameters that touch one token, the input embedding included (the convention of
        the "3.3B activated" style numbers)."""
        routed_inactive = self.moe_layers * (self.experts - self.top_k) * self.expert_params()
        return self.total_params() - routed_inactive

    def forward_flops_per_token(self, context: int) -> float:
        """Matmul FLOPs of one token's forward: 2 per active weight (the embedding lookup is
        free) plus attention scores and values over `context` earlier tokens."""
        weights = 2 * (self.active_params() - self.embedding_params()
                       + (self.embedding_params() if self.tied_embeddings else 0))
        attention = 2 * self.layers * context * (self.q_dim + self.attn_out_dim)  # q.k and p.v per head
        return float(weights + attention)

    # -- activations (training) -------------------------------------------------------------
    def train_activation_bytes_per_token(self, elem: int) -> float:
        """Bytes one token leaves saved for backward in the decoder layers without activation
        checkpointing: every layer's (`_layer_activation_bytes`) and the final RMSNorm's.
        tests/test_plan.py compares this with the tensors autograd really saves."""
        per_layer, dense, moe = self._layer_activation_bytes(elem)
        return float(self.layers * per_layer + self.dense_layers * dense + self.moe_layers * moe
                     + self.hidden * (4 + elem))

    def checkpointed_activation_bytes_per_token(self, elem: int) -> float:
        """The same with activation checkpointing: each decoder layer's input (one hidden state
        per layer boundary, what the checkpoint keeps), the final RMSNorm's, and the largest
        layer's full activations while its backward recomputes it."""
        per_layer, dense, moe = self._layer_activation_bytes(elem)
        largest = per_layer + max(dense if self.dense_layers else 0.0, moe if self.moe_layers else 0.0)
        return float(self.layers * self.hidden * elem + largest + self.hidden * (4 + elem))

    def _layer_activation_bytes(self, elem: int) -> tuple[float, float, float]:
        """What one token saves in one decoder layer with `elem`-byte activations (2 in bf16), as
        HF's modules save them: (attention + the two RMSNorms, a dense FFN, an MoE FFN).
        - each RMSNorm of width w keeps an fp32 copy of its input and its output: w(4 + elem);
        - attention keeps the q/k projections (or their norms), RoPE's rotated copies and the
          rotated q/k, v, and its output (o_proj's input); MLA also its latent projections;
        - a dense SwiGLU FFN keeps gate, act(gate), up and their product: 4I;
        - an MoE layer keeps each of the top-k copies of the token going in and coming out
          (2kh), 4 widths per chosen expert and per shared expert, and fp32 router logits and
          probabilities (8E bytes; DeepSeek-V2's router also an fp32 copy of the token)."""
        h, k = self.hidden, self.top_k
        norm = lambda width: width * (4 + elem)  # noqa: E731
        if self.kv_lora_rank:
            latent = self.kv_lora_rank + self.qk_rope_head_dim
            projections = self.q_dim + latent + self.heads * (self.qk_nope_head_dim + self.v_head_dim)
            rope = (self.heads + 1) * self.qk_rope_head_dim
            attn = elem * (projections + rope + self.q_dim + self.k_dim + self.v_dim + self.attn_out_dim)
            attn += norm(self.kv_lora_rank) + (norm(self.q_lora_rank) if self.q_lora_rank else 0)
        else:
            qk = self.q_dim + self.k_dim
            attn = elem * ((0 if self.qk_norm else qk) + 2 * qk + self.v_dim + self.attn_out_dim)
            attn += norm(qk) if self.qk_norm else 0
        dense = elem * 4 * self.intermediate
        moe = elem * (2 * k * h + 4 * k * self.expert_intermediate + 4 * self.shared_intermediate) + 8 * self.experts
        if self.model_type == "deepseek_v2":
            moe += 4 * h  # its router multiplies an fp32 copy of the token
        return float(attn + 2 * norm(h)), float(dense), float(moe)

    def kv_cache_bytes_per_token(self, elem: int) -> float:
        """HF's cache holds each layer's keys and values (DeepSeek-V2 in transformers caches
        the decompressed per-head K and V, not the latent)."""
        return float(self.layers * (self.k_dim + self.v_dim) * elem)

    # -- decoding ------------------------------------------------------------------------------
    def touched_expert_fraction(self, tokens: int) -> float:
        """Expected share of one MoE layer's experts that `tokens` tokens route to, each choosing
        top_k of E uniformly (what Stage IV's balancing aims for; skewed routing touches fewer):
        1 - (1 - k/E)^tokens. One token reads k/E of them; a large batch approaches all."""
        if not self.is_moe or tokens <= 0:
            return 0.0
        return 1.0 - max(0.0, 1.0 - self.top_k / self.experts) ** tokens

    def decode_read_params(self, tokens: int, expert_share: float = 1.0) -> float:
        """Parameters one decode step reads for `tokens` sequences on a device that holds
        `expert_share` of each layer's experts: everything but the routed experts (the input
        embedding only when tied, as the LM head; a lookup reads a few rows), plus the held
        experts the batch touches."""
        non_expert = self.total_params() - self.routed_expert_params() - (
            0 if self.tied_embeddings else self.embedding_params())
        return non_expert + self.routed_expert_params() * expert_share * self.touched_expert_fraction(tokens)

    def inference_transient_bytes_per_token(self, elem: int) -> float:
        """The largest per-layer temporaries of a no-grad forward: the FFN's gate, up and
        product (3 widths; top-k experts and the shared one in an MoE) plus q, k, v, output."""
        ffn = 3 * (self.intermediate if self.dense_layers else 0)
        if self.is_moe:
            ffn = max(ffn, 3 * (self.top_k * self.expert_intermediate + self.shared_intermediate) + 2 * self.top_k * self.hidden)
        return float((ffn + self.q_dim + self.k_dim + self.v_dim + 3 * self.hidden) * elem)

    def largest_module_params(self, local_experts: int) -> int:
        """Largest single module ZeRO-3 gathers at once: the embedding, the LM head, one
        layer's attention, dense FFN, or the experts of one MoE layer held by this rank."""
        units = [self.embedding_params(), self.lm_head_params(), self.attention_params()]
        if self.dense_layers:
            units.append(self.dense_ffn_params())
        if self.is_moe:
            units.append(local_experts * self.expert_params() + self.moe_non_expert_params())
        return max(units)


def arch_from_config(conf: Mapping[str, Any], name: str) -> Arch:
    """An `Arch` from the fields of an HF config.json (multimodal configs: text_config)."""
    f = lambda key, default=None: (v if (v := model_field(conf, key)) is not None else default)  # noqa: E731
    model_type = str(f("model_type", ""))
    try:
        hidden, layers, vocab = int(f("hidden_size")), int(f("num_hidden_layers")), int(f("vocab_size"))
        heads = int(f("num_attention_heads"))
    except TypeError:
        raise ConfigError(f"{name}: config.json lacks hidden_size, num_hidden_layers, vocab_size or "
                          "num_attention_heads; the planner needs a decoder-only LM config") from None
    kv_heads = int(f("num_key_value_heads", heads))
    head_dim = int(f("head_dim", hidden // heads))
    experts = expert_count(conf)
    top_k = int(f("num_experts_per_tok", 0)) if experts else 0
    moe_width = int(f("moe_intermediate_size", 0) or 0)
    if experts and not moe_width:  # Mixtral: every expert is an intermediate_size-wide FFN
        moe_width = int(f("intermediate_size"))
    intermediate = int(f("intermediate_size", 0) or 0)
    shared = 0
    if f("n_shared_experts"):
        shared = int(f("n_shared_experts")) * moe_width
    elif f("shared_expert_intermediate_size"):
        shared = int(f("shared_expert_intermediate_size"))
    moe_layers = 0
    if experts:
        if "first_k_dense_replace" in conf or f("first_k_dense_replace") is not None:
            first, freq = int(f("first_k_dense_replace", 0)), int(f("moe_layer_freq", 1))
            moe_layers = sum(1 for i in range(layers) if i >= first and i % freq == 0)
        else:
            dense_ids = set(f("mlp_only_layers", []) or [])
            step = int(f("decoder_sparse_step", 1) or 1)
            moe_layers = sum(1 for i in range(layers) if i not in dense_ids and (i + 1) % step == 0)
    attention_bias = bool(f("attention_bias", False))
    kv_lora = int(f("kv_lora_rank", 0) or 0)
    return Arch(
        name=name, model_type=model_type, layers=layers, hidden=hidden, vocab=vocab, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, intermediate=intermediate,
        tied_embeddings=bool(f("tie_word_embeddings", False)),
        qkv_bias=model_type in ("qwen2", "qwen2_moe") or attention_bias,
        o_bias=attention_bias and model_type not in ("qwen2", "qwen2_moe"),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        experts=experts, top_k=top_k, expert_intermediate=moe_width if experts else 0,
        shared_intermediate=shared, shared_gate=model_type == "qwen2_moe" and shared > 0, moe_layers=moe_layers,
        q_lora_rank=int(f("q_lora_rank", 0) or 0), kv_lora_rank=kv_lora,
        qk_nope_head_dim=int(f("qk_nope_head_dim", 0) or 0), qk_rope_head_dim=int(f("qk_rope_head_dim", 0) or 0),
        v_head_dim=int(f("v_head_dim", 0) or 0), max_positions=f("max_position_embeddings"),
    )


def decompressed(teacher: Arch, experts: int, top_k: int) -> Arch:
    """The MoE that Stage I builds from a dense teacher: each FFN split into `experts` equal
    neuron clusters; attention, embeddings and widths otherwise unchanged."""
    return dataclasses.replace(teacher, name=f"{teacher.name} decompressed", experts=experts, top_k=top_k,
                               expert_intermediate=teacher.intermediate // experts, moe_layers=teacher.layers)


def _cached_hub_config(repo_id: str) -> dict | None:
    """config.json of a hub model already in the local HF cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    path = try_to_load_from_cache(repo_id, "config.json")
    return read_model_config(Path(path).parent) if isinstance(path, str) else None


def load_arch(ref: str, field_name: str) -> Arch:
    """Shape of the model a config field names: local directory, HF cache, or the table."""
    resolved = resolve_model_path(ref, field_name=field_name)
    if Path(resolved).is_dir():
        return arch_from_config(read_model_config(resolved), ref)
    conf = _cached_hub_config(resolved) or KNOWN_CONFIGS.get(resolved)
    if conf is None:
        raise ConfigError(f"{field_name}: the planner does not know the shape of '{ref}' and it is not in the "
                          "local Hugging Face cache; download it (huggingface-cli download "
                          f"{ref} config.json) or point {field_name} at a local directory")
    return arch_from_config(conf, ref)


# --------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------

# Memory no estimate here covers: the CUDA context (~0.5-1 GB), NCCL buffers (~1 GB with 8
# GPUs a node) and caching-allocator fragmentation. 4 GB of 80 is the margin we keep free.
GPU_RESERVE_GB = 4.0
# A CPU rank's Python, torch, DeepSpeed, transformers, gloo and tokenizer before any model
# (their imports take about 0.3 GB; 1 GB leaves room for buffers and the data).
CPU_PROCESS_GB = 1.0
# H100 SXM dense bf16 peak, the usual 80 GB training GPU; A100 is 312.
DEFAULT_PEAK_TFLOPS = 989.0
# Model-FLOPs utilization for the speed estimate: mid-range for bf16 MoE training with
# ZeRO-3 gathers and all-to-all. It prices training only: rollouts decode, which is bound by
# bytes, not FLOPs (the decode model below). Measure yours and pass --mfu.
DEFAULT_MFU = 0.30
# Decoding is bound by memory and links, not FLOPs (one token per sequence per step): the
# rollout model reads bytes at these spec-sheet rates, per GPU and direction. No efficiency
# factor is applied, so every rollout time is a lower bound.
H100_HBM_TBPS = 3.35      # H100 SXM5 80 GB: HBM3, 3.35 TB/s
H200_HBM_TBPS = 4.8       # H200 141 GB: HBM3e, 4.8 TB/s (picked for GPUs of more than 100 GB)
NVLINK_GBPS = 450.0       # NVLink 4 (H100/H200 SXM): 900 GB/s per GPU both ways together, 450 each way
IB_GBPS = 50.0            # one 400 Gb/s NDR InfiniBand HCA per GPU (DGX/HGX H100, H200): 50 GB/s each way
# One small NCCL collective (a module's all-gather, an all-to-all of a few tokens): ~10 us within
# a node, tens of us across nodes.
COLLECTIVE_LATENCY_S = 30e-6


@dataclass(frozen=True)
class Hardware:
    """Per-GPU rates the decode model reads bytes at (bytes per second, one direction)."""
    name: str
    hbm: float
    nvlink: float            # to a GPU of the same node
    ib: float                # to a GPU of another node
    latency_s: float         # one small collective

    def describe(self) -> str:
        return (f"{self.name}: HBM {self.hbm / 1e12:g} TB/s, NVLink {self.nvlink / 1e9:g} GB/s, "
                f"InfiniBand {self.ib / 1e9:g} GB/s per GPU, {self.latency_s * 1e6:g} us per collective")


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int                 # ranks per node (the largest count when they differ)
    gpu_memory_gb: float               # per device; on CPU, this process's share of host RAM
    device: Literal["gpu", "cpu"] = "gpu"
    world_size: int | None = None      # None = nodes * gpus_per_node (srun "2,1" layouts differ)
    host_memory_gb: float | None = None  # RAM per node; None = unknown, not checked
    peak_tflops: float | None = DEFAULT_PEAK_TFLOPS
    mfu: float = DEFAULT_MFU
    hbm_tbps: float | None = None      # None: H200's above 100 GB of device memory, else H100's

    @property
    def world(self) -> int:
        return self.world_size if self.world_size is not None else self.nodes * self.gpus_per_node

    @property
    def usable_gb(self) -> float:
        if self.device == "gpu":
            return self.gpu_memory_gb - GPU_RESERVE_GB
        return self.gpu_memory_gb - CPU_PROCESS_GB

    def hardware(self) -> Hardware | None:
        """Bandwidths for the decode model; None on CPU (not estimated)."""
        if self.device != "gpu":
            return None
        name, tbps = ("H200", H200_HBM_TBPS) if self.gpu_memory_gb > 100 else ("H100 SXM", H100_HBM_TBPS)
        if self.hbm_tbps:
            name, tbps = "GPU (--hbm-tbps)", self.hbm_tbps
        return Hardware(name, tbps * 1e12, NVLINK_GBPS * 1e9, IB_GBPS * 1e9, COLLECTIVE_LATENCY_S)

    def describe(self) -> str:
        shape = f"{self.nodes} node{'s' if self.nodes != 1 else ''} x {self.gpus_per_node}"
        if self.world != self.nodes * self.gpus_per_node:
            shape += f" ({self.world} ranks)"
        if self.device == "gpu":
            return f"{shape} GPUs of {self.gpu_memory_gb:g} GB"
        return f"{shape} CPU processes, {self.gpu_memory_gb:.1f} GB of host RAM each"


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


@dataclass
class Item:
    label: str
    gb: float


@dataclass
class Check:
    ok: bool
    message: str
    fatal: bool = True   # False: a warning, shown but not a reason to refuse


@dataclass
class Fix:
    """One change that makes the plan fit: config overrides, a node count or a DeepSpeed JSON."""
    why: str                                                 # e.g. "peak 61.2 GB"
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value
    nodes: int | None = None
    deepspeed: str | None = None

    @property
    def what(self) -> str:
        parts = [f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.overrides.items()]
        if self.deepspeed:
            parts.append(f"--deepspeed {self.deepspeed}")
        if self.nodes:
            parts.append(f"{self.nodes} nodes (sbatch --nodes={self.nodes})")
        return " ".join(parts)

    def apply(self, cfg: PaddConfig, cluster: Cluster) -> tuple[PaddConfig, Cluster]:
        cfg = _with(cfg, self.overrides)
        if self.deepspeed:
            cfg = _with(cfg, {"deepspeed.config": self.deepspeed})
        return cfg, (dataclasses.replace(cluster, nodes=self.nodes) if self.nodes else cluster)


@dataclass
class Plan:
    recipe: str
    cluster: Cluster
    layout: list[str]
    student: list[Item]
    teacher: list[Item]
    checks: list[Check]
    speed: list[str]
    host: list[str]
    student_peak_gb: float
    teacher_peak_gb: float
    host_gb: float = 0.0        # RAM per node while loading (plus CPU offload)
    fixes: list[Fix] = field(default_factory=list)
    rollout_tok_s: float | None = None  # train.mode=padd on GPUs: the configured backend's generated tok/s
    step_s: float | None = None         # its seconds per RL step: rollout phase + training

    @property
    def peak_gb(self) -> float:
        return max(self.student_peak_gb, self.teacher_peak_gb)

    @property
    def problems(self) -> list[str]:
        return [c.message for c in self.checks if not c.ok and c.fatal]

    @property
    def fits(self) -> bool:
        return not self.problems

    def report(self) -> str:
        usable = self.cluster.usable_gb
        out = [f"padd plan: {self.recipe} on {self.cluster.describe()}"]
        out += [f"layout   {line}" for line in self.layout]
        for title, items, peak in (("student", self.student, self.student_peak_gb),
                                   ("teacher", self.teacher, self.teacher_peak_gb)):
            if not items:
                continue
            out.append(f"{title} memory per {'GPU' if self.cluster.device == 'gpu' else 'process'} (GB)")
            out += [f"  {it.label:<58} {it.gb:8.2f}" for it in items]
            verdict = "ok" if peak <= usable else "TOO BIG"
            out.append(f"  {'peak':<58} {peak:8.2f}  of {usable:.1f} usable: {verdict}")
        out += [f"host     {line}" for line in self.host]
        for c in self.checks:
            tag = "ok  " if c.ok else ("FAIL" if c.fatal else "warn")
            out.append(f"check    {tag} {c.message}")
        out += [f"speed    {line}" for line in self.speed]
        if self.fits:
            out.append("verdict  fits")
        else:
            out.append("verdict  does NOT fit:")
            out += [f"  - {p}" for p in self.problems]
            if self.fixes:
                out.append("fixes (each alone makes it fit):")
                out += [f"  {f.what:<56} {f.why}" for f in self.fixes]
            else:
                out.append("fixes    no single change found; use more or larger GPUs, or a smaller model")
        last = f"PLAN fits={'true' if self.fits else 'false'} peak_gpu_gb={self.peak_gb:.1f}"
        if self.rollout_tok_s is not None and self.step_s is not None:
            last += f" rollout_tok_s={self.rollout_tok_s:.0f} step_s={self.step_s:.1f}"
        out.append(last)
        return "\n".join(out)

    def refusal(self) -> str:
        """One line for a launch that must not start."""
        fixes = "; ".join(f"{f.what} ({f.why})" for f in self.fixes[:3]) or "use more or larger devices"
        return f"plan: does not fit on {self.cluster.describe()}: {'; '.join(self.problems)}. Fixes: {fixes}"

    def brief(self) -> str:
        where = "GPU" if self.cluster.device == "gpu" else "process"
        return (f"padd-ds plan: {'fits' if self.fits else 'does NOT fit'} on {self.cluster.describe()}: "
                f"peak {self.peak_gb:.2f} GB per {where} of {self.cluster.usable_gb:.1f} usable")


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _span(ranks: range, per_node: int) -> str:
    if not ranks:
        return "none"
    first, last = ranks[0] // per_node, ranks[-1] // per_node
    nodes = f"node {first}" if first == last else f"nodes {first}-{last}"
    return f"{ranks[0]}-{ranks[-1]} ({nodes})" if len(ranks) > 1 else f"{ranks[0]} ({nodes})"


def _ds_int(section: Mapping, key: str, default: int) -> int:
    v = section.get(key, default)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


@dataclass
class _Inputs:
    """What make_plan needs besides the config; resolved once so fix searches are cheap."""
    teacher: Arch
    student: Arch
    ds: dict


def _inputs(cfg: PaddConfig) -> _Inputs:
    teacher = load_arch(cfg.models.teacher, "models.teacher")
    if cfg.models.student is None:
        student = decompressed(teacher, cfg.stage1.decompress_experts, cfg.stage1.decompress_top_k)
    else:
        student = load_arch(cfg.models.student, "models.student")
    return _Inputs(teacher, student, read_deepspeed_config(cfg))


def min_shards(model_gb: float, device_gb: float) -> int:
    """Fewest devices whose memory holds `model_gb` of weights split evenly (a lower bound:
    a real shard also needs room to gather a layer and to compute)."""
    return max(1, math.ceil(model_gb / device_gb - 1e-9))


@dataclass(frozen=True)
class _Shape:
    """The launch's numbers every phase of the plan reads, derived once from config and cluster."""
    world: int
    gpn: int                 # ranks per node
    colocated: bool
    n_teacher: int
    n_student: int
    parallel: str            # teacher.parallel as it runs ("replicas" with a single teacher rank)
    ep: int                  # expert-parallel size
    local_experts: int
    elem: int                # bytes per parameter/activation element (bf16 2, fp32 4)
    seq: int                 # prompt + response tokens
    response: int            # data.max_response_tokens: a rollout phase's decode steps
    mbs: int                 # sequences per student rank per micro-step
    tokens: int              # mbs * seq, right-padded to the longest sequence
    gas: int                 # micro-steps per optimiser step (padd: the rollout batch's micro-batches)
    rollout: int             # padd: sequences each student rank samples per step (its rollout batch), else 0

    @property
    def student_ranks(self) -> int:
        return max(1, self.n_student)


def _shape(cfg: PaddConfig, cluster: Cluster, inp: _Inputs) -> _Shape:
    colocated = cfg.topology.colocated
    n_teacher = 0 if colocated else cfg.topology.teacher_ranks
    ep = expert_parallel_size(inp.ds, cfg.deepspeed.expert_parallel_size, cfg.deepspeed.config)
    S = inp.student
    local = S.experts // ep if S.is_moe and S.experts % ep == 0 else max(1, math.ceil(S.experts / max(1, ep)))
    seq = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    mbs, n_student = cfg.train.micro_batch_size, cluster.world - n_teacher
    # A layout the trainer refuses is a failed check (_layout_checks); its sizes here are the nearest.
    splits = n_student >= 1 and rollout_layout_problem(cfg, n_student) is None
    padd = cfg.train.mode == "padd" and n_student >= 1
    return _Shape(world=cluster.world, gpn=cluster.gpus_per_node, colocated=colocated, n_teacher=n_teacher,
                  n_student=n_student,
                  parallel=cfg.teacher.parallel if n_teacher > 1 else "replicas", ep=ep, local_experts=local,
                  elem=2 if uses_bf16(cfg.models.dtype, cluster.device == "gpu") else 4,
                  seq=seq, response=cfg.data.max_response_tokens, mbs=mbs, tokens=mbs * seq,
                  gas=accumulation_steps(cfg, n_student) if splits else cfg.train.grad_accum,
                  rollout=max(1, rollout_batch_size(cfg, n_student)) if padd else 0)


def _layout(sh: _Shape, inp: _Inputs) -> list[str]:
    S, T = inp.student, inp.teacher
    teacher_at = ("teacher inside each student process (colocated)" if sh.colocated else
                  f"teacher {_span(range(max(0, sh.n_student), sh.world), sh.gpn)}, teacher.parallel={sh.parallel}")
    dp = sh.n_student // sh.ep if sh.ep and sh.n_student % sh.ep == 0 else None
    experts = (f", {S.experts} experts top-{S.top_k}, EP {sh.ep} -> {sh.local_experts} local experts per rank"
               f"{f', DP {dp}' if dp else ''}" if S.is_moe else "")
    teacher_split = (f", ZeRO-3 over {sh.n_teacher} ranks" if sh.parallel == "zero3" else
                     f", {max(1, sh.n_teacher)} full replica{'s' if sh.n_teacher > 1 else ''}"
                     if not sh.colocated else "")
    return [f"{sh.world} ranks: students {_span(range(0, max(0, sh.n_student)), sh.gpn)}, {teacher_at}",
            f"student {S.name}: {_count(S.total_params())} params ({_count(S.active_params())} active){experts}",
            f"teacher {T.name}: {_count(T.total_params())} params{teacher_split}"]


def _check(ok: bool, good: str, bad: str, fatal: bool = True) -> Check:
    return Check(ok, good if ok else bad, fatal)


def _layout_checks(cfg: PaddConfig, sh: _Shape, inp: _Inputs) -> list[Check]:
    """Divisibility and placement: the same rules the trainer enforces (validate.py), as plan lines."""
    S, T = inp.student, inp.teacher
    checks: list[Check] = []
    if not sh.colocated:
        problem = teacher_split_problem(cfg.topology, sh.world)
        checks.append(_check(problem is None, f"{sh.n_student} student ranks and {sh.n_teacher} teacher rank(s) "
                             f"after topology.teacher_ranks={sh.n_teacher}", str(problem)))
    if S.is_moe:
        problem = experts_problem(S.experts, sh.ep)
        checks.append(_check(problem is None, f"{S.experts} experts divide over expert-parallel size {sh.ep}",
                             str(problem)))
        if sh.n_student >= 1:
            problem = expert_groups_problem(sh.n_student, sh.ep)
            checks.append(_check(problem is None, f"{sh.n_student} student ranks = {sh.n_student // sh.ep} "
                                 f"data-parallel x {sh.ep} expert-parallel", str(problem)))
    if sh.parallel == "replicas" and sh.n_teacher > 1 and sh.n_student >= 1:
        checks.append(_check(sh.n_student % sh.n_teacher == 0,
                             f"{sh.n_student} students spread evenly over {sh.n_teacher} teacher replicas",
                             f"{sh.n_student} students do not spread evenly over {sh.n_teacher} teacher replicas "
                             "(some serve one more)", fatal=False))
    if sh.parallel == "zero3" and sh.n_student >= 1:
        first_node, last_node = sh.n_student // sh.gpn, (sh.world - 1) // sh.gpn
        checks.append(_check(first_node == last_node, f"the {sh.n_teacher} ZeRO-3 teacher ranks share node {last_node}",
                             f"the {sh.n_teacher} ZeRO-3 teacher ranks span nodes {first_node}-{last_node}; a sharded "
                             f"teacher's world meets on one node: use at most {sh.gpn} teacher ranks, all on the last node"))
    for name, arch in (("models.teacher", T), ("models.student", S)):
        if isinstance(arch.max_positions, int):
            problem = positions_problem(name, arch.max_positions, sh.seq)
            checks.append(_check(problem is None, f"{name}: {sh.seq}-token sequences within its "
                                 f"{arch.max_positions} positions", str(problem)))
    if cfg.train.mode == "padd" and sh.n_student >= 1:
        s3, problem = cfg.stage3, rollout_layout_problem(cfg, sh.n_student)
        prompts = s3.prompts_per_step // sh.n_student
        checks.append(_check(problem is None, f"stage3.prompts_per_step={s3.prompts_per_step}: {prompts} "
                             f"prompt{'s' * (prompts != 1)} x G={s3.group_size} = {sh.rollout} rollouts per student "
                             f"rank and step, {sh.gas} micro-batches of {sh.mbs}", str(problem)))
    return checks


def _offload_device(zero: Mapping, key: str) -> str:
    section = zero.get(key)
    return (section or {}).get("device", "none") if isinstance(section, dict) else "none"


@dataclass
class _Memory:
    """One role's per-device items and peak; `offload` is host RAM per rank for CPU offload."""
    items: list[Item]
    peak: float
    offload: float = 0.0
    gathered_gb: float = 0.0   # padd: a rank's peak during an hf_gathered rollout phase (any backend)
    note: str = ""             # what makes the peak, when a refusal should name it
    state_gb: float = 0.0      # training state kept through every phase (partitions, optimizer, buffers)


def _student_state(sh: _Shape, S: Arch, zero: Mapping) -> tuple[list[Item], float]:
    """Parameters, gradients, optimizer state and the buffers ZeRO gathers them in."""
    stage = _ds_int(zero, "stage", 0)
    off_opt, off_par = _offload_device(zero, "offload_optimizer"), _offload_device(zero, "offload_param")
    P, elem, ranks = S.total_params(), sh.elem, sh.student_ranks
    P_expert = S.routed_expert_params()
    P_replica = (P - P_expert) + P_expert / max(1, sh.ep)  # what one rank holds unpartitioned: its local experts
    opt_bytes = 12 if elem == 2 else 8  # bf16: fp32 master + Adam m, v; fp32: Adam m, v
    items: list[Item] = []
    if stage >= 3:
        part = P / ranks
        items.append(Item(f"params: offloaded to {off_par} (ZeRO-3)", 0.0) if off_par in ("cpu", "nvme") else
                     Item(f"params {elem} B x {_count(P)} / {ranks} ranks (ZeRO-3)", elem * part / GB))
        items.append(Item(f"grads + optimizer: offloaded to {off_opt}", 0.0) if off_opt in ("cpu", "nvme") else
                     Item(f"grads + Adam state {elem + opt_bytes} B x params / {ranks} ranks",
                          (elem + opt_bytes) * part / GB))
        offload = ((4 + opt_bytes) * part if off_opt == "cpu" else 0) + (elem * part if off_par == "cpu" else 0)
        largest = S.largest_module_params(sh.local_experts)
        prefetch = _ds_int(zero, "stage3_prefetch_bucket_size", 50_000_000)
        items.append(Item(f"gathered params + grads (2 x {_count(largest)} module) + prefetch",
                          (2 * largest + min(prefetch, P_replica)) * elem / GB))
        return items, offload
    items.append(Item(f"params {elem} B x {_count(P_replica)} (local experts only; ZeRO-{stage})", elem * P_replica / GB))
    grads_part = P / ranks if stage >= 2 else P_replica
    opt_part = P / ranks if stage >= 1 else P_replica
    offload = 0.0
    if off_opt in ("cpu", "nvme"):
        items.append(Item(f"grads + optimizer: offloaded to {off_opt}", 0.0))
        offload = (4 + opt_bytes) * P / ranks if off_opt == "cpu" else 0
    else:
        items.append(Item(f"grads ({'partitioned' if stage >= 2 else 'replicated'}) + Adam state "
                          f"({'partitioned' if stage >= 1 else 'replicated'})",
                          (elem * grads_part + opt_bytes * opt_part) / GB))
    bucket = _ds_int(zero, "reduce_bucket_size", 500_000_000) + _ds_int(zero, "allgather_bucket_size", 500_000_000)
    items.append(Item("reduce + allgather buckets", bucket * elem / GB))
    return items, offload


def _student_memory(cfg: PaddConfig, sh: _Shape, inp: _Inputs) -> _Memory:
    S = inp.student
    items, offload = _student_state(sh, S, inp.ds.get("zero_optimization") or {})
    ckpt = cfg.train.activation_checkpointing  # engine/build.py: every decoder layer recomputed in backward
    per_token = S.checkpointed_activation_bytes_per_token if ckpt else S.train_activation_bytes_per_token
    act = sh.tokens * per_token(sh.elem) / GB
    items.append(Item(f"activations ({sh.mbs} x {sh.seq} tokens, {'' if ckpt else 'no '}checkpointing)", act))
    # Logits: the model's own (elem bytes), then fp32: the KD loss's log-softmax, the LM
    # loss's masked copy and its log-softmax, and one fp32 gradient in backward.
    logits = sh.tokens * S.vocab * (sh.elem + 16) / GB
    items.append(Item(f"logits + loss ({sh.mbs} x {sh.seq} x vocab {S.vocab}, {sh.elem + 16} B each)", logits))
    training = sum(it.gb for it in items)
    final, detail = _final_evaluation(cfg, S, sh.elem)
    items.append(Item(f"(export check + evaluation instead, every student rank, training state on the host: {detail})", final))
    train_peak = max(training, final)
    final_note = (f"the export check and evaluation at the end: {detail} = {final:.1f} GB; lower "
                  "eval.batch_size or eval.max_new_tokens") if final > training else ""
    held = training - act - logits  # ZeRO partitions, optimizer state, buffers: kept through every phase
    if cfg.train.mode != "padd":
        return _Memory(items, train_peak, offload, note=final_note, state_gb=held)
    # The rollout phase samples the whole rollout batch at once; its KV cache is not live
    # during the update and replaces the training activations and logits.
    kv = sh.rollout * sh.seq * S.kv_cache_bytes_per_token(sh.elem) / GB
    gathered, detail = _gathered_rollout(sh, S, kv)
    if cfg.rollout.backend == "hf_gathered":
        items.append(Item(f"(rollouts instead of activations, hf_gathered: {detail})", gathered))
        note = (f"rollout.backend=hf_gathered: {detail} = {gathered:.1f} GB beside {held:.1f} GB of training "
                f"state; use rollout.backend=hf or shorter data.max_response_tokens")
        return _Memory(items, max(train_peak, held + gathered), offload, held + gathered,
                       note if held + gathered > train_peak else final_note, held)
    items.append(Item(f"(rollouts instead of activations: KV cache {sh.rollout} x {sh.seq} tokens)", kv))
    return _Memory(items, max(train_peak, held + kv), offload, held + gathered,
                   final_note if final >= held + kv else "", held)


def _final_evaluation(cfg: PaddConfig, S: Arch, elem: int) -> tuple[float, str]:
    """GB a student rank holds while it evaluates its share of the export (and the main rank
    checks it; pipeline/verify.py): one exported copy at a time in the run's dtype, its KV cache
    and prefill temporaries for eval.batch_size prompts; the training state is parked on the
    host (engine/build.park_training_state)."""
    tokens = cfg.data.max_prompt_tokens + cfg.eval.max_new_tokens
    weights = S.total_params() * elem / GB
    kv = cfg.eval.batch_size * tokens * S.kv_cache_bytes_per_token(elem) / GB
    prefill = cfg.eval.batch_size * cfg.data.max_prompt_tokens * S.inference_transient_bytes_per_token(elem) / GB
    return weights + kv + prefill, (f"the exported student {weights:.1f} GB + KV cache {cfg.eval.batch_size} x "
                                    f"{tokens} tokens {kv:.1f} GB + prefill temporaries {prefill:.1f} GB")


def _stage1_check(cfg: PaddConfig, sh: _Shape, S: Arch, student: _Memory, usable: float) -> Check | None:
    """Stage I's uniform_all warmup sends every token through all E experts (the layer's top_k
    is raised to E): its MoE activations are E/k times training's. Its sequences are D_A/D_B's
    reference solutions, usually far below data.max_response_tokens, so this is a warning with
    the longest sequence that fits, not a refusal."""
    s1 = cfg.stage1
    if not (s1.enabled and s1.warmup_steps and s1.warmup_router == "uniform_all" and S.is_moe and student.items):
        return None
    every = dataclasses.replace(S, top_k=S.experts)
    per_token = (every.checkpointed_activation_bytes_per_token if cfg.train.activation_checkpointing
                 else every.train_activation_bytes_per_token)(sh.elem) + S.vocab * (sh.elem + 16)
    longest = int(max(0.0, usable - student.state_gb) * GB / per_token / sh.mbs)
    return _check(longest >= sh.seq,
                  f"Stage I warmup (uniform_all: every token through all {S.experts} experts) fits {sh.seq}-token "
                  "sequences",
                  f"Stage I warmup with stage1.warmup_router=uniform_all sends every token through all {S.experts} "
                  f"experts: {sh.mbs} x {longest} tokens fit beside the training state, not {sh.mbs} x {sh.seq}; "
                  "D_A/D_B solutions longer than that would not (or use stage1.warmup_router=uniform_random_topk)",
                  fatal=False)


def _gathered_rollout(sh: _Shape, S: Arch, kv_gb: float) -> tuple[float, str]:
    """GB an hf_gathered rollout phase adds to a rank (models/gathered.py): the whole student in
    the engine dtype, the KV cache of its rollout batch at full length, and the prefill's layer
    temporaries over the batch's prompts (generate keeps only the last position's logits)."""
    weights = S.total_params() * sh.elem / GB
    prefill = sh.rollout * (sh.seq - sh.response) * S.inference_transient_bytes_per_token(sh.elem) / GB
    detail = (f"the gathered student {weights:.1f} GB ({sh.elem} B x {_count(S.total_params())}) + KV cache "
              f"{sh.rollout} x {sh.seq} tokens {kv_gb:.1f} GB + prefill temporaries {prefill:.1f} GB")
    return weights + kv_gb + prefill, detail


def _teacher_memory(sh: _Shape, T: Arch) -> _Memory:
    PT, elem = T.total_params(), sh.elem
    items: list[Item] = []
    if sh.parallel == "zero3":
        share = math.ceil(sh.mbs / max(1, sh.n_teacher))  # each rank scores a slice of the request
        items.append(Item(f"weights {elem} B x {_count(PT)} / {sh.n_teacher} ranks (ZeRO-3)",
                          elem * PT / sh.n_teacher / GB))
        largest = T.largest_module_params(T.experts)
        # DeepSpeed's default prefetch bucket (teacher/sharded.py sets none).
        items.append(Item(f"gathered weights (2 x {_count(largest)} module) + prefetch",
                          (2 * largest + min(50_000_000, PT)) * elem / GB))
    else:
        share = sh.mbs
        items.append(Item(f"weights {elem} B x {_count(PT)} (full replica)", elem * PT / GB))
    t_tokens = share * sh.seq
    # No KV cache: a scoring pass is one forward with use_cache=False (teacher/service.py).
    items.append(Item("layer temporaries (FFN widths, q/k/v)", t_tokens * T.inference_transient_bytes_per_token(elem) / GB))
    # The head runs on the real positions only, then their fp32 copy before compression; a
    # full-length request's positions are all real.
    items.append(Item(f"logits ({share} x {sh.seq} x vocab {T.vocab}, {elem} B + fp32 copy)",
                      t_tokens * T.vocab * (elem + 4) / GB))
    return _Memory(items, sum(it.gb for it in items))


def _place(sh: _Shape, student: _Memory, teacher: _Memory) -> tuple[_Memory, _Memory]:
    """What each device really holds: a colocated teacher lives in the student's process; a
    role with no ranks holds nothing."""
    if sh.colocated:
        student = dataclasses.replace(
            student, items=student.items + [Item("colocated teacher (everything above under 'teacher')", teacher.peak)],
            peak=student.peak + teacher.peak, gathered_gb=student.gathered_gb + teacher.peak)
        teacher = _Memory([], 0.0)
    if sh.n_student < 1:
        student = _Memory([], 0.0, student.offload)
    if sh.n_teacher < 1:
        teacher = _Memory([], 0.0)
    return student, teacher


@dataclass
class _Host:
    lines: list[str]
    need_gb: float                # RAM per node while loading (plus CPU offload)
    checks: list[Check]


def _host_memory(sh: _Shape, cluster: Cluster, inp: _Inputs, student: _Memory, teacher: _Memory) -> _Host:
    """Host RAM at load: every rank maps its checkpoint's safetensors files and copies the
    weights straight to its device (models/loading.py), so a node's ranks share one page-cached
    copy of each checkpoint; CPU offload adds each rank's own optimizer state. On a CPU cluster
    the host RAM is the device, so the load-time copy raises each role's peak (in place)."""
    load_student = inp.student.total_params() * sh.elem + (inp.teacher.total_params() * sh.elem if sh.colocated else 0)
    load_teacher = inp.teacher.total_params() * sh.elem
    per_node_student = (load_student if sh.n_student > 0 else 0) + min(sh.gpn, max(0, sh.n_student)) * student.offload
    per_node_teacher = load_teacher if sh.n_teacher > 0 else 0
    need = max(per_node_student, per_node_teacher) / GB
    if cluster.device == "cpu":
        if student.items:
            student.peak = max(student.peak, load_student / GB)
        if teacher.items:
            teacher.peak = max(teacher.peak, load_teacher / GB)
        return _Host([f"device = host RAM: each rank's load-time copy counted in its peak "
                      f"(student {load_student / GB:.2f} GB, teacher {load_teacher / GB:.2f} GB)"], need, [])
    offload = (f" incl. {student.offload * min(sh.gpn, sh.n_student) / GB:.0f} GB offload" if student.offload else "")
    lines = [f"RAM per node while loading (a node's ranks share one mapped copy of each checkpoint): "
             f"{need:.0f} GB{offload}"]
    if cluster.host_memory_gb is None:
        return _Host(lines + ["node RAM not given (--host-mem-gb): not checked"], need, [])
    return _Host(lines, need, [_check(need <= 0.9 * cluster.host_memory_gb,
                                      f"host RAM {need:.0f} GB per node within 90% of {cluster.host_memory_gb:g} GB",
                                      f"loading needs {need:.0f} GB of RAM per node, more than 90% of "
                                      f"{cluster.host_memory_gb:g} GB")])


def _fit_checks(sh: _Shape, cluster: Cluster, inp: _Inputs, student: _Memory, teacher: _Memory) -> list[Check]:
    usable = cluster.usable_gb
    where = "GPU" if cluster.device == "gpu" else "process"
    checks: list[Check] = []
    if student.items:
        why = f" ({student.note})" if student.note else ""
        checks.append(_check(student.peak <= usable, f"student peak {student.peak:.1f} GB within {usable:.1f} GB usable",
                             f"student needs {student.peak:.1f} GB per {where}, {usable:.1f} GB usable{why}"))
    if teacher.items:
        weights = sh.elem * inp.teacher.total_params() / GB
        hint = ("" if sh.parallel == "zero3" or weights <= usable else
                f" (its weights alone are {weights:.0f} GB: shard it with teacher.parallel=zero3 over at least "
                f"{min_shards(weights, usable)} ranks)")
        checks.append(_check(teacher.peak <= usable, f"teacher peak {teacher.peak:.1f} GB within {usable:.1f} GB usable",
                             f"teacher needs {teacher.peak:.1f} GB per {where}, {usable:.1f} GB usable{hint}"))
    return checks


def _speed(cfg: PaddConfig, cluster: Cluster, sh: _Shape, inp: _Inputs) -> tuple[list[str], float | None]:
    """Training tokens per second from FLOPs at the given MFU, which role bounds the step, and
    the step's training seconds (an RL step's rollout phase is the decode model's, below)."""
    if sh.n_student < 1:
        return [], None
    if not cluster.peak_tflops:
        return ["not estimated (no peak TFLOPs for this device; pass --gpu-tflops)"], None
    rate = cluster.peak_tflops * 1e12 * cluster.mfu
    ctx = sh.seq / 2  # causal attention: a token sees half the sequence on average
    # per update: fwd + bwd (2x) [+ the checkpoint's recompute forward]; an RL step makes
    # stage3.updates_per_batch updates on one rollout batch
    update = 3 + (1 if cfg.train.activation_checkpointing else 0)
    passes = cfg.stage3.updates_per_batch * update if cfg.train.mode == "padd" else update
    s_flops = passes * inp.student.forward_flops_per_token(ctx)
    t_flops = inp.teacher.forward_flops_per_token(ctx)
    student_tps = sh.n_student * rate / s_flops
    zero3 = sh.parallel == "zero3"
    # A sharded teacher scores one request per rank per round (teacher/sharded.py): every rank
    # is busy while as many students have a request in flight (each has at least one).
    busy = min(sh.n_teacher, max(1, sh.n_student)) if zero3 else max(1, sh.n_teacher)
    teacher_tps = (busy if not sh.colocated else sh.n_student) * rate / t_flops
    if sh.colocated:  # the same devices do both
        student_tps = teacher_tps = 1 / (1 / student_tps + 1 / teacher_tps)
    step_tokens = sh.n_student * sh.tokens * sh.gas
    tps = min(student_tps, teacher_tps)
    bound = "teacher" if teacher_tps < student_tps else "student"
    busy_note = f", {busy:g} of {sh.n_teacher} ranks busy, one request each" if zero3 else ""
    advice = (f"; the sharded teacher's {sh.n_teacher} ranks score one request each, and only {sh.n_student} "
              "students send them: fewer teacher ranks would do"
              if bound == "teacher" and zero3 and busy < sh.n_teacher else "")
    what = " (training; the rollout phase is below)" if cfg.train.mode == "padd" else ""
    return ([f"at MFU {cluster.mfu:.2f} of {cluster.peak_tflops:g} TFLOPs: student {student_tps:,.0f} tok/s "
             f"({s_flops / 1e9:.1f} GFLOP/token over {passes} passes), teacher {teacher_tps:,.0f} tok/s "
             f"({t_flops / 1e9:.1f} GFLOP/token{busy_note})",
             f"{bound}-bound: ~{tps:,.0f} tok/s, {step_tokens:,} tokens per step -> ~{step_tokens / tps:.1f} s/step"
             + what + advice], step_tokens / tps)


# --------------------------------------------------------------------------------------
# Rollouts: decoding per backend
# --------------------------------------------------------------------------------------
# A decode step makes one token per sequence: it reads the weights it uses and the KV cache
# once (memory-bound; FLOPs are negligible at these batch sizes) and, for `hf`, first gathers
# the ZeRO-3 partitions over the links. Worst case throughout: every response runs the whole
# data.max_response_tokens, so a phase is that many decode steps.

@dataclass(frozen=True)
class RolloutLayout:
    """A rollout phase's shape, all the decode model needs besides the model and the GPU."""
    students: int            # student ranks
    per_node: int            # ranks per node
    ep: int                  # expert-parallel size
    batch: int               # sequences a student rank samples per phase (prompts x G)
    prompt: int              # prompt tokens (left-padded to data.max_prompt_tokens)
    response: int            # decode steps per phase: data.max_response_tokens
    elem: int                # bytes per weight and KV element (bf16 2)

    @property
    def kv_context(self) -> float:
        """Mean tokens a decode step attends to over the phase."""
        return self.prompt + self.response / 2

    def kv_read(self, S: Arch, sequences: int) -> float:
        return sequences * self.kv_context * S.kv_cache_bytes_per_token(self.elem)

    def links(self, hw: Hardware) -> tuple[float, float]:
        """(ZeRO-3 group link, expert-parallel group link): InfiniBand once the student ranks
        span nodes; an expert-parallel group of consecutive ranks inside a node uses NVLink."""
        zero = hw.ib if self.students > self.per_node else hw.nvlink
        ep = hw.nvlink if self.per_node % self.ep == 0 else hw.ib
        return zero, ep

    def partition_gather_bytes(self, S: Arch) -> float:
        """Bytes a rank receives to hold every non-expert parameter and its expert-parallel
        slice of the experts, from the ZeRO-3 partitions (1/students of everything) of the others."""
        P, X = S.total_params(), S.routed_expert_params()
        return self.elem * ((P - X) + X / self.ep - P / self.students)


@dataclass(frozen=True)
class Decode:
    """One backend's rollout phase: `setup_s` once, then `layout.response` steps of `step_s`."""
    backend: str
    layout: RolloutLayout
    setup_s: float
    step_s: float
    terms: str               # what the step time is made of

    @property
    def phase_s(self) -> float:
        return self.setup_s + self.layout.response * self.step_s

    @property
    def tok_s(self) -> float:
        """Generated tokens per second over the whole cluster."""
        lay = self.layout
        return lay.students * lay.batch * lay.response / self.phase_s


def decode_hf(S: Arch, lay: RolloutLayout, hw: Hardware) -> Decode:
    """`generate` on the ZeRO-3 + AutoEP engine: every step each rank gathers all non-resident
    parameters of its view (every non-expert one, its expert slice), reads them and the KV cache,
    and runs two all-to-alls per MoE layer (the tokens of its expert-parallel group reach its
    experts). Collectives per step: one per attention and per FFN block, the embedding and the
    head, and per MoE layer the expert gather plus two all-to-alls (a lower bound: ZeRO-3
    fetches module by module). Gathers and compute are added, not overlapped."""
    zero_link, ep_link = lay.links(hw)
    gather = lay.partition_gather_bytes(S)
    hbm = lay.elem * S.decode_read_params(lay.batch * lay.ep, 1 / lay.ep) + lay.kv_read(S, lay.batch)
    a2a = 2 * S.moe_layers * lay.batch * S.top_k * S.hidden * lay.elem * (lay.ep - 1) / lay.ep
    n = (2 * S.layers + 2 + S.moe_layers * (1 + 2 * (lay.ep > 1))) if lay.students > 1 else 0
    step = hbm / hw.hbm + gather / zero_link + a2a / ep_link + n * hw.latency_s
    terms = (f"HBM {hbm / GB:.2f} GB {1e3 * hbm / hw.hbm:.1f} ms + ZeRO-3 gather {gather / GB:.2f} GB "
             f"{1e3 * gather / zero_link:.1f} ms + all-to-alls {a2a / GB:.3f} GB + {n} collectives "
             f"{1e3 * n * hw.latency_s:.1f} ms")
    return Decode("hf", lay, 0.0, step, terms)


def decode_gathered(S: Arch, lay: RolloutLayout, hw: Hardware) -> Decode:
    """`hf_gathered`: once per phase the ZeRO-3 gather of the rank's view, then the
    expert-parallel all-gather of the other experts; each step reads the non-expert weights,
    the experts its own batch touches and its KV cache, with no collective."""
    zero_link, ep_link = lay.links(hw)
    others = lay.elem * S.routed_expert_params() * (lay.ep - 1) / lay.ep
    setup = lay.partition_gather_bytes(S) / zero_link + others / ep_link
    hbm = lay.elem * S.decode_read_params(lay.batch) + lay.kv_read(S, lay.batch)
    experts = f": {S.experts * S.touched_expert_fraction(lay.batch):.1f} of {S.experts} experts per layer" if S.is_moe else ""
    return Decode("hf_gathered", lay, setup, hbm / hw.hbm, f"HBM {hbm / GB:.2f} GB{experts}")


# The weight sync writes the gathered model into shared memory and vLLM reads it back: two host
# memory copies at one memcpy stream's rate (an assumption, printed with the line).
HOST_COPY_BYTES_S = 10e9


@dataclass(frozen=True)
class VllmEngines:
    """rollout.backend=vllm's placement (rl/vllm_policy.py): one engine per group of
    `ranks_per_engine` student ranks, on `tensor_parallel` of their GPUs."""
    ranks_per_engine: int
    tensor_parallel: int
    gpu_fraction: float      # rollout.vllm_gpu_memory_utilization

    def memory(self, S: Arch, lay: RolloutLayout, hbm_gb: float) -> tuple[float, float, int]:
        """(weights GB per GPU, KV GB the engine needs per GPU, waves): the engine keeps its
        share of the weights and as many sequences' KV cache as the rest of its memory holds;
        more sequences than that decode in waves (vLLM queues them)."""
        weights = lay.elem * S.total_params() / GB / self.tensor_parallel
        kv = lay.kv_read(S, self.ranks_per_engine * lay.batch) / lay.kv_context * (lay.prompt + lay.response)
        kv = kv / GB / self.tensor_parallel
        room = self.gpu_fraction * hbm_gb - weights
        return weights, kv, (math.ceil(kv / room) if room > 0 else 0)


def decode_vllm(S: Arch, lay: RolloutLayout, hw: Hardware, eng: VllmEngines, hbm_gb: float) -> Decode:
    """vLLM engines (rl/vllm_policy.py): each decodes its group's ranks_per_engine x batch
    sequences as one continuous batch, weights and KV cache split over its tensor_parallel GPUs
    (two collectives per layer when > 1); a group larger than its KV room decodes in waves.
    Before each phase the weight sync: the export's gather (ZeRO-3, then the expert-parallel
    all-gather) and two host copies of the whole model (shared memory, HOST_COPY_BYTES_S).
    Continuous batching refills early-finished rows: nothing to refill in this worst case."""
    g, tp = eng.ranks_per_engine, eng.tensor_parallel
    zero_link, ep_link = lay.links(hw)
    gather = lay.partition_gather_bytes(S) / zero_link + lay.elem * S.routed_expert_params() * (lay.ep - 1) / lay.ep / ep_link
    setup = gather + 2 * lay.elem * S.total_params() / HOST_COPY_BYTES_S
    weights, kv, waves = eng.memory(S, lay, hbm_gb)
    per_wave = math.ceil(g * lay.batch / max(waves, 1))
    hbm = (lay.elem * S.decode_read_params(per_wave) + lay.kv_read(S, per_wave)) / tp
    n = 2 * S.layers if tp > 1 else 0
    experts = (f", {S.experts * S.touched_expert_fraction(per_wave):.1f} of {S.experts} experts per layer"
               if S.is_moe else "")
    terms = (f"{lay.students // g} engines x {tp} GPU{'s' if tp > 1 else ''}, {g * lay.batch} sequences each in "
             f"{max(waves, 1)} wave{'s' if waves > 1 else ''}; HBM {hbm / GB:.2f} GB per GPU{experts} + {n} collectives "
             f"{1e3 * n * hw.latency_s:.1f} ms")
    return Decode("vllm", lay, setup, max(waves, 1) * (hbm / hw.hbm + n * hw.latency_s), terms)


def _vllm_check(cfg: PaddConfig, cluster: Cluster, sh: _Shape, inp: _Inputs, student: _Memory) -> list[Check]:
    """rollout.backend=vllm: its engines fit their GPUs (none on a CPU host: the KV cache is sized apart)."""
    if cfg.train.mode != "padd" or cfg.rollout.backend != "vllm" or cluster.device != "gpu" or sh.n_student < 1:
        return []
    lay = RolloutLayout(sh.n_student, sh.gpn, max(1, sh.ep), sh.rollout, sh.seq - sh.response, sh.response, sh.elem)
    ok, words = vllm_fit(vllm_engines(cfg, sh.n_student), inp.student, lay, cluster, student.state_gb)
    return [Check(ok, f"rollout.backend=vllm: {words}")]


def vllm_engines(cfg: PaddConfig, students: int) -> VllmEngines:
    ro = cfg.rollout
    return VllmEngines(ro.vllm_ranks_per_engine or students, ro.vllm_tensor_parallel, ro.vllm_gpu_memory_utilization)


def vllm_fit(eng: VllmEngines, S: Arch, lay: RolloutLayout, cluster: Cluster, held_gb: float) -> tuple[bool, str]:
    """Whether an engine GPU holds its weights beside the training state the student keeps
    there while it rolls out (the engine sleeps while it trains), and the words for it."""
    weights, kv, waves = eng.memory(S, lay, cluster.gpu_memory_gb)
    share = eng.gpu_fraction * cluster.gpu_memory_gb
    ok = waves > 0 and held_gb + share <= cluster.usable_gb
    words = (f"engine GPU: weights {weights:.1f} GB + KV {kv:.1f} GB in rollout.vllm_gpu_memory_utilization x "
             f"{cluster.gpu_memory_gb:g} = {share:.1f} GB beside {held_gb:.1f} GB of training state "
             f"({cluster.usable_gb:.1f} usable)")
    if waves == 0:
        words += ": the weights do NOT fit; raise rollout.vllm_tensor_parallel or vllm_gpu_memory_utilization"
    elif not ok:
        words += ": does NOT fit; lower rollout.vllm_gpu_memory_utilization"
    return ok, words


def _duration(seconds: float) -> str:
    return f"{seconds:,.0f} s" + (f" ({seconds / 3600:.2f} h)" if seconds >= 3600 else
                                  f" ({seconds / 60:.1f} min)" if seconds >= 60 else "")


def _rollout_speed(cfg: PaddConfig, cluster: Cluster, sh: _Shape, inp: _Inputs, train_s: float | None,
                   student: _Memory) -> tuple[list[str], Decode | None]:
    """The `speed rollout` lines, one per backend (the configured one marked), and its Decode."""
    hw = cluster.hardware()
    if cfg.train.mode != "padd" or sh.n_student < 1:
        return [], None
    if hw is None:
        return ["rollout not estimated (the decode model needs GPU bandwidths)"], None
    lay = RolloutLayout(sh.n_student, sh.gpn, max(1, sh.ep), sh.rollout, sh.seq - sh.response, sh.response, sh.elem)
    S = inp.student
    lines = [f"rollout model: {hw.describe()} (spec rates: times are lower bounds); a decode step reads the "
             f"weights it uses and the KV cache once (mean context prompt + response/2 = {lay.kv_context:g} tokens); "
             f"{lay.response} decode steps per phase (data.max_response_tokens, worst case: no response ends early), "
             f"{lay.batch} sequences per student rank",
             "rollout model: an MoE batch of n tokens reads E(1 - (1 - k/E)^n) experts per layer (uniform routing); "
             "prefill, kernel launches and Python are not counted"]
    configured = None
    usable = cluster.usable_gb
    eng = vllm_engines(cfg, sh.n_student)
    for d in (decode_hf(S, lay, hw), decode_gathered(S, lay, hw), decode_vllm(S, lay, hw, eng, cluster.gpu_memory_gb)):
        mark = " (configured)" if d.backend == cfg.rollout.backend else ""
        setup = {"hf": "", "hf_gathered": f"gather {d.setup_s:.2f} s once + ",
                 "vllm": f"weight sync {d.setup_s:.2f} s (gather + 2 host copies at "
                         f"{HOST_COPY_BYTES_S / 1e9:g} GB/s) + "}[d.backend]
        step = f"; step_s={_duration(d.phase_s + train_s)}" if train_s is not None else ""
        fit = ""
        if d.backend == "hf_gathered":
            ok = student.gathered_gb <= usable
            fit = f"; needs {student.gathered_gb:.1f} GB of {usable:.1f} usable{'' if ok else ': does NOT fit'}"
        if d.backend == "vllm":
            fit = "; " + vllm_fit(eng, S, lay, cluster, student.state_gb)[1]
        lines.append(f"rollout {d.backend}{mark}: {setup}{1e3 * d.step_s:.1f} ms/step ({d.terms}) -> "
                     f"{_duration(d.phase_s)} per phase; rollout_tok_s={d.tok_s:,.0f}{step}{fit}")
        configured = d if d.backend == cfg.rollout.backend else configured
    return lines, configured


def make_plan(cfg: PaddConfig, cluster: Cluster, recipe: str = "", *, search_fixes: bool = True,
              _inp: _Inputs | None = None) -> Plan:
    inp = _inp or _inputs(cfg)
    sh = _shape(cfg, cluster, inp)
    student, teacher = _place(sh, _student_memory(cfg, sh, inp), _teacher_memory(sh, inp.teacher))
    host = _host_memory(sh, cluster, inp, student, teacher)
    checks = _layout_checks(cfg, sh, inp) + host.checks + _fit_checks(sh, cluster, inp, student, teacher)
    stage1 = _stage1_check(cfg, sh, inp.student, student, cluster.usable_gb)
    checks += [stage1] if stage1 is not None else []
    speed, train_s = _speed(cfg, cluster, sh, inp)
    rollout_lines, decode = _rollout_speed(cfg, cluster, sh, inp, train_s, student)
    checks += _vllm_check(cfg, cluster, sh, inp, student)
    plan = Plan(recipe or "(defaults)", cluster, _layout(sh, inp), student.items, teacher.items, checks,
                speed + rollout_lines, host.lines, student.peak, teacher.peak, host.need_gb)
    if decode is not None and train_s is not None:
        plan.rollout_tok_s, plan.step_s = decode.tok_s, decode.phase_s + train_s
    if search_fixes and not plan.fits:
        plan.fixes = find_fixes(cfg, cluster, inp)
    return plan


# --------------------------------------------------------------------------------------
# Fixes: single changes that make a failing plan fit
# --------------------------------------------------------------------------------------


def _with(cfg: PaddConfig, changes: Mapping[str, Any]) -> PaddConfig:
    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        section, name = dotted.split(".")
        setattr(getattr(new, section), name, value)
    return new


def _config_error(cfg: PaddConfig) -> str | None:
    try:
        cfg.check()
    except ConfigError as e:
        return str(e)
    return None


def find_fixes(cfg: PaddConfig, cluster: Cluster, inp: _Inputs) -> list[Fix]:
    """Single changes that make a failing plan fit, each checked by planning it again."""
    fixes: list[Fix] = []

    def attempt(fix: Fix, inputs: _Inputs = inp) -> bool:
        c, cl = fix.apply(cfg, cluster)
        if _config_error(c) not in (None, _config_error(cfg)):
            return False  # a fix the trainer would refuse is no fix
        p = make_plan(c, cl, search_fixes=False, _inp=inputs)
        if p.fits:
            fix.why = f"peak {p.peak_gb:.1f} GB" + (f"; {fix.why}".format(host=p.host_gb) if fix.why else "")
            fixes.append(fix)
        return p.fits

    # More nodes of the same kind (the smallest count that fits).
    if cluster.world_size is None:
        any(attempt(Fix("", nodes=n)) for n in range(cluster.nodes + 1, 4 * max(2 * cluster.nodes, cluster.nodes + 8)))
    # Another teacher/student split: the fitting one nearest to the recipe's.
    if not cfg.topology.colocated:
        options = [(abs(t - cfg.topology.teacher_ranks), par != cfg.teacher.parallel, t, par)
                   for t in range(1, cluster.world) for par in ("replicas", "zero3")
                   if (t, par) != (cfg.topology.teacher_ranks, cfg.teacher.parallel)]
        for *_, t, par in sorted(options):
            change = {"topology.teacher_ranks": t}
            if par != cfg.teacher.parallel:
                change["teacher.parallel"] = par
            if attempt(Fix("", change)):
                break
    # Rollouts on the engine itself: no whole-student copy per rank, but hours of decoding.
    if cfg.train.mode == "padd" and cfg.rollout.backend == "hf_gathered":
        attempt(Fix("decodes far slower, see speed", {"rollout.backend": "hf"}))
    # Activation checkpointing: one more student forward instead of every layer's activations.
    if not cfg.train.activation_checkpointing:
        attempt(Fix("one more forward per step", {"train.activation_checkpointing": True}))
    # A smaller micro-batch; more accumulation keeps the global batch (padd: the rollout batch
    # sets the accumulation, and only its divisors pass the layout check).
    mbs, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    any(attempt(Fix("", {"train.micro_batch_size": m} if cfg.train.mode == "padd" else
                    {"train.micro_batch_size": m, "train.grad_accum": math.ceil(mbs * ga / m)}))
        for m in range(mbs - 1, 0, -1))
    # Another expert-parallel size, nearest first.
    if inp.student.is_moe:
        ep_now = expert_parallel_size(inp.ds, cfg.deepspeed.expert_parallel_size, cfg.deepspeed.config)
        sizes = sorted((d for d in range(1, inp.student.experts + 1) if inp.student.experts % d == 0 and d != ep_now),
                       key=lambda d: abs(d - ep_now))
        any(attempt(Fix("", {"deepspeed.expert_parallel_size": e})) for e in sizes)
    # ZeRO-3 with CPU offload (host RAM permitting).
    offload = REPO_ROOT / "ds_configs" / "zero3_offload.json"
    if offload.is_file() and not (inp.ds.get("zero_optimization") or {}).get("offload_optimizer"):
        attempt(Fix("needs {host:.0f} GB RAM per node", deepspeed="ds_configs/zero3_offload.json"),
                dataclasses.replace(inp, ds=json.loads(offload.read_text())))
    # A smaller evaluation batch: each student rank decodes its share of the evaluation in it.
    any(attempt(Fix("evaluates more slowly", {"eval.batch_size": b}))
        for b in sorted({cfg.eval.batch_size // d for d in (2, 4, 8, 16)} - {0}, reverse=True))
    # Shorter responses (multiples of 256 tokens).
    resp = cfg.data.max_response_tokens
    any(attempt(Fix("", {"data.max_response_tokens": r})) for r in range((resp - 1) // 256 * 256, 0, -256))
    return fixes


# --------------------------------------------------------------------------------------
# Where am I? The cluster shape from a launch (train.py) or from SLURM (the sbatch scripts)
# --------------------------------------------------------------------------------------


def host_memory_gb() -> float | None:
    """Physical RAM of this host (MemTotal, not MemAvailable: a verdict must not depend on
    what else happens to run at the moment)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        return None


def device_cluster(world_size: int, ranks_per_node: int, local_rank: int = 0) -> Cluster | None:
    """The cluster as one rank sees it: CUDA device memory, else host RAM / ranks on this
    node. None when neither can be read (the caller skips planning, saying so)."""
    nodes = math.ceil(world_size / ranks_per_node)
    world = None if world_size == nodes * ranks_per_node else world_size
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(local_rank % torch.cuda.device_count())
            return Cluster(nodes, ranks_per_node, props.total_memory / GB, "gpu", world, host_memory_gb(),
                           peak_tflops=None)
    except ImportError:
        pass
    host = host_memory_gb()
    if host is None:
        return None
    return Cluster(nodes, ranks_per_node, host / ranks_per_node, "cpu", world, host, peak_tflops=None)


def plan_for_launch(cfg: PaddConfig, env) -> Plan | None:
    """train.py's check: plan this launch (a `LaunchEnv`) on the device it runs on."""
    cluster = device_cluster(env.world_size, env.local_size, env.local_rank)
    return None if cluster is None else make_plan(cfg, cluster)


def slurm_shape(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(nodes, ranks per node, world size) of a SLURM allocation, from its variables."""
    env = os.environ if environ is None else environ
    if "SLURM_NTASKS" not in env:
        raise ConfigError("not inside a SLURM allocation (SLURM_NTASKS is not set); pass --nodes and --gpus-per-node")
    world = int(env["SLURM_NTASKS"])
    spec = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or str(world)
    counts = expand_tasks_per_node(spec)
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(counts))
    return nodes, max(counts), world


def resolve_cluster(nodes: int, gpus_per_node: int, world_size: int | None = None, gpu_memory_gb: float | None = None,
                    host_memory_gb: float | None = None, peak_tflops: float | None = None,
                    mfu: float | None = None) -> Cluster:
    """A cluster from command-line facts; without --gpu-mem-gb the device this command runs
    on is measured (a GPU node's CUDA memory, else this host's RAM shared by its ranks)."""
    world = world_size if world_size is not None and world_size != nodes * gpus_per_node else None
    if gpu_memory_gb is not None:
        cluster = Cluster(nodes, gpus_per_node, gpu_memory_gb, "gpu", world, host_memory_gb)
    else:
        detected = device_cluster(world_size or nodes * gpus_per_node, gpus_per_node)
        if detected is None:
            raise ConfigError("cannot measure this host's memory; pass --gpu-mem-gb")
        cluster = dataclasses.replace(detected, nodes=nodes, world_size=world,
                                      host_memory_gb=host_memory_gb or detected.host_memory_gb,
                                      peak_tflops=DEFAULT_PEAK_TFLOPS if detected.device == "gpu" else None)
    if peak_tflops is not None:
        cluster = dataclasses.replace(cluster, peak_tflops=peak_tflops)
    if mfu is not None:
        if not 0 < mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
        cluster = dataclasses.replace(cluster, mfu=mfu)
    return cluster
