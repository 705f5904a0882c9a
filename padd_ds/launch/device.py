"""This rank's device, from one place: where its models are loaded and every tensor fed to
them goes.

DeepSpeed's accelerator names it: cuda:<local rank % GPUs on the node> once `use_local_device`
has run (`setup_world` calls it before anything loads), the CPU under DS_ACCELERATOR=cpu. More
processes than GPUs share them round-robin (1 student + 1 teacher on a 1-GPU node both use
cuda:0), but NCCL refuses two ranks of one world on one GPU ("Duplicate GPU detected"), so
`check_ranks_fit_devices` stops such a world before it starts.

    model = load_causal_lm(path, cfg.models.dtype)        # on rank_device()
    out = engine(input_ids=batch.to(rank_device()).ids)   # inputs follow

Weights go from the memory-mapped checkpoint straight to this device (models/loading.py); a
ZeRO-3 teacher loads straight into its partitions here; only decompression builds a student on
the host. What goes to host code (bridge messages, statistics, `.tolist()`) is moved back
explicitly where it leaves.
"""

from __future__ import annotations

import torch


def rank_device() -> torch.device:
    """The accelerator's current device (the CPU under DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def local_device_index(local_rank: int, device_count: int) -> int:
    """The node's device that local rank `local_rank` uses: round-robin over `device_count`
    devices (local rank 8 of a 9-process node with 8 GPUs shares GPU 0 with local rank 0)."""
    if local_rank < 0:
        raise ValueError(f"local rank {local_rank} must be >= 0")
    return local_rank % device_count if device_count > 0 else 0


def use_local_device(local_rank: int) -> None:
    """Make this node's device `local_rank % device count` the rank's device (before any model
    loads or process group starts): without it every process of a node would use GPU 0, and
    with more processes than GPUs a plain `local_rank` names a device that does not exist."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return  # nothing to choose (DeepSpeed's CPU accelerator counts NUMA nodes as devices)
    acc.set_device(local_device_index(local_rank, acc.device_count()))


def check_ranks_fit_devices(ranks_on_node: int, device_count: int, world: str) -> None:
    """NCCL runs one rank of a world per GPU: refuse a world with more ranks on this node than
    it has GPUs, naming the fix, before NCCL's "Duplicate GPU detected" (ranks of different
    worlds, such as a teacher beside the students, may share a GPU)."""
    if device_count > 0 and ranks_on_node > device_count:
        raise ValueError(
            f"the {world} world has {ranks_on_node} ranks on this node but it has {device_count} GPU(s); NCCL cannot "
            f"run two ranks of one world on one GPU: launch at most {device_count} {world} rank(s) per node "
            "(a teacher rank may share a GPU with a student)")


def on_gpu() -> bool:
    """True when this rank computes on a CUDA device: bf16 for `models.dtype: auto`, NCCL."""
    return rank_device().type == "cuda"


def release_device_memory() -> None:
    """Hand the memory of tensors just dropped (a whole model's) back to the device, for the
    allocations of another phase and of other libraries (NCCL); nothing to do on the host."""
    import gc

    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()
