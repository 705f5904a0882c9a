"""Loading Hugging Face models and tokenizers: safetensors only, no remote code by default."""

from __future__ import annotations

import torch

from padd_ds.launch.device import rank_device
from padd_ds.models.arch import uses_bf16


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The torch dtype of a models.dtype setting for a model that computes on `device` (the
    rule: arch.uses_bf16); the device, not whether the node has a GPU (DS_ACCELERATOR=cpu)."""
    return torch.bfloat16 if uses_bf16(name, torch.device(device).type == "cuda") else torch.float32


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "auto", trust_remote_code: bool = False,
                   device: str | torch.device | None = None) -> torch.nn.Module:
    """Load an HF causal LM from a local directory or hub id, refusing pickle checkpoints, on
    `device` (default: the rank's). `dtype` resolves for the rank's device even when `device`
    is the host: a model staged there for DeepSpeed to partition computes on the rank's device.
    The weights go from the memory-mapped safetensors files straight to `device` (device_map):
    the ranks of a node share one page-cached copy of the checkpoint instead of each building
    a private one on the host first (8 x 61 GB for a Qwen3-30B-A3B student node)."""
    from transformers import AutoModelForCausalLM

    target = torch.device(rank_device() if device is None else device)
    return AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, rank_device()), use_safetensors=True,
                                                trust_remote_code=trust_remote_code, device_map={"": str(target)})


def decoder_layers(model: torch.nn.Module):
    """The decoder blocks of an HF Llama/Qwen/Mistral-style causal LM (or a DeepSpeed engine
    around one)."""
    model = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__} has no .model.layers; cluster activations need a "
                         "Llama/Qwen/Mistral-style decoder")
    return inner.layers


def load_partitioned_causal_lm(path: str, ds_config: dict, dtype: str = "auto",
                               trust_remote_code: bool = False) -> torch.nn.Module:
    """Load an HF causal LM straight into ZeRO-3 partitions over this process group (collective):
    transformers builds it under `deepspeed.zero.Init` while an `HfDeepSpeedConfig` of
    `ds_config` lives, and fills one module's gathered weights at a time from the memory-mapped
    safetensors files. No rank ever holds the whole model: the node's ranks share one page-cached
    mapping of the checkpoint instead of each reading a private copy (8 x 145 GB for a 72B
    teacher on one node). Each partition lands on the rank's device."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    stage = (ds_config.get("zero_optimization") or {}).get("stage")
    if stage != 3:
        raise ValueError(f"load_partitioned_causal_lm needs a ZeRO-3 DeepSpeed config, got stage {stage}")
    hf_ds = HfDeepSpeedConfig(ds_config)  # transformers reads ZeRO-3 from it for as long as it lives
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, rank_device()),
                                                    use_safetensors=True, trust_remote_code=trust_remote_code)
    finally:
        del hf_ds
        unset_hf_deepspeed_config()  # later loads (the student's, an evaluation's) are whole again
