"""The whole student as a plain transformers model on every student rank, for one rollout
phase (rollout.backend=hf_gathered).

`generate` on the ZeRO-3 + AutoEP engine gathers every layer's parameters and exchanges the
tokens between the expert-parallel ranks at every decode step, with all ranks in step. Here
each parameter is gathered once per phase (the ZeRO-3 gather, then the expert-parallel
all-gather that export does) into a transformers model built from the engine's config on the
rank's device, in the engine's dtype. It routes as the engine: the gathered router weights,
the Stage IV bias added to the scores before top-k and the unbiased scores as weights
(export's exact-routing hook; DeepSeek-V3 carries the bias in its own selection-bias slot).
Each rank then generates its own prompts with no collective, and the copy is freed when the
phase ends. TRL's `ds3_gather_for_generation` gathers in place instead; with AutoEP the
experts would stay split over the expert-parallel group and every decode step would still
run its all-to-alls.

    with gathered_student(engine) as model:   # collective: every student rank enters
        model.generate(...)                   # no collective
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

from padd_ds.launch.device import rank_device, release_device_memory
from padd_ds.models.export import biased_selection, fit_layout, gather_full, hf_name_and_tensor, score_biases
from padd_ds.models.router import PaddRouter, routers


@contextlib.contextmanager
def gathered_student(engine) -> Iterator[torch.nn.Module]:
    """The engine's model, gathered whole on this rank (collective), for the `with` block."""
    model = _gather(engine)
    try:
        yield model
    finally:
        del model  # the caller's name for it goes with its frame; the memory is reused for training
        release_device_memory()


@torch.no_grad()
def _gather(engine) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    module = engine.module
    _check_learned_routing(module)
    dtype = next(module.parameters()).dtype
    with torch.device(rank_device()), no_init_weights():  # every weight is overwritten below
        model = AutoModelForCausalLM.from_config(module.config, dtype=dtype)
    model.tie_weights()  # no_init_weights skips the tying too: an untied lm_head would stay uninitialised
    model.generation_config = copy.deepcopy(module.generation_config)
    targets = dict(model.named_parameters())
    pending: dict = {}
    for name, p in module.named_parameters():  # the same order on every rank: the gathers pair up
        t = gather_full(engine, name, p)
        for hf_name, ht in hf_name_and_tensor(name, t, pending):
            if hf_name not in targets:
                raise ValueError(f"hf_gathered: engine parameter {name} maps to '{hf_name}', which the "
                                 f"{type(model).__name__} architecture does not have")
            dst = targets.pop(hf_name)
            dst.copy_(fit_layout(hf_name, ht, tuple(dst.shape)))
    if pending or targets:
        raise ValueError(f"hf_gathered: unpaired expert weights {sorted(pending)} or no engine tensor for "
                         f"{sorted(targets)[:5]}")
    slotted = set()
    for _, hf_name, bias in score_biases(module):
        model.get_buffer(hf_name).copy_(bias)
        slotted.add(hf_name.rsplit(".", 1)[0])
    for name, r in module.named_modules():
        if not isinstance(r, PaddRouter):
            continue
        gate = name.rsplit(".router", 1)[0] + ".gate"  # AutoEP's mlp.router.gate is transformers' mlp.gate
        if gate not in slotted and bool(r.padd_bias.any()):
            model.get_submodule(gate).register_forward_hook(biased_selection(model.config, r.padd_bias.detach().clone()))
    return model.eval()


def _check_learned_routing(module: torch.nn.Module) -> None:
    """The gathered model routes by the learned rule only; a Stage I or ablation routing mode
    (uniform experts) has no transformers counterpart."""
    modes = {r.mode for r in routers(module)}
    if modes != {"learned"}:
        raise ValueError(f"rollout.backend=hf_gathered: the routers are in mode {sorted(modes)}, which a "
                         "transformers model cannot reproduce; use rollout.backend=hf")
