"""Rollouts sample the policy itself (padd_ds/models/generation.py, rl/rollout.py): the config's
temperature and top-p are the only transforms, whatever transformers' defaults (top_k=50) or
the model's generation_config.json say. Checked on the toy student through `generate`'s own
record of the scores it sampled from (output_scores) against the raw logits (output_logits)."""

from __future__ import annotations

import pytest
import torch

from padd_ds.data.math import load_jsonl
from padd_ds.models.generation import decoding_kwargs, eos_ids
from padd_ds.models.loading import load_causal_lm, load_tokenizer
from padd_ds.rl.rollout import RolloutSampling, sample_rollouts

# What a Hub generation_config.json may carry (Qwen2.5 instruct: top_k=20, repetition_penalty=1.05).
MODEL_DEFAULTS = {"do_sample": True, "temperature": 0.3, "top_k": 5, "top_p": 0.5, "min_p": 0.3, "typical_p": 0.5,
                  "repetition_penalty": 1.5, "no_repeat_ngram_size": 1, "min_new_tokens": 4, "suppress_tokens": [5, 6],
                  "num_beams": 2}


@pytest.fixture(scope="module")
def student(toy_build):
    return load_causal_lm(str(toy_build.student_dir), "float32"), load_tokenizer(str(toy_build.student_dir))


def _scores(model, tok, kwargs: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(scores generate sampled from, raw logits) per generated position."""
    ids = torch.tensor([tok("Question: What is 12 + 7?\nAnswer:")["input_ids"]])
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs, max_new_tokens=4,
                         num_return_sequences=2 if kwargs["do_sample"] else 1, eos_token_id=eos_ids(model, tok), pad_token_id=tok.pad_token_id,
                         output_scores=True, output_logits=True, return_dict_in_generate=True)
    return list(out.scores), list(out.logits)


@pytest.mark.parametrize("model_defaults", [{}, MODEL_DEFAULTS], ids=["transformers_defaults", "model_defaults"])
def test_sampling_applies_only_the_temperature(student, model_defaults):
    model, tok = student
    model.generation_config.update(**model_defaults)
    try:
        scores, logits = _scores(model, tok, decoding_kwargs(0.7, 1.0))
    finally:
        model.generation_config.update(**{k: None for k in model_defaults})
    assert len(scores) == 4 and scores[0].shape[-1] == model.config.vocab_size > 50  # a top-50 cut would show
    for s, z in zip(scores, logits):
        assert torch.isfinite(s).all()  # no token removed: no top-k, min-p, typical or nucleus cut
        torch.testing.assert_close(torch.log_softmax(s, -1), torch.log_softmax(z / 0.7, -1), atol=1e-5, rtol=0)


def test_top_p_is_the_only_cut(student):
    model, tok = student
    model.generation_config.update(**MODEL_DEFAULTS)
    try:
        scores, logits = _scores(model, tok, decoding_kwargs(1.0, 0.9))
    finally:
        model.generation_config.update(**{k: None for k in MODEL_DEFAULTS})
    for s, z in zip(scores, logits):
        kept = torch.isfinite(s)
        p = torch.softmax(z, -1)
        torch.testing.assert_close(s[kept], z[kept])  # the kept tokens' logits are untouched
        for row in range(p.shape[0]):  # the nucleus: the most likely tokens, together at least 0.9
            assert p[row][kept[row]].sum() >= 0.9 - 1e-6
            assert (~kept[row]).any() and p[row][kept[row]].min() >= p[row][~kept[row]].max()


def test_greedy_is_the_argmax_of_the_raw_logits(student):
    model, tok = student
    model.generation_config.update(**MODEL_DEFAULTS)
    try:
        scores, logits = _scores(model, tok, decoding_kwargs(None))
    finally:
        model.generation_config.update(**{k: None for k in MODEL_DEFAULTS})
    for s, z in zip(scores, logits):
        torch.testing.assert_close(s, z)  # no repetition penalty, suppressed tokens or forced minimum length


def test_rollouts_ignore_a_top_k_in_the_model_generation_config(student, toy_build):
    """top_k=1 in the model's file would make all G responses of a prompt its greedy answer."""
    model, tok = student
    problems = load_jsonl(toy_build.heldout_file, limit=3)
    sampling = RolloutSampling(group_size=6, temperature=1.0, top_p=1.0, max_new_tokens=24, max_prompt_tokens=96)
    model.generation_config.update(top_k=1)
    try:
        torch.manual_seed(0)
        ro = sample_rollouts(model, tok, problems, sampling, synced=False)
    finally:
        model.generation_config.update(top_k=None)
    rows = ro.batch.ids.tolist()
    distinct = [len({tuple(r) for r in rows[i * 6:(i + 1) * 6]}) for i in range(len(problems))]
    assert max(distinct) > 1, distinct


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_rollouts_carry_the_samplers_log_probs_where_the_trainer_computes_its_own(student, toy_build, temperature,
                                                                                  top_p):
    """The log-probs recorded while sampling (the model's own at the sampling temperature,
    whatever the nucleus) equal token_logprobs at that temperature of one full forward over the
    rows the trainer gets, at every response position and nowhere else; at temperature 1 they
    would not."""
    from padd_ds.rl.rollout import token_logprobs

    model, tok = student
    problems = load_jsonl(toy_build.heldout_file, limit=3)
    sampling = RolloutSampling(group_size=3, temperature=temperature, top_p=top_p, max_new_tokens=16,
                               max_prompt_tokens=96)
    torch.manual_seed(1)
    ro = sample_rollouts(model, tok, problems, sampling, synced=False)
    b = ro.batch
    with torch.no_grad():
        logits = model(input_ids=b.ids, attention_mask=b.attention_mask).logits
    trainer = token_logprobs(logits, b, temperature)
    assert ro.logprobs.shape == b.ids.shape
    assert (ro.logprobs[~b.loss_mask] == 0).all() and (ro.logprobs[b.loss_mask] < 0).all()
    torch.testing.assert_close(ro.logprobs, trainer, atol=1e-4, rtol=0)
    if temperature != 1.0:
        assert (ro.logprobs - token_logprobs(logits, b)).abs().max() > 1e-2


def test_rollouts_carry_the_routes_the_trainers_forward_takes(student, toy_build):
    """The experts captured while generating (prefill + one decode step per token) equal, at
    every loss position, those of one full forward over the trainer's rows."""
    from padd_ds.rl.routes import RouteCapture, route_agreement

    model, tok = student
    problems = load_jsonl(toy_build.heldout_file, limit=3)
    sampling = RolloutSampling(group_size=3, temperature=1.0, top_p=1.0, max_new_tokens=16, max_prompt_tokens=96)
    torch.manual_seed(2)
    ro = sample_rollouts(model, tok, problems, sampling, synced=False)
    b = ro.batch
    assert ro.routes is not None and ro.routes.shape[:2] == b.ids.shape
    assert (ro.routes[b.loss_mask] >= 0).all()  # every loss position has its route
    with torch.no_grad(), RouteCapture.of(model) as capture:
        model(input_ids=b.ids, attention_mask=b.attention_mask)
    own = capture.calls[0]
    agree, pairs = route_agreement(own, ro.routes, b.loss_mask)
    assert pairs == int(b.loss_mask.sum()) * len(own) and agree == pairs
    shifted = ro.routes.clone()
    shifted[ro.routes >= 0] = (shifted[ro.routes >= 0] + 1) % model.config.num_experts  # a wrong alignment fails
    assert route_agreement(own, shifted, b.loss_mask)[0] < pairs
