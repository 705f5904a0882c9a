"""The DeepSpeed JSON: find it, read it, and fill it from the recipe (no torch).

The DeepSpeed JSON stays the user's file (ZeRO stage, offload, comm knobs). Values that
must agree with the recipe may be written as "auto" (the Hugging Face convention) and are
filled from it: batch sizes (in train.mode=padd the accumulation steps follow from the
rollout batch: config.accumulation_steps), optimizer lr/weight decay, precision (models/arch.uses_bf16),
and the AutoEP preset (from the student's model_type). A value the JSON sets explicitly that
contradicts the recipe is an error, not a silent override.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from padd_ds.config import ConfigError, PaddConfig, accumulation_steps
from padd_ds.models.arch import autoep_preset, uses_bf16
from padd_ds.paths import REPO_ROOT, local_path


def resolve_deepspeed_config(cfg: PaddConfig, repo_root: str | Path | None = None) -> Path:
    """deepspeed.config relative to the working directory, else to the repository."""
    local = local_path(cfg.deepspeed.config, repo_root)
    if local is None or not local.is_file():
        places = dict.fromkeys(str(p) for p in (Path.cwd(), Path(repo_root or REPO_ROOT).resolve()))
        raise ConfigError(
            f"deepspeed.config: DeepSpeed JSON '{cfg.deepspeed.config}' not found "
            f"(looked in {' and '.join(places)}); point deepspeed.config at a JSON file"
        )
    return local


def read_deepspeed_config(cfg: PaddConfig, repo_root: str | Path | None = None) -> dict[str, Any]:
    path = resolve_deepspeed_config(cfg, repo_root)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: '{path}' is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config: '{path}' must hold a JSON object")
    return data


def _fill(section: dict, key: str, value, where: str) -> None:
    cur = section.get(key, "auto")
    if cur == "auto":
        section[key] = value
    elif cur != value:
        raise ValueError(f"{where}.{key}={cur!r} in the DeepSpeed JSON contradicts the recipe ({value!r}); "
                         f"set it to \"auto\" or make them agree")


def build_ds_config(cfg: PaddConfig, model_type: str | None, num_students: int, on_gpu: bool,
                    load_universal: bool = False) -> dict:
    """The DeepSpeed JSON with its "auto" values filled for a student of `model_type`
    trained by `num_students` ranks on CUDA (`on_gpu`) or the CPU; `load_universal`: the run
    resumes from a universal checkpoint (another student world or expert-parallel size)."""
    ds = copy.deepcopy(read_deepspeed_config(cfg))
    t = cfg.train
    gas = accumulation_steps(cfg, num_students)  # padd: the rollout batch in micro-batches
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "")
    _fill(ds, "gradient_accumulation_steps", gas, "")
    _fill(ds, "train_batch_size", t.micro_batch_size * gas * num_students, "")
    ds.setdefault("gradient_clipping", 1.0)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    _fill(params, "lr", t.lr, "optimizer.params")
    _fill(params, "weight_decay", t.weight_decay, "optimizer.params")
    if not on_gpu and opt.get("type", "").lower() in ("adam", "adamw") and params.get("torch_adam", "auto") == "auto":
        # DeepSpeed's FusedAdam is JIT-compiled on CPU behind a file lock that a killed
        # process leaves stale (every later run then waits forever); torch's AdamW needs no build.
        params["torch_adam"] = True
    elif params.get("torch_adam") == "auto":
        params.pop("torch_adam")
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = uses_bf16(cfg.models.dtype, on_gpu)
    ep = ds.get("expert_parallel")
    if ep and ep.get("enabled"):
        if cfg.deepspeed.expert_parallel_size is not None:
            ep["autoep_size"] = cfg.deepspeed.expert_parallel_size
        if ep.get("preset_model", "auto") == "auto":
            ep["preset_model"] = autoep_preset(model_type)
        if ep.get("use_grouped_mm", "auto") == "auto":
            ep["use_grouped_mm"] = on_gpu  # grouped GEMM kernels are CUDA-only
    # Ours to set: engine/checkpoint.py converts a checkpoint only when the layout changed.
    ds.setdefault("checkpoint", {})["load_universal"] = load_universal
    ds.setdefault("steps_per_print", 10**9)  # we do our own logging
    ds.setdefault("wall_clock_breakdown", False)
    return ds
