"""One process's run: a teacher rank serves, a student (or colocated) rank trains."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist

from padd_ds.config import PaddConfig
from padd_ds.launch.device import rank_device
from padd_ds.launch.world import World
from padd_ds.models.loading import resolve_dtype
from padd_ds.pipeline.student import run_student
from padd_ds.teacher.rank import run_teacher


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: PaddConfig, world: World) -> None:
    print(describe_device(world, cfg), flush=True)
    seed_everything(cfg.run.seed)
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, world.env.local_size)))
    if world.is_teacher:
        run_teacher(cfg, world)
    else:
        run_student(cfg, world)


def describe_device(world: World, cfg: PaddConfig) -> str:
    """One line per rank: where it computes, its collective backend and its models' dtype
    (bench/gpu_check.sh reads it: `[device] rank 1 (teacher): cuda:0 (NVIDIA H100 80GB HBM3),
    backend none, models bfloat16`)."""
    dev = rank_device()
    name = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    dtype = str(resolve_dtype(cfg.models.dtype, dev)).removeprefix("torch.")
    return f"[device] rank {world.env.rank} ({world.roles.role}): {dev}{name}, backend {backend}, models {dtype}"
