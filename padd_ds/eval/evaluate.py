"""Batched greedy generation and accuracy on question/answer problems.

Prompts are left-padded so that every row's continuation starts at the same
position; that is what lets ``model.generate`` run a batch with one KV cache.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from padd_ds.data.prompt import format_prompt
from padd_ds.eval.grading import grade


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                    synced_gpus: bool = False) -> list[str]:
    """Greedy continuations of ``prompts``, decoded and cut at the first EOS.

    ``synced_gpus``: the model is ZeRO-3-partitioned over several ranks that all run this
    call; they keep stepping together until every rank is done."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of str")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if eos_id is None:
        raise ValueError("tokenizer has no eos_token_id; generation could not stop")
    was_training = model.training
    old_side = tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            batch = {k: v.to(device) for k, v in batch.items()}
            gen = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
                synced_gpus=synced_gpus,
            )
            for row in gen[:, batch["input_ids"].shape[1] :].tolist():
                if eos_id in row:
                    row = row[: row.index(eos_id)]
                outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return outputs


def evaluate_problems(
    model, tokenizer, problems: list[dict[str, Any]], max_new_tokens: int, batch_size: int = 64,
    synced_gpus: bool = False,
) -> dict[str, Any]:
    """Greedy accuracy on ``problems`` (dicts with ``question``, ``answer``, optional ``level``)."""
    for i, p in enumerate(problems):
        if "question" not in p or "answer" not in p:
            raise KeyError(f"problem {i} needs 'question' and 'answer' keys, has {sorted(p)}")
    prompts = [format_prompt(p["question"]) for p in problems]
    responses = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, synced_gpus)
    correct = [grade(r, str(p["answer"])) for r, p in zip(responses, problems)]
    by_level: dict[Any, list[bool]] = defaultdict(list)
    for p, ok in zip(problems, correct):
        if "level" in p:
            by_level[p["level"]].append(ok)
    return {
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "n": len(correct),
        "per_level": {lv: sum(v) / len(v) for lv, v in sorted(by_level.items())},
        "samples": [
            {"question": p["question"], "response": r, "answer": str(p["answer"]), "correct": ok}
            for p, r, ok in list(zip(problems, responses, correct))[:5]
        ],
    }
