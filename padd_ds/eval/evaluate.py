"""Generation and accuracy: greedy pass@1 and sampled avg@k, on a problem list or a suite.

Prompts are left-padded so every row's continuation starts at the same position (one KV
cache per batch), and sorted by length so a batch wastes little on padding. A tokenizer with
a chat template gets it (what an instruction-tuned math model was trained on); one without
gets the plain ``Question: ...\\nAnswer:`` prompt the toy models and the trainer use.

    decoding = Decoding(max_new_tokens=512, samples=4, prompt_style="auto")
    result = evaluate_suite(model, tokenizer, "gsm8k", decoding)   # pass@1, avg@4, pass@4
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from padd_ds.data.math import load_suite
from padd_ds.data.prompt import format_prompt
from padd_ds.eval.grading import extract_answer, grade
from padd_ds.models.generation import decoding_kwargs, eos_ids
from padd_ds.report.metrics import progress_bar

PromptStyle = Literal["auto", "chat", "plain"]

# Appended to the question in the chat prompt: the usual instruction of math-model evaluations,
# and what makes the model put its answer where `extract_answer` looks first.
CHAT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Generation budget per suite when the caller gives none: a toy solution is ~90 tokens, a
# GSM8K chain of thought ~300, competition solutions (AIME, Olympiad) run to thousands.
SUITE_MAX_NEW_TOKENS = {"toy": 128, "gsm8k": 512, "math5": 2048}


@dataclass(frozen=True)
class Decoding:
    """How answers are generated. An evaluation takes one greedy answer per problem (pass@1)
    and, with `samples` = k > 0, k sampled ones more (avg@k, pass@k). One `generate` pass
    gives k sampled answers per prompt, or one greedy answer when `samples` is 0."""

    max_new_tokens: int | None = None  # None: the suite's budget (SUITE_MAX_NEW_TOKENS, else 1024)
    batch_size: int = 64  # sequences per model.generate call
    samples: int = 0
    temperature: float = 0.6  # of the sampled answers
    top_p: float = 0.95  # of the sampled answers
    prompt_style: PromptStyle = "plain"  # see build_prompts
    seed: int = 0  # evaluate_suite seeds torch with it (the sampled answers' draws)


def build_prompts(tokenizer, questions: list[str], style: PromptStyle = "auto") -> tuple[list[str], bool]:
    """(prompts, add_special_tokens): chat-templated prompts already hold their special tokens."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "chat" and not has_template:
        raise ValueError("prompt style 'chat' needs a tokenizer with a chat template; use 'plain' or 'auto'")
    if style not in ("auto", "chat", "plain"):
        raise ValueError(f"prompt style must be auto, chat or plain, got {style!r}")
    if style == "plain" or not has_template:
        return [format_prompt(q) for q in questions], True
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{q}\n{CHAT_INSTRUCTION}"}],
                                             tokenize=False, add_generation_prompt=True) for q in questions]
    return prompts, False


