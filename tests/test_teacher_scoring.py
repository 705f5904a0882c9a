"""Teacher scoring cost: no KV cache, the LM head only on real positions, only sparse rows leave
the device; and the student receives the same numbers as the full-head path gave."""

import math

import pytest
import torch

from padd_ds.teacher.service import TeacherModel
from padd_ds.teacher.sparse import encode_sampled, encode_topk

LENGTHS = torch.tensor([11, 7, 3, 11])  # right padding differs per row
L, K = 11, 8


def tiny(arch: str, tied: bool):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(
        vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied,
        **({"head_dim": 16} if arch == "Qwen3" else {}))
    return getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()


def toy_teacher(toy_build):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(toy_build.root / "teacher").eval()


def batch(vocab: int):
    ids = torch.randint(3, vocab, (len(LENGTHS), L), generator=torch.Generator().manual_seed(1))
    return ids, LENGTHS, torch.arange(L).unsqueeze(0) < LENGTHS.unsqueeze(1)


@torch.no_grad()
def full_head_logits(model, ids, real):
    """The old path: the head on every [B, L] position."""
    return model(input_ids=ids, attention_mask=real.long()).logits.float()


MODELS = [("Qwen3", False), ("Qwen2", True), ("Llama", False), ("Mistral", True)]


@pytest.mark.parametrize("arch,tied", MODELS)
def test_topk_is_bit_identical_to_the_full_head_path(arch, tied):
    model = tiny(arch, tied)
    ids, lengths, real = batch(211)
    out = TeacherModel(model).score(ids, lengths, K).logits
    ref = encode_topk(full_head_logits(model, ids, real), K)
    for got, want in zip(out.tensors(), ref.tensors()):
        assert torch.equal(got[real], want[real])
    # padding rows: the uniform distribution over tokens 0..k-1 (finite: consumers multiply by the mask)
    assert torch.equal(out.values[~real], torch.zeros(int((~real).sum()), K))
    assert torch.equal(out.indices[~real], torch.arange(K, dtype=torch.int32).expand(int((~real).sum()), K))
    assert torch.equal(out.lse[~real], torch.full((int((~real).sum()),), math.log(K)))


def test_toy_teacher_topk_is_bit_identical(toy_build):
    model = toy_teacher(toy_build)
    ids, lengths, real = batch(model.config.vocab_size)
    out = TeacherModel(model).score(ids, lengths, 32).logits
    ref = encode_topk(full_head_logits(model, ids, real), 32)
    for got, want in zip(out.tensors(), ref.tensors()):
        assert torch.equal(got[real], want[real])


def test_sampled_rows_hold_exact_logits_and_match_the_old_draws_without_padding():
    model = tiny("Qwen3", False)
    ids, lengths, real = batch(211)
    full = full_head_logits(model, ids, real)
    out = TeacherModel(model).score(ids, lengths, K, mode="sampled", seed=5).logits
    drawn = torch.gather(full, -1, out.indices.long())
    assert torch.equal(out.values[real], drawn[real])
    assert torch.equal(out.lse[real], torch.logsumexp(full, -1)[real])
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(len(LENGTHS), L))
    # with no padding the generator sees the same rows in the same order: the same draws
    dense = torch.full((len(LENGTHS),), L)
    out = TeacherModel(model).score(ids, dense, K, mode="sampled", seed=5).logits
    ref = encode_sampled(full_head_logits(model, ids, torch.ones_like(real)), K, torch.Generator().manual_seed(5))
    for got, want in zip(out.tensors(), ref.tensors()):
        assert torch.equal(got, want)


def test_no_kv_cache_and_the_head_sees_only_real_positions():
    model = tiny("Qwen3", True)
    ids, lengths, _ = batch(211)
    seen = {}
    hooks = [model.register_forward_hook(
                 lambda m, a, kw, o: seen.update(use_cache=kw.get("use_cache"), cache=o.past_key_values),
                 with_kwargs=True),
             model.get_output_embeddings().register_forward_hook(
                 lambda m, a, o: seen.update(head_rows=a[0].numel() // a[0].shape[-1], head_out=tuple(o.shape)))]
    TeacherModel(model).score(ids, lengths, K)
    for h in hooks:
        h.remove()
    assert seen["use_cache"] is False and seen["cache"] is None
    assert seen["head_rows"] == int(lengths.sum()) == 32
    assert seen["head_out"] == (32, 211)


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_only_sparse_rows_of_real_positions_leave_the_device(mode):
    teacher = TeacherModel(tiny("Llama", False))
    ids, lengths, _ = batch(211)
    teacher.score(ids, lengths, K, mode=mode)
    per_token = K * (4 + 4 + (4 if mode == "sampled" else 0)) + 4  # values, indices, [weights], lse
    assert teacher.host_bytes == int(lengths.sum()) * per_token


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_positions_before_scored_from_skip_the_head_and_the_rest_are_unchanged(mode):
    """A rollout's request asks for its response positions only (`scored_from`): the prompt's
    positions still feed attention but not the LM head, and do not leave the device; the scored
    positions get exactly the full path's top-k (topk), or exact logits of their draws (sampled)."""
    model = tiny("Qwen3", False)
    ids, lengths, real = batch(211)
    start = torch.tensor([4, 0, 2, 11])  # the last row scores nothing
    scored = real & (torch.arange(L).unsqueeze(0) >= start.unsqueeze(1))
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    teacher = TeacherModel(model)
    out = teacher.score(ids, lengths, K, mode=mode, seed=3, scored_from=start).logits
    hook.remove()
    assert rows == [int(scored.sum())] == [7 + 7 + 1 + 0]
    per_token = K * (4 + 4 + (4 if mode == "sampled" else 0)) + 4
    assert teacher.host_bytes == 15 * per_token
    full = full_head_logits(model, ids, real)
    if mode == "topk":
        for got, want in zip(out.tensors(), encode_topk(full, K).tensors()):
            assert torch.equal(got[scored], want[scored])
    else:
        assert torch.equal(out.values[scored], torch.gather(full, -1, out.indices.long())[scored])
    # skipped positions carry the padding filler: the uniform distribution over tokens 0..k-1
    assert torch.equal(out.lse[real & ~scored], torch.full((int((real & ~scored).sum()),), math.log(K)))


def test_packed_requests_get_their_own_answers_in_one_forward():
    """teacher.pack_requests: two requests of other shapes, one with scored_from, in one forward
    give each the answer it gets alone (top-k ids equal, values within float noise)."""
    model = tiny("Qwen3", False)
    ids, lengths, _ = batch(211)
    other = torch.randint(3, 211, (2, 7), generator=torch.Generator().manual_seed(2))
    reqs = [(ids, lengths, 5, None), (other, torch.tensor([7, 4]), 6, torch.tensor([2, 1]))]
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, o: calls.append(tuple(a[0].shape)))
    packed = TeacherModel(model, pack=2).score_many(reqs, K)
    hook.remove()
    assert calls == [(6, 11)]
    for (r_ids, r_len, seed, start), got in zip(reqs, packed):
        alone = TeacherModel(model).score(r_ids, r_len, K, seed=seed, scored_from=start).logits
        assert torch.equal(got.logits.indices, alone.indices)
        torch.testing.assert_close(got.logits.values, alone.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.logits.lse, alone.lse, atol=1e-5, rtol=0)
