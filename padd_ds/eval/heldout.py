"""Held-out accuracy of a model on the run's evaluation suite (`eval.*`), greedy pass@1 on the
plain training prompt: the numbers of the run's accuracy table."""

from __future__ import annotations

import math

import torch

from padd_ds.config import PaddConfig
from padd_ds.data.math import load_heldout_problems, load_suite
from padd_ds.eval.evaluate import Decoding, accuracy_of, evaluate_problems
from padd_ds.launch.comm import all_reduce_


def heldout_accuracy(model, tok, cfg: PaddConfig, synced: bool = False, share: tuple[int, int] = (0, 1)) -> dict:
    """{accuracy, n, per_level} on the toy suite; on a benchmark suite the accuracy is the mean
    over its benchmarks (the paper's average) with each one's in `per_benchmark`. `synced` keeps
    every rank of a sharded model generating in step; `share` = (rank, ranks) splits the
    problems over those ranks (`shared_accuracy`)."""
    decoding = Decoding(cfg.eval.max_new_tokens, cfg.eval.batch_size)
    if cfg.eval.suite == "toy":
        res = _accuracy(model, tok, load_heldout_problems("toy", limit=cfg.eval.num_problems), decoding, synced, share)
        return {"accuracy": res["accuracy"], "n": res["n"], "per_level": res.get("per_level", {})}
    per = {name: _accuracy(model, tok, problems, decoding, synced, share)
           for name, problems in load_suite(cfg.eval.suite, limit=cfg.eval.num_problems).items()}
    return {"accuracy": sum(r["accuracy"] for r in per.values()) / len(per), "n": sum(r["n"] for r in per.values()),
            "per_benchmark": {name: r["accuracy"] for name, r in per.items()}}


def _accuracy(model, tok, problems: list[dict], decoding: Decoding, synced: bool, share: tuple[int, int]) -> dict:
    if share[1] == 1:
        return evaluate_problems(model, tok, problems, decoding, synced_gpus=synced)
    return shared_accuracy(model, tok, problems, decoding, *share, synced=synced)


def shared_accuracy(model, tok, problems: list[dict], decoding: Decoding, rank: int, ranks: int,
                    synced: bool = True) -> dict:
    """Accuracy on `problems` over `ranks` ranks that all call this (collective): rank r answers
    problems r, r + ranks, ..., and the graded answers are summed over the ranks, so each
    returns the whole result. `synced`: a model ZeRO-3-sharded over them, whose forwards must
    pair up: every rank generates in step and runs as many prompts (its share, padded with
    repeats); ranks with whole copies each go at their own pace."""
    own = list(range(rank, len(problems), ranks))
    width = math.ceil(len(problems) / ranks) if synced else len(own)
    pad = [own[0] if own else 0] * (width - len(own))
    mine = [problems[i] for i in own + pad]  # empty: a rank beyond the last problem (whole copies only)
    records = evaluate_problems(model, tok, mine, decoding, synced_gpus=synced, keep_records=None)["samples"] \
        if mine else []
    correct = torch.zeros(len(problems), dtype=torch.float64)
    for i, record in zip(own, records):  # the padding's answers are dropped
        correct[i] = float(record["correct"])
    all_reduce_(correct)
    return accuracy_of(problems, [bool(c) for c in correct.tolist()])
