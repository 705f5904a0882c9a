"""DeepSpeed engine for an HF MoE student: fill the DeepSpeed JSON (engine/ds_config.py), then
`deepspeed.initialize` with the PADD router installed."""

from __future__ import annotations

import re

import torch

from padd_ds.config import PaddConfig
from padd_ds.engine.ds_config import build_ds_config
from padd_ds.launch.device import on_gpu, release_device_memory
from padd_ds.models.router import padd_router_installed


def initialize_engine(cfg: PaddConfig, model: torch.nn.Module, num_students: int, load_universal: bool = False):
    """The DeepSpeed engine; with AutoEP every MoE layer gets the PADD router (models/router.py),
    which routes exactly like DeepSpeed's until a PADD stage switches its mode or bias.
    `load_universal`: it will load a universal checkpoint (a resume on another layout)."""
    import deepspeed

    ds = build_ds_config(cfg, getattr(model.config, "model_type", None), num_students, on_gpu(), load_universal)
    if cfg.train.activation_checkpointing:
        enable_checkpointing(model)
    with padd_router_installed():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg), config=ds)
    return engine, ds


# Every AutoEP preset's router is the `gate` of its MoE block (`model.layers.N.mlp`); dense MLPs
# name theirs gate_proj, Qwen2-MoE's shared-expert gate is shared_expert_gate.
_ROUTER_PARAM = re.compile(r"(^|\.)layers\.\d+\.mlp\.gate\.(weight|bias)$")


def param_groups(model: torch.nn.Module, cfg: PaddConfig) -> list:
    """The optimizer's parameters: one group, or with train.router_lr_scale != 1 the routers in a
    group of their own at train.lr x the scale (`lr_scale` kept in the group, so code that sets
    the rate, such as Stage I's warmup, keeps the ratio). AutoEP's replacement routers inherit
    their source's group (DeepSpeed remaps them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    scale = cfg.train.router_lr_scale
    if scale == 1:
        return params
    router = [p for n, p in model.named_parameters() if p.requires_grad and _ROUTER_PARAM.search(n)]
    if not router:
        raise ValueError(f"train.router_lr_scale={scale}: {type(model).__name__} has no router parameter named "
                         "layers.N.mlp.gate.weight (an AutoEP preset's router); set it to 1")
    ids = {id(p) for p in router}
    # Named: DeepSpeed's MoE grouping keys its expert groups by the group's name.
    return [{"name": "routers", "params": router, "lr": cfg.train.lr * scale, "lr_scale": scale},
            {"name": "dense-params", "params": [p for p in params if id(p) not in ids]}]


def apply_learning_rates(engine, cfg: PaddConfig) -> list[tuple[float, float]]:
    """Set every optimizer group's rate from the config: a checkpoint's load restores the rates it
    was saved with, and a resume must train at the recipe's (Megatron's
    --override-opt_param-scheduler). Returns (checkpoint's, config's) of each group that changed."""
    changed = []
    for g in engine.optimizer.param_groups:
        if "lr_scale" in g:  # the routers' group (param_groups)
            g["lr_scale"] = cfg.train.router_lr_scale
        lr = cfg.train.lr * g.get("lr_scale", 1.0)
        if g["lr"] != lr:
            changed.append((g["lr"], lr))
            g["lr"] = lr
    return changed


def enable_checkpointing(model: torch.nn.Module) -> None:
    """HF gradient checkpointing on every decoder layer, non-reentrant: its recompute keeps the
    forward's autograd graph, so the router scores the losses read from outside the layers
    (models/router.py) keep their gradient, and AutoEP's replaced MoE layers and ZeRO-3's
    gathers run again inside it. Active in train mode only: rollouts and evaluations
    (eval mode) generate with the KV cache as before."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.activation_checkpointing: {type(model).__name__} does not support HF "
                         "gradient checkpointing; set it to false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def park_training_state(engine) -> None:
    """After the last optimizer step and the export: move the engine's optimizer state, fp32
    master weights, gradients and parameter partitions to the host (DeepSpeed's offload_states),
    so the export's checks and the evaluation have the device to themselves (a 30B student in
    bf16 is 61 GB beside ~10 GB of training state on 80). The engine must not run afterwards.
    Only on a GPU (on the host there is nothing to free); a DeepSpeed that cannot (its offload
    supports FusedAdam only) leaves the state where it is, with a warning."""
    import sys

    if not on_gpu():
        return
    try:
        engine.offload_states(pin_memory=False)  # unpinned: page-locking ~10 GB would cost more than it saves
    except (AssertionError, NotImplementedError, RuntimeError) as e:
        print(f"padd-ds: warning: the training state stays on the device during the export's checks and the "
              f"evaluation ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return
    release_device_memory()
