"""vLLM plugin (entry point `vllm.general_plugins: padd = padd_ds.vllm_engine.plugin:register`):
registers the PADD routing variant of every MoE architecture the project exports. Names are
registered lazily ("module:Class"), so vLLM imports models.py only in processes that build one."""

from __future__ import annotations

# stock architecture -> its PADD variant (selects on softmax + Stage IV bias)
PADD_ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "PaddQwen3MoeForCausalLM",
    "MixtralForCausalLM": "PaddMixtralForCausalLM",
    "DeepseekV2ForCausalLM": "PaddDeepseekV2ForCausalLM",
}
PADD_MODEL_TYPES = ("qwen3_moe", "mixtral", "deepseek_v2")  # their config.model_type (validation reads it; no vLLM import)


def register() -> None:
    from vllm import ModelRegistry

    for padd in PADD_ARCHITECTURES.values():
        if padd not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(padd, f"padd_ds.vllm_engine.models:{padd}")
