"""Export the trained engine as a native transformers checkpoint, and check it against the engine.

A Stage IV bias has no slot in Qwen3-MoE/Mixtral/DeepSeek-V2 routers: the export folds it
into the router weights (fitted on held-out D_D tokens) and measures how often the exported
model still picks the engine's experts; the exact routing (`load_exact_routing`) is checked
too. DeepSeek-V3 takes the bias exactly in its selection-bias slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from padd_ds.config import PaddConfig
from padd_ds.data.batch import TokenBatch, encode_examples
from padd_ds.engine import checkpoint as ckpt
from padd_ds.engine.build import park_training_state
from padd_ds.launch.device import rank_device, release_device_memory
from padd_ds.models.export import (EXACT_ROUTING_FILE, engine_routes, export_engine, fold_router_bias, has_bias_slot,
                                   load_exact_routing, routing_fidelity)
from padd_ds.models.loading import load_causal_lm
from padd_ds.pipeline.records import ExportReport, RunContext
from padd_ds.teacher.feed import BatchPlan


@dataclass
class VerifiedExport:
    """The export's report, and the exported student's held-out accuracy on the main rank."""

    report: ExportReport
    student_after: dict | None


def export_and_verify(ctx: RunContext, evaluate: Callable[[torch.nn.Module], dict] | None = None
                      ) -> VerifiedExport | None:
    """Collective over the student ranks; the main rank returns the verified export, with
    `evaluate(model)` of the exported student (and of its exact routing when `eval.exact_routing`),
    which every rank calls with its own loaded copy."""
    cfg, engine = ctx.cfg, ctx.engine
    held = heldout_batches(ctx)
    fit_batches, fidelity_batches = held[0::2], held[1::2]  # fidelity on tokens the fold never saw
    exact_bias = has_bias_slot(engine.module)  # DeepSeek-V3: the bias has a slot, no fold needed
    folded = None if exact_bias else fold_router_bias(engine, fit_batches)[0]
    engine_choices = engine_routes(engine, fidelity_batches)
    export_dir = ctx.run_dir / "hf"
    export_engine(engine, export_dir, tokenizer=ctx.tok, router_weights=folded,
                  metadata=export_metadata(cfg, exact_bias, folded is not None))
    probe, engine_logits = probe_logits(engine, ctx.tok, cfg, ctx.pool)
    checkpoint = ckpt.latest_saved(ctx.ckpt_dir) or ctx.ckpt_dir  # just written: verified on the next resume
    park_training_state(engine)  # the engine's work is done: the device is the export copy's
    main = ctx.world.is_main

    def check(exact_routing: bool, evaluated: bool) -> tuple[float | None, float | None, dict | None]:
        """Load one exported copy, check it (main rank) and evaluate it (`evaluate` may split the
        problems over the student ranks: every rank loads), drop it: two copies of a
        paper-scale student (61 GB each in bf16) fit no GPU."""
        model = load_causal_lm(str(export_dir), cfg.models.dtype)  # bf16 on a GPU: 30B in fp32 fits none
        if exact_routing:
            model = load_exact_routing(model, export_dir)
        checks = ((max_logit_diff(model, probe, engine_logits), routing_fidelity(model, fidelity_batches, engine_choices))
                  if main else (None, None))
        out = (*checks, evaluate(model) if evaluate is not None and evaluated else None)
        del model
        release_device_memory()
        return out

    diff, fidelity, after = check(False, True)
    exact = None
    if folded is not None:
        ex_diff, ex_fidelity, ex_after = check(True, cfg.eval.exact_routing)
        exact = {"max_abs_logit_diff": ex_diff, "routing_fidelity": ex_fidelity, "student_after": ex_after}
    if not main:
        return None
    report = ExportReport(diff, fidelity, folded is not None, exact_bias, exact, str(checkpoint), str(export_dir))
    return VerifiedExport(report, after)


def heldout_batches(ctx: RunContext) -> list[TokenBatch]:
    """Up to 8 batches of held-out (D_D) solutions per rank: half fit the fold, half measure it."""
    held = BatchPlan(len(ctx.parts["D"]), ctx.cfg.train.micro_batch_size, ctx.num_students, 1, ctx.cfg.run.seed + 29)
    return [ctx.encode([ctx.parts["D"][j] for j in held.indices(i, 0, ctx.rank)])
            for i in range(min(8, held.batches_per_epoch))]


def export_metadata(cfg: PaddConfig, exact_bias: bool, folded: bool) -> dict:
    if exact_bias:
        bias = "added to e_score_correction_bias (exact)"
    elif folded:
        bias = ("folded into the router weights (softmax regression, see padd_ds/models/export.py); exact routing: "
                f"load_exact_routing with {EXACT_ROUTING_FILE}")
    else:
        bias = "zero"
    return {"source": "padd-ds", "mode": cfg.train.mode, "steps": cfg.train.steps, "teacher": cfg.models.teacher,
            "student": cfg.models.student, "router_bias": bias}


@torch.no_grad()
def probe_logits(engine, tok, cfg: PaddConfig, problems: list[dict]) -> tuple[TokenBatch, torch.Tensor]:
    """Engine logits on a fixed batch (every student rank runs it; AutoEP needs them all)."""
    batch = encode_examples(tok, problems[:4], cfg.data.max_prompt_tokens, cfg.data.max_response_tokens)
    dev = batch.to(rank_device())
    engine.eval()
    logits = engine(input_ids=dev.ids, attention_mask=dev.attention_mask).logits.float()
    engine.train()
    return batch, logits


@torch.no_grad()
def max_logit_diff(model, batch: TokenBatch, reference: torch.Tensor) -> float:
    """Largest |logit| difference over the non-padded positions of `batch`."""
    batch = batch.to(rank_device())
    logits = model(input_ids=batch.ids, attention_mask=batch.attention_mask).logits.float()
    valid = batch.attention_mask.bool()
    return (logits[valid] - reference[valid]).abs().max().item()
