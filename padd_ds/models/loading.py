"""Loading Hugging Face models and tokenizers: safetensors only, no remote code by default."""

from __future__ import annotations

import torch

from padd_ds.config import PaddConfig, resolve_model_path


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bf16 on CUDA (what clusters train in) and fp32 on CPU (bf16 matmuls are slow
    and lossy there)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def model_paths(cfg: PaddConfig) -> tuple[str, str | None, str]:
    """(teacher, student or None when it is decompressed from the teacher, tokenizer)."""
    teacher = resolve_model_path(cfg.models.teacher, field_name="models.teacher")
    student = (resolve_model_path(cfg.models.student, field_name="models.student")
               if cfg.models.student is not None else None)
    tok = (resolve_model_path(cfg.models.tokenizer, field_name="models.tokenizer", need_config=False)
           if cfg.models.tokenizer else teacher)  # a tokenizer-only directory has no config.json
    return teacher, student, tok


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "auto", trust_remote_code: bool = False,
                   device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load an HF causal LM from a local directory or hub id, refusing pickle checkpoints."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model.to(device)


def moe_shape(hf_config) -> tuple[int, int] | None:
    """(num routed experts, top-k) of an HF MoE config, None for a dense model."""
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        n = getattr(hf_config, attr, None)
        if n:
            return int(n), int(hf_config.num_experts_per_tok)
    return None


# DeepSpeed AutoEP preset for each HF model_type we support as a student.
AUTOEP_PRESETS = {
    "qwen3_moe": "qwen3_moe",
    "qwen2_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
}


def autoep_preset(hf_config) -> str:
    mt = getattr(hf_config, "model_type", None)
    if mt not in AUTOEP_PRESETS:
        raise ValueError(f"student model_type '{mt}' has no DeepSpeed AutoEP preset; supported: "
                         f"{sorted(AUTOEP_PRESETS)}")
    return AUTOEP_PRESETS[mt]


def decoder_layers(model: torch.nn.Module):
    """The decoder blocks of an HF Llama/Qwen/Mistral-style causal LM (or a DeepSpeed engine
    around one)."""
    model = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__} has no .model.layers; cluster activations need a "
                         "Llama/Qwen/Mistral-style decoder")
    return inner.layers
