"""Held-out accuracy of a model on the run's evaluation suite (`eval.*`), greedy pass@1 on the
plain training prompt: the numbers of the run's accuracy table."""

from __future__ import annotations

from padd_ds.config import PaddConfig
from padd_ds.data.math import load_heldout_problems, load_suite
from padd_ds.eval.evaluate import Decoding, evaluate_problems


def heldout_accuracy(model, tok, cfg: PaddConfig, synced: bool = False) -> dict:
    """{accuracy, n, per_level} on the toy suite; on a benchmark suite the accuracy is the mean
    over its benchmarks (the paper's average) with each one's in `per_benchmark`. `synced` keeps
    every rank of a sharded model generating in step."""
    decoding = Decoding(cfg.eval.max_new_tokens, cfg.eval.batch_size)
    if cfg.eval.suite == "toy":
        res = evaluate_problems(model, tok, load_heldout_problems("toy", limit=cfg.eval.num_problems), decoding,
                                synced_gpus=synced)
        return {"accuracy": res["accuracy"], "n": res["n"], "per_level": res.get("per_level", {})}
    per = {name: evaluate_problems(model, tok, problems, decoding, synced_gpus=synced)
           for name, problems in load_suite(cfg.eval.suite, limit=cfg.eval.num_problems).items()}
    return {"accuracy": sum(r["accuracy"] for r in per.values()) / len(per), "n": sum(r["n"] for r in per.values()),
            "per_benchmark": {name: r["accuracy"] for name, r in per.items()}}
