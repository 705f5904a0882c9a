"""One process's run: a teacher rank serves, a student (or colocated) rank trains."""

from __future__ import annotations

import random

import numpy as np
import torch

from padd_ds.config import PaddConfig
from padd_ds.launch.world import World
from padd_ds.pipeline.student import run_student
from padd_ds.teacher.rank import run_teacher


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: PaddConfig, world: World) -> None:
    seed_everything(cfg.run.seed)
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, world.env.local_size)))
    if world.is_teacher:
        run_teacher(cfg, world)
    else:
        run_student(cfg, world)
