"""Training batches must tokenize exactly like the toy build's training data and like the
prompts generation sees, or distillation trains on a different format than it is judged on."""

import pytest
import torch

from padd_ds.data.batch import encode_examples
from padd_ds.data.math import load_jsonl
from padd_ds.data.prompt import format_prompt


def test_batch_matches_build_and_generation_tokenization(toy_build):
    from transformers import AutoTokenizer

    from padd_ds.data.toy import generate
    from padd_ds.toy.build import encode_examples as build_encode

    tok = AutoTokenizer.from_pretrained(toy_build.teacher_dir)
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


def test_overlong_prompt_is_an_error(toy_build):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_build.teacher_dir)
    row = load_jsonl(toy_build.train_file, limit=1)[0]
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        encode_examples(tok, [row], max_prompt_tokens=3, max_response_tokens=96)


def _pool(toy_build, n: int = 40) -> tuple[object, list[dict]]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_build.teacher_dir), load_jsonl(toy_build.train_file, limit=n)


def test_long_prompts_are_refused_up_front_naming_the_problem(toy_build):
    from padd_ds.data.batch import usable_problems

    tok, pool = _pool(toy_build)
    lengths = [len(tok(format_prompt(p["question"]))["input_ids"]) for p in pool]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the prompts are longer
    first = next(i for i, n in enumerate(lengths) if n > limit)
    n_long = sum(n > limit for n in lengths)
    with pytest.raises(ValueError) as e:
        usable_problems(tok, pool, limit, "error", source="data.source=toy")
    assert str(e.value) == (f"data.source=toy: problem {pool[first]['id']} has a {lengths[first]}-token prompt, "
                            f"longer than data.max_prompt_tokens={limit} ({n_long} of 40 problems are); raise "
                            "data.max_prompt_tokens or set data.long_prompts=skip")
    kept = usable_problems(tok, pool, limit, "skip")
    assert kept == [p for p, n in zip(pool, lengths) if n <= limit] and len(kept) == 40 - n_long
    assert usable_problems(tok, pool, max(lengths), "error") == pool


def test_empty_pool_after_skipping_is_an_error(toy_build):
    from padd_ds.data.batch import usable_problems

    tok, pool = _pool(toy_build)
    with pytest.raises(ValueError) as e:
        usable_problems(tok, pool, 3, "skip", source="data.source=toy")
    assert str(e.value) == ("data.source=toy: all 40 problems have prompts longer than data.max_prompt_tokens=3; "
                            "nothing is left to train on after data.long_prompts=skip, raise data.max_prompt_tokens")
    with pytest.raises(ValueError, match="^data.source=toy: no problems to train on$"):
        usable_problems(tok, [], 96, source="data.source=toy")


def test_problem_without_solution_is_refused_up_front(toy_build):
    from padd_ds.data.batch import usable_problems

    tok, pool = _pool(toy_build)
    pool[7] = {**pool[7], "solution": None}
    with pytest.raises(ValueError) as e:
        usable_problems(tok, pool, 96, source="data.source=toy")
    assert str(e.value).startswith(f"data.source=toy: problem {pool[7]['id']} has no solution text (1 of 40 "
                                   "problems have none)")
