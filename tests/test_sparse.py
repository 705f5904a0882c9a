"""Sparse top-k teacher logits: exactness of the encoding and of the KD loss built on it."""

import torch

from padd_ds.teacher.sparse import (bucket_logprobs_teacher, encode_topk, full_kd_loss, sparse_kd_loss)


def _peaked_logits(B=2, L=5, V=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, L, V, generator=g)
    z[..., :8] += 9.0  # a trained LM puts ~99% of its mass on a few tokens
    return z


def test_kept_probabilities_and_tail_are_exact():
    z = _peaked_logits()
    sl = encode_topk(z, 16)
    p = torch.softmax(z, -1)
    buckets = bucket_logprobs_teacher(sl).exp()
    kept = torch.gather(p, -1, sl.indices.long())
    torch.testing.assert_close(buckets[..., :-1], kept, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(buckets[..., -1], 1 - kept.sum(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(buckets.sum(-1), torch.ones(2, 5), rtol=1e-5, atol=1e-6)


def test_full_vocabulary_k_equals_full_kd():
    t, s = _peaked_logits(seed=1), _peaked_logits(seed=2)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False
    sparse = sparse_kd_loss(s, encode_topk(t, t.shape[-1]), mask)
    full = full_kd_loss(s, t, mask)
    torch.testing.assert_close(sparse, full, rtol=1e-4, atol=1e-6)


def test_topk_kd_loss_and_gradient_close_to_full_for_peaked_teacher():
    t = _peaked_logits(seed=3)
    s = _peaked_logits(seed=4).requires_grad_(True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    full = full_kd_loss(s, t, mask)
    (g_full,) = torch.autograd.grad(full, s)
    sparse = sparse_kd_loss(s, encode_topk(t, 32), mask)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    assert abs(sparse.item() - full.item()) / full.item() < 0.05
    rel = (g_sparse - g_full).norm() / g_full.norm()
    assert rel < 0.1, rel


def test_kd_loss_is_zero_for_identical_models_and_masked_positions_ignored():
    z = _peaked_logits(seed=5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert sparse_kd_loss(z, encode_topk(z, 8), mask).abs().item() < 1e-5
    other = z.clone()
    other[1, 4] = torch.randn(z.shape[-1]) * 5
    mask[1, 4] = False
    assert sparse_kd_loss(other, encode_topk(z, 8), mask).abs().item() < 1e-5


def test_per_sequence_temperature_matches_scalar():
    t, s = _peaked_logits(seed=6), _peaked_logits(seed=7)
    mask = torch.ones(2, 5, dtype=torch.bool)
    sl = encode_topk(t, 16)
    both = sparse_kd_loss(s, sl, mask, torch.tensor([2.0, 2.0]))
    scalar = sparse_kd_loss(s, sl, mask, 2.0)
    torch.testing.assert_close(both, scalar)


def test_sampled_encoding_is_a_distribution_over_distinct_draws():
    from padd_ds.teacher.sparse import encode_sampled

    z = _peaked_logits(seed=8)
    sl = encode_sampled(z, 16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sl.weights.sum(-1), torch.ones(2, 5))
    for row_ids, row_w in zip(sl.indices.reshape(-1, 16), sl.weights.reshape(-1, 16)):
        used = row_ids[row_w > 0]
        assert len(set(used.tolist())) == len(used)           # each token once
        assert torch.all(row_w * 16 == torch.round(row_w * 16))  # counts / k
    torch.testing.assert_close(torch.gather(z, -1, sl.indices.long()), sl.values)


def test_sampled_kd_loss_and_gradient_are_unbiased():
    from padd_ds.teacher.sparse import encode_sampled

    g = torch.Generator().manual_seed(11)
    t = torch.randn(1, 4, 40, generator=g) * 2
    s = torch.randn(1, 4, 40, generator=g).requires_grad_(True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    full = full_kd_loss(s, t, mask)
    (g_full,) = torch.autograd.grad(full, s)
    losses, grads = [], []
    for i in range(600):
        loss = sparse_kd_loss(s, encode_sampled(t, 8, torch.Generator().manual_seed(i)), mask)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, s)[0])
    losses, grads = torch.stack(losses), torch.stack(grads)
    se = losses.std() / len(losses) ** 0.5
    assert abs(losses.mean() - full.detach()) < 4 * se + 1e-4, (losses.mean(), full, se)
    # the averaged gradient converges to the full-vocabulary gradient (a single draw is noisy)
    rel = ((grads.mean(0) - g_full).norm() / g_full.norm()).item()
    single = ((grads[0] - g_full).norm() / g_full.norm()).item()
    assert rel < 0.05 and rel < single / 5, (rel, single)
    # while a single top-8 estimate of this flat teacher is clearly biased
    topk = sparse_kd_loss(s, encode_topk(t, 8), mask).detach()
    assert abs(topk - full.detach()) > 10 * se
