"""This rank's device, from one place: where its models are loaded and every tensor fed to
them goes.

DeepSpeed's accelerator names it: cuda:<local rank> on a GPU node once `use_local_device` has
run (`setup_world` calls it before anything loads), the CPU under DS_ACCELERATOR=cpu.

    model = load_causal_lm(path, cfg.models.dtype)        # on rank_device()
    out = engine(input_ids=batch.to(rank_device()).ids)   # inputs follow

Two kinds of model stay on the host on purpose: a student or a ZeRO-3 teacher is read there
and DeepSpeed moves each partition to this device. What goes to host code (bridge messages,
statistics, `.tolist()`) is moved back explicitly where it leaves.
"""

from __future__ import annotations

import torch


def rank_device() -> torch.device:
    """The accelerator's current device (the CPU under DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def use_local_device(local_rank: int) -> None:
    """Make device `local_rank` of this node the rank's device (before any model loads or
    process group starts): without it every process of a node would use GPU 0."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().set_device(local_rank)  # a no-op on the CPU accelerator


def on_gpu() -> bool:
    """True when this rank computes on a CUDA device: bf16 for `models.dtype: auto`, NCCL."""
    return rank_device().type == "cuda"
