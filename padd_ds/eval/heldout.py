"""Held-out accuracy of a model on the run's own evaluation set (`eval.*`), greedy pass@1 on
the plain training prompt: the numbers of the run's accuracy table."""

from __future__ import annotations

from padd_ds.config import PaddConfig
from padd_ds.data.math import load_heldout_problems
from padd_ds.eval.evaluate import Decoding, evaluate_problems


def heldout_accuracy(model, tok, cfg: PaddConfig, synced: bool = False) -> dict:
    """{accuracy, n, per_level}; `synced` keeps every rank of a sharded model generating in step."""
    problems = load_heldout_problems(cfg.data.source, limit=cfg.eval.num_problems)
    res = evaluate_problems(model, tok, problems, Decoding(cfg.eval.max_new_tokens, cfg.eval.batch_size),
                            synced_gpus=synced)
    return {"accuracy": res["accuracy"], "n": res["n"], "per_level": res.get("per_level", {})}
