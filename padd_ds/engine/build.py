"""DeepSpeed engine for an HF MoE student: fill the DeepSpeed JSON (engine/ds_config.py), then
`deepspeed.initialize` with the PADD router installed."""

from __future__ import annotations

import torch

from padd_ds.config import PaddConfig
from padd_ds.engine.ds_config import build_ds_config
from padd_ds.launch.device import on_gpu
from padd_ds.models.router import padd_router_installed


def initialize_engine(cfg: PaddConfig, model: torch.nn.Module, num_students: int):
    """The DeepSpeed engine; with AutoEP every MoE layer gets the PADD router (models/router.py),
    which routes exactly like DeepSpeed's until a PADD stage switches its mode or bias."""
    import deepspeed

    ds = build_ds_config(cfg, getattr(model.config, "model_type", None), num_students, on_gpu())
    with padd_router_installed():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                              if p.requires_grad], config=ds)
    return engine, ds
