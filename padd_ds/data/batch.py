"""Token batches for teacher-forced training: prompt + response, right-padded."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from padd_ds.data.prompt import format_example, format_prompt


@dataclass
class TokenBatch:
    ids: torch.Tensor        # [B, L] int64, right-padded
    lengths: torch.Tensor    # [B] int64, true lengths
    loss_mask: torch.Tensor  # [B, L] bool: position t predicts a response token at t+1

    @property
    def attention_mask(self) -> torch.Tensor:
        L = self.ids.shape[1]
        return (torch.arange(L, device=self.lengths.device).unsqueeze(0) < self.lengths.unsqueeze(1)).long()

    def to(self, device: str | torch.device) -> TokenBatch:
        """The batch on `device` (the tensors themselves when they are already there)."""
        return TokenBatch(self.ids.to(device), self.lengths.to(device), self.loss_mask.to(device))


def micro_batches(batch: TokenBatch, size: int) -> list[TokenBatch]:
    """Consecutive rows of `batch` in micro-batches of `size`, each cut to its own longest
    sequence (columns past it are padding in every row of that micro-batch)."""
    parts = []
    for start in range(0, batch.ids.shape[0], size):
        lengths = batch.lengths[start:start + size]
        L = int(lengths.max())
        parts.append(TokenBatch(batch.ids[start:start + size, :L], lengths, batch.loss_mask[start:start + size, :L]))
    return parts


def lm_loss(logits: torch.Tensor, batch: TokenBatch, denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the response tokens (position t predicts token t+1), summed / `denom`
    (default: this batch's response tokens)."""
    m = batch.loss_mask[:, :-1]
    total = F.cross_entropy(logits[:, :-1][m].float(), batch.ids[:, 1:][m], reduction="sum")
    return total / (m.sum().clamp(min=1) if denom is None else denom)


def encode_examples(tokenizer, problems: list[dict], max_prompt_tokens: int, max_response_tokens: int) -> TokenBatch:
    """Tokenize (question, solution) pairs; an over-long prompt is an error (silently cutting
    the question would train on a different problem), responses are cut at the limit."""
    seqs, masks = [], []
    for p in problems:
        if not p.get("solution"):
            raise ValueError(f"problem {p.get('id')} has no solution text to train on")
        prompt, response = format_example(p["question"], p["solution"])
        # The prompt is tokenized exactly as generation and evaluation tokenize it (the
        # tokenizer adds whatever special tokens it adds); the response follows, then EOS.
        pi = tokenizer(prompt)["input_ids"]
        ri = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(pi) > max_prompt_tokens:
            raise ValueError(f"problem {p.get('id')}: prompt has {len(pi)} tokens > data.max_prompt_tokens="
                             f"{max_prompt_tokens}; raise the limit or filter long problems")
        ri = ri[:max_response_tokens]
        seqs.append(pi + ri)
        # position t predicts token t+1: response tokens sit at len(pi) .. len(pi)+len(ri)-1
        m = [False] * (len(pi) - 1) + [True] * len(ri) + [False]
        masks.append(m)
    L = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(seqs), L), pad, dtype=torch.int64)
    loss_mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        loss_mask[i, :len(s)] = torch.tensor(m)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    return TokenBatch(ids, lengths, loss_mask)


def usable_problems(tokenizer, problems: list[dict], max_prompt_tokens: int, long_prompts: str = "error",
                    need_solution: bool = True, source: str = "data.source", log: bool = False) -> list[dict]:
    """The training pool, checked up front on every rank alike (not one rank mid-run, which
    would leave the others waiting in a collective): a prompt longer than max_prompt_tokens is
    an error naming the problem (`long_prompts="error"`) or dropped with a count ("skip"); a
    problem without a solution, when the run trains on solutions, is an error; an empty pool
    after dropping is an error. Raises ValueError with one line."""
    if not problems:
        raise ValueError(f"{source}: no problems to train on")
    lengths = [len(ids) for ids in tokenizer([format_prompt(p["question"]) for p in problems])["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n > max_prompt_tokens]
    if long and long_prompts == "error":
        i = long[0]
        raise ValueError(f"{source}: problem {problems[i].get('id')} has a {lengths[i]}-token prompt, longer than "
                         f"data.max_prompt_tokens={max_prompt_tokens} ({len(long)} of {len(problems)} problems are); "
                         "raise data.max_prompt_tokens or set data.long_prompts=skip")
    if long:
        drop = set(long)
        problems = [p for i, p in enumerate(problems) if i not in drop]
        if not problems:
            raise ValueError(f"{source}: all {len(drop)} problems have prompts longer than data.max_prompt_tokens="
                             f"{max_prompt_tokens}; nothing is left to train on after data.long_prompts=skip, raise "
                             "data.max_prompt_tokens")
        if log:
            print(f"[data] skipped {len(drop)} of {len(drop) + len(problems)} problems whose prompt is longer than "
                  f"data.max_prompt_tokens={max_prompt_tokens} (data.long_prompts=skip)", flush=True)
    if need_solution:
        missing = [p for p in problems if not (isinstance(p.get("solution"), str) and p["solution"].strip())]
        if missing:
            raise ValueError(f"{source}: problem {missing[0].get('id')} has no solution text ({len(missing)} of "
                             f"{len(problems)} problems have none); KD, Stage I and the export's held-out check use "
                             "worked solutions (a solution, reasoning or rationale field)")
    return problems