def _check_decoding(d: Decoding) -> None:
    if d.max_new_tokens is None:
        raise ValueError("max_new_tokens must be set (evaluate_suite alone picks one per suite)")
    if d.max_new_tokens < 1 or d.batch_size < 1 or d.samples < 0:
        raise ValueError(f"need max_new_tokens >= 1, batch_size >= 1 and samples >= 0, got "
                         f"{d.max_new_tokens}, {d.batch_size}, {d.samples}")
    if d.samples and (d.temperature <= 0 or not 0 < d.top_p <= 1):
        raise ValueError(f"sampled answers need temperature > 0 and 0 < top_p <= 1, got {d.temperature}, {d.top_p} "
                         "(samples=0 gives one greedy answer per prompt)")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], decoding: Decoding, *, add_special_tokens: bool = True,
             synced_gpus: bool = False, on_batch: Callable[[int], None] | None = None) -> list[list[str]]:
    """``decoding.samples`` sampled continuations per prompt (one greedy one when it is 0),
    decoded and cut at the first EOS. ``on_batch(n)`` reports n more sequences done.

    ``synced_gpus``: the model is ZeRO-3-partitioned over several ranks that all run this
    call; they keep stepping together until every rank is done."""
    _check_decoding(decoding)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of str")
    max_new, n = decoding.max_new_tokens, max(decoding.samples, 1)
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # Decoding as `decoding` says, whatever the model's generation_config.json would add.
    sampling = decoding_kwargs(decoding.temperature if decoding.samples else None, decoding.top_p)
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    _warn_if_too_long(model, max(lengths, default=0) + max_new)
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # similar lengths share a batch
    per_batch = max(1, decoding.batch_size // n)
    outputs: list[list[str]] = [[] for _ in prompts]
    try:
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens)
            batch = {k: v.to(device) for k, v in batch.items()}
            gen = model.generate(**batch, max_new_tokens=max_new, num_return_sequences=n,
                                 eos_token_id=eos, pad_token_id=pad_id, synced_gpus=synced_gpus, **sampling)
            for row_no, row in enumerate(gen[:, batch["input_ids"].shape[1] :].cpu().tolist()):
                cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                outputs[idx[row_no // n]].append(tokenizer.decode(row[:cut], skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(idx) * n)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return outputs


_warned_length = False


def _warn_if_too_long(model, total: int) -> None:
    global _warned_length
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and total > limit and not _warned_length:
        print(f"warning: prompt + max_new_tokens reaches {total} tokens, beyond the model's "
              f"max_position_embeddings={limit}; answers past that are unreliable", file=sys.stderr)
        _warned_length = True


# ----------------------------------------------------------------------------------------
# Accuracy on a problem list
# ----------------------------------------------------------------------------------------

def _breakdown(problems: list[dict], correct: list[bool], key: str) -> dict[str, float]:
    groups: dict[Any, list[bool]] = defaultdict(list)
    for p, ok in zip(problems, correct):
        if p.get(key) is not None:
            groups[p[key]].append(ok)
    return {str(k): sum(v) / len(v) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def accuracy_of(problems: list[dict], correct: list[bool]) -> dict[str, Any]:
    """accuracy, n and the per-level and per-subject accuracy of graded answers to `problems`."""
    n = len(correct)
    return {"accuracy": sum(correct) / n if n else 0.0, "n": n, "per_level": _breakdown(problems, correct, "level"),
            "per_subject": _breakdown(problems, correct, "subject")}


def evaluate_problems(model, tokenizer, problems: list[dict[str, Any]], decoding: Decoding, *,
                      synced_gpus: bool = False, on_batch: Callable[[int], None] | None = None,
                      keep_records: int | None = 5) -> dict[str, Any]:
    """Greedy pass@1 on ``problems`` (dicts with ``question`` and ``answer``), and with
    ``decoding.samples`` = k > 0 also avg@k (mean accuracy of k sampled answers) and pass@k (any of k).

    The trainer calls this with the default plain prompt, the one it trains on.
    ``keep_records``: how many per-problem records to return (None: all)."""
    for i, p in enumerate(problems):
        if "question" not in p or "answer" not in p:
            raise KeyError(f"problem {i} needs 'question' and 'answer' keys, has {sorted(p)}")
    if decoding.samples < 0:
        raise ValueError(f"samples must be >= 0, got {decoding.samples}")
    k = decoding.samples
    prompts, special = build_prompts(tokenizer, [p["question"] for p in problems], decoding.prompt_style)
    greedy = [o[0] for o in generate(model, tokenizer, prompts, replace(decoding, samples=0),
                                     add_special_tokens=special, synced_gpus=synced_gpus, on_batch=on_batch)]
    correct = [grade(r, str(p["answer"])) for r, p in zip(greedy, problems)]
    n = len(correct)
    res: dict[str, Any] = accuracy_of(problems, correct)
    sampled_ok: list[list[bool]] = [[] for _ in problems]
    if k:
        sampled = generate(model, tokenizer, prompts, decoding, add_special_tokens=special,
                           synced_gpus=synced_gpus, on_batch=on_batch)
        sampled_ok = [[grade(r, str(p["answer"])) for r in rs] for rs, p in zip(sampled, problems)]
        res[f"avg@{k}"] = sum(sum(v) / k for v in sampled_ok) / n if n else 0.0
        res[f"pass@{k}"] = sum(any(v) for v in sampled_ok) / n if n else 0.0
    records = [{"id": p.get("id"), "question": p["question"], "answer": str(p["answer"]), "response": r,
                "extracted": extract_answer(r), "correct": ok, **({"sampled_correct": sum(s)} if k else {})}
               for p, r, ok, s in zip(problems, greedy, correct, sampled_ok)]
    res["samples"] = records if keep_records is None else records[:keep_records]
    return res


# ----------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------

def evaluate_suite(model, tokenizer, suite: str, decoding: Decoding, *, limit: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Every benchmark of ``suite`` (see ``padd_ds.data.math.SUITES``): per-benchmark pass@1
    (greedy), avg@k / pass@k when ``decoding.samples`` = k > 0, and their unweighted average
    over benchmarks (how the paper averages its five)."""
    benchmarks = load_suite(suite, limit=limit)
    d = replace(decoding, max_new_tokens=decoding.max_new_tokens or SUITE_MAX_NEW_TOKENS.get(suite, 1024))
    torch.manual_seed(d.seed)
    total = sum(len(ps) * (1 + d.samples) for ps in benchmarks.values())
    out: dict[str, Any] = {"suite": suite, "settings": {
        "limit": limit, "samples": d.samples, "temperature": d.temperature if d.samples else None,
        "top_p": d.top_p if d.samples else None, "max_new_tokens": d.max_new_tokens, "prompt_style": d.prompt_style,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)), "seed": d.seed}, "benchmarks": {}}
    t0 = time.perf_counter()
    with progress_bar(total, f"eval {suite}", enabled=progress) as advance:
        for name, problems in benchmarks.items():
            r = evaluate_problems(model, tokenizer, problems, d, on_batch=advance, keep_records=None)
            r["pass@1"] = r.pop("accuracy")
            r["records"] = r.pop("samples")
            out["benchmarks"][name] = r
    metrics = ["pass@1"] + ([f"avg@{d.samples}", f"pass@{d.samples}"] if d.samples else [])
    out["average"] = {m: sum(b[m] for b in out["benchmarks"].values()) / len(out["benchmarks"]) for m in metrics}
    out["average"]["n"] = sum(b["n"] for b in out["benchmarks"].values())
    out["seconds"] = time.perf_counter() - t0
    return out


def results_table(result: dict[str, Any]):
    """A rich Table: one row per benchmark, then the average."""
    from rich.table import Table

    metrics = [m for m in result["average"] if m != "n"]
    s = result["settings"]
    title = f"{result['suite']}: greedy pass@1" + (f", {s['samples']} samples at T={s['temperature']}"
                                                     if s["samples"] else "")
    t = Table(title=title)
    t.add_column("benchmark")
    t.add_column("n", justify="right")
    for m in metrics:
        t.add_column(m, justify="right")
    for name, b in result["benchmarks"].items():
        t.add_row(name, str(b["n"]), *(f"{100 * b[m]:.1f}" for m in metrics))
    t.add_row("average", str(result["average"]["n"]), *(f"{100 * result['average'][m]:.1f}" for m in metrics),
              style="bold")
    return t


def save_results(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path
