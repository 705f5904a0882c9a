"""Training batches must tokenize exactly like the toy build's training data and like the
prompts generation sees, or distillation trains on a different format than it is judged on."""

import pytest
import torch

from padd_ds.data.batch import encode_examples
from padd_ds.data.math import load_jsonl
from padd_ds.data.prompt import format_prompt


def test_batch_matches_build_and_generation_tokenization(toy_world):
    from transformers import AutoTokenizer

    from padd_ds.data.toy import generate
    from padd_ds.toy.build import encode_examples as build_encode

    tok = AutoTokenizer.from_pretrained(toy_world.teacher_dir)
    problems = generate(6, seed=3)
    rows = [{"id": p.id, "question": p.question, "solution": p.solution, "answer": p.answer} for p in problems]
    batch = encode_examples(tok, rows, max_prompt_tokens=96, max_response_tokens=96)
    for i, ((ids, prompt_len), p) in enumerate(zip(build_encode(tok, problems, 200), problems)):
        n = int(batch.lengths[i])
        assert batch.ids[i, :n].tolist() == ids
        assert batch.ids[i, :prompt_len].tolist() == tok(format_prompt(p.question))["input_ids"]
        # loss positions predict exactly the response tokens and EOS
        predicted = batch.ids[i, 1:n][batch.loss_mask[i, : n - 1]].tolist()
        assert predicted == ids[prompt_len:]
    # padding never carries loss
    pad = torch.arange(batch.ids.shape[1]).unsqueeze(0) >= batch.lengths.unsqueeze(1) - 1
    assert not batch.loss_mask[pad].any()


def test_overlong_prompt_is_an_error(toy_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_world.teacher_dir)
    row = load_jsonl(toy_world.train_file, limit=1)[0]
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        encode_examples(tok, [row], max_prompt_tokens=3, max_response_tokens=96)
