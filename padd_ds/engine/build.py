"""DeepSpeed engine for an HF MoE student: resolve the JSON config, then `deepspeed.initialize`.

The DeepSpeed JSON stays the user's file (ZeRO stage, offload, comm knobs). Values that
must agree with the recipe may be written as "auto" (the Hugging Face convention) and are
filled from it: batch sizes, optimizer lr/weight decay, precision (bf16 on CUDA, fp32 on
CPU), and the AutoEP preset (from the student's model_type). A value the JSON sets
explicitly that contradicts the recipe is an error, not a silent override.
"""

from __future__ import annotations

import copy

import torch

from padd_ds.config import PaddConfig, read_deepspeed_config
from padd_ds.models.loading import autoep_preset


def _fill(section: dict, key: str, value, where: str) -> None:
    cur = section.get(key, "auto")
    if cur == "auto":
        section[key] = value
    elif cur != value:
        raise ValueError(f"{where}.{key}={cur!r} in the DeepSpeed JSON contradicts the recipe ({value!r}); "
                         f"set it to \"auto\" or make them agree")


def build_ds_config(cfg: PaddConfig, hf_config, num_students: int) -> dict:
    ds = copy.deepcopy(read_deepspeed_config(cfg))
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "")
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, "")
    _fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * num_students, "")
    ds.setdefault("gradient_clipping", 1.0)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    _fill(params, "lr", t.lr, "optimizer.params")
    _fill(params, "weight_decay", t.weight_decay, "optimizer.params")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and opt.get("type", "").lower() in ("adam", "adamw") and params.get("torch_adam", "auto") == "auto":
        # DeepSpeed's FusedAdam is JIT-compiled on CPU behind a file lock that a killed
        # process leaves stale (every later run then waits forever); torch's AdamW needs no build.
        params["torch_adam"] = True
    elif params.get("torch_adam") == "auto":
        params.pop("torch_adam")
    want_bf16 = cfg.models.dtype == "bfloat16" or (cfg.models.dtype == "auto" and on_gpu)
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = want_bf16
    ep = ds.get("expert_parallel")
    if ep and ep.get("enabled"):
        if cfg.deepspeed.expert_parallel_size is not None:
            ep["autoep_size"] = cfg.deepspeed.expert_parallel_size
        if ep.get("preset_model", "auto") == "auto":
            ep["preset_model"] = autoep_preset(hf_config)
        if ep.get("use_grouped_mm", "auto") == "auto":
            ep["use_grouped_mm"] = on_gpu  # grouped GEMM kernels are CUDA-only
    ds.setdefault("steps_per_print", 10**9)  # we do our own logging
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def initialize_engine(cfg: PaddConfig, model: torch.nn.Module, num_students: int):
    """The DeepSpeed engine; with AutoEP every MoE layer gets the PADD router (models/router.py),
    which routes exactly like DeepSpeed's until a PADD stage switches its mode or bias."""
    import deepspeed

    from padd_ds.models.router import padd_router_installed

    ds = build_ds_config(cfg, model.config, num_students)
    with padd_router_installed():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                              if p.requires_grad], config=ds)
    return engine, ds
