"""Generation and accuracy: greedy pass@1 and sampled avg@k, on a problem list or a suite.

Prompts are left-padded so every row's continuation starts at the same position (one KV
cache per batch), and sorted by length so a batch wastes little on padding. A tokenizer with
a chat template gets it (what an instruction-tuned math model was trained on); one without
gets the plain ``Question: ...\\nAnswer:`` prompt the toy models and the trainer use.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from padd_ds.data.prompt import format_prompt
from padd_ds.eval.grading import extract_answer, grade

PromptStyle = Literal["auto", "chat", "plain"]

# Appended to the question in the chat prompt: the usual instruction of math-model evaluations,
# and what makes the model put its answer where `extract_answer` looks first.
CHAT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Generation budget per suite when the caller gives none: a toy solution is ~90 tokens, a
# GSM8K chain of thought ~300, competition solutions (AIME, Olympiad) run to thousands.
SUITE_MAX_NEW_TOKENS = {"toy": 128, "gsm8k": 512, "math5": 2048}


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


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's (chat models add
    an end-of-turn token there)."""
    ids = []
    for v in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids += v if isinstance(v, (list, tuple)) else [v]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise ValueError("tokenizer has no eos_token_id; generation could not stop")
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64, *,
             num_samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, add_special_tokens: bool = True,
             synced_gpus: bool = False, on_batch: Callable[[int], None] | None = None) -> list[list[str]]:
    """``num_samples`` continuations per prompt (greedy when ``temperature`` is 0), decoded and
    cut at the first EOS. ``batch_size`` counts sequences; ``on_batch(n)`` reports n more done.

    ``synced_gpus``: the model is ZeRO-3-partitioned over several ranks that all run this
    call; they keep stepping together until every rank is done."""
    if max_new_tokens < 1 or batch_size < 1 or num_samples < 1:
        raise ValueError(f"max_new_tokens, batch_size and num_samples must be >= 1, got "
                         f"{max_new_tokens}, {batch_size}, {num_samples}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature == 0 and num_samples > 1:
        raise ValueError("greedy decoding (temperature 0) gives one answer per prompt; set a temperature > 0")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of str")
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    _warn_if_too_long(model, max(lengths, default=0) + max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # similar lengths share a batch
    per_batch = max(1, batch_size // num_samples)
    outputs: list[list[str]] = [[] for _ in prompts]
    try:
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens)
            batch = {k: v.to(device) for k, v in batch.items()}
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                                 eos_token_id=eos, pad_token_id=pad_id, synced_gpus=synced_gpus, **sampling)
            for row_no, row in enumerate(gen[:, batch["input_ids"].shape[1] :].tolist()):
                cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                outputs[idx[row_no // num_samples]].append(tokenizer.decode(row[:cut], skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(idx) * num_samples)
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


def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                    synced_gpus: bool = False) -> list[str]:
    """Greedy continuation of each prompt (the trainer's held-out evaluation)."""
    return [o[0] for o in generate(model, tokenizer, prompts, max_new_tokens, batch_size, synced_gpus=synced_gpus)]


# ----------------------------------------------------------------------------------------
# Accuracy on a problem list
# ----------------------------------------------------------------------------------------

def _breakdown(problems: list[dict], correct: list[bool], key: str) -> dict[str, float]:
    groups: dict[Any, list[bool]] = defaultdict(list)
    for p, ok in zip(problems, correct):
        if p.get(key) is not None:
            groups[p[key]].append(ok)
    return {str(k): sum(v) / len(v) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def evaluate_problems(
    model, tokenizer, problems: list[dict[str, Any]], max_new_tokens: int, batch_size: int = 64,
    synced_gpus: bool = False, *, samples: int = 0, temperature: float = 0.6, top_p: float = 0.95,
    prompt_style: PromptStyle = "plain", on_batch: Callable[[int], None] | None = None,
    keep_records: int | None = 5,
) -> dict[str, Any]:
    """Greedy pass@1 on ``problems`` (dicts with ``question`` and ``answer``), and with
    ``samples`` = k > 0 also avg@k (mean accuracy of k sampled answers) and pass@k (any of k).

    The trainer calls this with the default plain prompt, the one it trains on.
    ``keep_records``: how many per-problem records to return (None: all)."""
    for i, p in enumerate(problems):
        if "question" not in p or "answer" not in p:
            raise KeyError(f"problem {i} needs 'question' and 'answer' keys, has {sorted(p)}")
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    prompts, special = build_prompts(tokenizer, [p["question"] for p in problems], prompt_style)
    greedy = [o[0] for o in generate(model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens=special,
                                     synced_gpus=synced_gpus, on_batch=on_batch)]
    correct = [grade(r, str(p["answer"])) for r, p in zip(greedy, problems)]
    n = len(correct)
    res: dict[str, Any] = {
        "accuracy": sum(correct) / n if n else 0.0,
        "n": n,
        "per_level": _breakdown(problems, correct, "level"),
        "per_subject": _breakdown(problems, correct, "subject"),
    }
    sampled_ok: list[list[bool]] = [[] for _ in problems]
    if samples:
        sampled = generate(model, tokenizer, prompts, max_new_tokens, batch_size, num_samples=samples,
                           temperature=temperature, top_p=top_p, add_special_tokens=special,
                           synced_gpus=synced_gpus, on_batch=on_batch)
        sampled_ok = [[grade(r, str(p["answer"])) for r in rs] for rs, p in zip(sampled, problems)]
        res[f"avg@{samples}"] = sum(sum(v) / samples for v in sampled_ok) / n if n else 0.0
        res[f"pass@{samples}"] = sum(any(v) for v in sampled_ok) / n if n else 0.0
    records = [{"id": p.get("id"), "question": p["question"], "answer": str(p["answer"]), "response": r,
                "extracted": extract_answer(r), "correct": ok, **({"sampled_correct": sum(s)} if samples else {})}
               for p, r, ok, s in zip(problems, greedy, correct, sampled_ok)]
    res["samples"] = records if keep_records is None else records[:keep_records]
    return res


# ----------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------

def evaluate_suite(model, tokenizer, suite: str, *, limit: int | None = None, samples: int = 0,
                   temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int | None = None,
                   batch_size: int = 32, prompt_style: PromptStyle = "auto", seed: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Every benchmark of ``suite`` (see ``padd_ds.data.math.SUITES``): per-benchmark pass@1
    (greedy), avg@k / pass@k when ``samples`` = k > 0, and their unweighted average over
    benchmarks (how the paper averages its five)."""
    from padd_ds.data.math import load_suite
    from padd_ds.report.metrics import progress_bar

    benchmarks = load_suite(suite, limit=limit)
    max_new = max_new_tokens or SUITE_MAX_NEW_TOKENS.get(suite, 1024)
    torch.manual_seed(seed)
    total = sum(len(ps) * (1 + samples) for ps in benchmarks.values())
    out: dict[str, Any] = {"suite": suite, "settings": {
        "limit": limit, "samples": samples, "temperature": temperature if samples else None,
        "top_p": top_p if samples else None, "max_new_tokens": max_new, "prompt_style": prompt_style,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)), "seed": seed}, "benchmarks": {}}
    t0 = time.perf_counter()
    with progress_bar(total, f"eval {suite}", enabled=progress) as advance:
        for name, problems in benchmarks.items():
            r = evaluate_problems(model, tokenizer, problems, max_new, batch_size, samples=samples,
                                  temperature=temperature, top_p=top_p, prompt_style=prompt_style,
                                  on_batch=advance, keep_records=None)
            r["pass@1"] = r.pop("accuracy")
            r["records"] = r.pop("samples")
            out["benchmarks"][name] = r
    metrics = ["pass@1"] + ([f"avg@{samples}", f"pass@{samples}"] if samples else [])
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
