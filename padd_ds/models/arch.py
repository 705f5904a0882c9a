"""Architecture facts shared by validation, the planner and the engine (no torch).

One place for: where an HF config keeps a field, the routed-expert count's name per
model_type, an MoE's (experts, top-k), DeepSpeed's AutoEP preset per model_type, the
expert-parallel size of a run, and what `models.dtype: auto` means.
"""

from __future__ import annotations

from typing import Any, Mapping

from padd_ds.config import ConfigError

# The routed-expert count's name per model_type (as DeepSpeed's AutoEP presets read it).
EXPERT_COUNT_FIELD = {
    "qwen3_moe": "num_experts",
    "qwen2_moe": "num_experts",
    "mixtral": "num_local_experts",
    "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts",
}
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")

# DeepSpeed AutoEP preset for each HF model_type we support as a student.
AUTOEP_PRESETS = {
    "qwen3_moe": "qwen3_moe",
    "qwen2_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
}


def model_field(conf: Mapping[str, Any], name: str) -> Any:
    """A field of an HF config; multimodal configs keep the LM's under text_config."""
    if conf.get(name) is not None:
        return conf[name]
    text = conf.get("text_config")
    return text.get(name) if isinstance(text, Mapping) else None


def expert_count(conf: Mapping[str, Any]) -> int:
    """Routed experts of an HF config; 0 for a dense model. The family's own field name
    first, then any: transformers 5.x saves Qwen3-MoE's count as `num_local_experts`."""
    own = EXPERT_COUNT_FIELD.get(model_field(conf, "model_type"))
    names = ([own] if own else []) + [n for n in EXPERT_COUNT_FIELDS if n != own]
    counts = (model_field(conf, name) for name in names)
    return next((n for n in counts if isinstance(n, int) and not isinstance(n, bool) and n > 0), 0)


def moe_shape(conf: Mapping[str, Any] | Any, where: str = "config.json") -> tuple[int, int] | None:
    """(routed experts, top-k) of an HF config (a mapping or a transformers config object),
    None for a dense model."""
    if not isinstance(conf, Mapping):
        conf = conf.to_dict()
    experts = expert_count(conf)
    if not experts:
        return None
    top_k = model_field(conf, "num_experts_per_tok")
    if not isinstance(top_k, int):
        raise ConfigError(f"'{where}' has {experts} experts but no integer num_experts_per_tok")
    return experts, top_k


def autoep_preset(model_type: str | None) -> str:
    if model_type not in AUTOEP_PRESETS:
        raise ValueError(f"student model_type '{model_type}' has no DeepSpeed AutoEP preset; supported: "
                         f"{sorted(AUTOEP_PRESETS)}")
    return AUTOEP_PRESETS[model_type]


def expert_parallel_size(ds: Mapping[str, Any], override: int | None = None,
                         where: str = "the DeepSpeed JSON") -> int:
    """deepspeed.expert_parallel_size (`override`), else the DeepSpeed JSON's
    expert_parallel.autoep_size when expert_parallel is enabled (DeepSpeed's own default is
    1), else 1. `where` names the JSON in errors."""
    if override is not None:
        return override
    ep = ds.get("expert_parallel") or {}
    if not isinstance(ep, dict):
        raise ConfigError(f"deepspeed.config: expert_parallel in '{where}' must be a JSON object")
    if not ep.get("enabled", False):
        return 1
    size = ep.get("autoep_size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"deepspeed.config: expert_parallel.autoep_size in '{where}' must be an integer >= 1, "
                          f"got {size!r}; or set deepspeed.expert_parallel_size")
    return size


def uses_bf16(dtype: str, cuda: bool) -> bool:
    """models.dtype: auto is bf16 on CUDA (what clusters train in) and fp32 on CPU (bf16
    matmuls are slow and lossy there)."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return dtype == "bfloat16" or (dtype == "auto" and cuda)
