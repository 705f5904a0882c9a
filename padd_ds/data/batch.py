"""Token batches for teacher-forced training: prompt + response, right-padded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from padd_ds.data.prompt import format_example


@dataclass
class TokenBatch:
    ids: torch.Tensor        # [B, L] int64, right-padded
    lengths: torch.Tensor    # [B] int64, true lengths
    loss_mask: torch.Tensor  # [B, L] bool: position t predicts a response token at t+1

    @property
    def attention_mask(self) -> torch.Tensor:
        L = self.ids.shape[1]
        return (torch.arange(L).unsqueeze(0) < self.lengths.unsqueeze(1)).long()


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
