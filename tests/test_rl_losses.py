"""Stage II-III numerics (padd_ds/rl/losses.py) against hand-computed and dense references."""

import math

import pytest
import torch
import torch.nn.functional as F

from padd_ds.config import ConfigError, Stage2Config, Stage3Config
from padd_ds.recipe import load_config
from padd_ds.rl.losses import (PolicyInputs, adaptive_kd_loss, aggregation_units, effective_temperature,
                               policy_aggregation, policy_loss, reference_kl, router_drift, tempered_kd_loss)
from padd_ds.teacher.sparse import SparseLogits, encode_sampled, encode_topk, full_kd_loss, sparse_kd_loss
from padd_ds.validate import validate


def _topk64(z: torch.Tensor, k: int) -> SparseLogits:
    """Top-k teacher targets kept in float64 (encode_topk stores float32) for tight checks."""
    values, indices = torch.topk(z, k, dim=-1)
    return SparseLogits(values, indices.to(torch.int32), torch.logsumexp(z, -1))


def _dense_kl(teacher: torch.Tensor, student: torch.Tensor, temp: torch.Tensor, mask: torch.Tensor,
              temper_student: bool) -> torch.Tensor:
    """KL(softmax(z_T / T) || softmax(z_S [/ T])) per position, masked token mean; T per sequence."""
    t = temp.reshape(-1, 1, 1)
    logp = F.log_softmax(teacher / t, -1)
    logq = F.log_softmax(student / t if temper_student else student, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    if temper_student:
        kl = kl * temp.reshape(-1, 1) ** 2
    return (kl * mask).sum() / mask.sum()


# --------------------------------------------------------------------------------------
# Stage II: temperature coupling
# --------------------------------------------------------------------------------------


def test_effective_temperature_by_hand_for_each_coupling():
    adv = torch.tensor([1.0, 0.0, -0.5, -5.0])
    phi = [1 + math.tanh(0.5), 1.0, 1 + math.tanh(-0.25), 0.1]   # 1 + tanh(-2.5) = 0.013 -> floor 0.1
    cfg = Stage2Config(base_temperature=2.0, advantage_scale=0.5, coupling_floor=0.1)
    cfg.temperature_coupling = "as_intended"
    torch.testing.assert_close(effective_temperature(adv, cfg), torch.tensor([2.0 / p for p in phi]))
    cfg.temperature_coupling = "as_written"
    torch.testing.assert_close(effective_temperature(adv, cfg), torch.tensor([2.0 * p for p in phi]))
    cfg.temperature_coupling = "fixed"
    torch.testing.assert_close(effective_temperature(adv, cfg), torch.full((4,), 2.0))


def test_coupling_floor_keeps_temperatures_finite_at_extreme_advantages():
    adv = torch.tensor([-1e6, -40.0, 1e6])
    for coupling in ("as_intended", "as_written"):
        t = effective_temperature(adv, Stage2Config(base_temperature=1.0, advantage_scale=1.0,
                                                    temperature_coupling=coupling))
        assert torch.isfinite(t).all() and (t > 0).all()
    t = effective_temperature(adv, Stage2Config(base_temperature=1.0, temperature_coupling="as_intended",
                                                coupling_floor=0.25))
    torch.testing.assert_close(t, torch.tensor([4.0, 4.0, 0.5]))   # good path sharper, bad path softer


# --------------------------------------------------------------------------------------
# Stage II: KD on sparse targets with a temperature
# --------------------------------------------------------------------------------------


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_head_tempered_kd_by_hand():
    """V = 4, k = 2, T = 2: the kept pair is tempered, the tail keeps its exact mass."""
    zt, zs, T = [2.0, 1.0, 0.0, -1.0], [0.5, 0.2, 0.1, 0.3], 2.0
    p, q = _softmax(zt), _softmax(zs)
    tail_p, tail_q = p[2] + p[3], q[2] + q[3]
    head = _softmax([zt[0] / T, zt[1] / T])
    p_star = [(1 - tail_p) * head[0], (1 - tail_p) * head[1], tail_p]
    teacher = _topk64(torch.tensor([[zt]], dtype=torch.float64), 2)
    student = torch.tensor([[zs]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)

    got = tempered_kd_loss(student, teacher, mask, T)
    assert got.item() == pytest.approx(_kl(p_star, [q[0], q[1], tail_q]), rel=1e-12)

    q_head = _softmax([zs[0] / T, zs[1] / T])
    q_star = [(1 - tail_q) * q_head[0], (1 - tail_q) * q_head[1], tail_q]
    got = tempered_kd_loss(student, teacher, mask, T, temper_student=True)
    assert got.item() == pytest.approx(T ** 2 * _kl(p_star, q_star), rel=1e-12)


def test_full_vocabulary_is_exact_for_per_sequence_temperatures():
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(3, 4, 40, generator=g, dtype=torch.float64) * 3, torch.randn(3, 4, 40, generator=g,
                                                                                     dtype=torch.float64)
    mask = torch.ones(3, 4)
    mask[1, 2:] = 0
    temp = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    teacher = _topk64(zt, 40)
    for temper_student in (False, True):
        got = tempered_kd_loss(zs, teacher, mask.bool(), temp, temper_student=temper_student)
        want = _dense_kl(zt, zs, temp, mask, temper_student)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # the classic-KD reading at one temperature is exactly full_kd_loss
    got = tempered_kd_loss(zs.float(), encode_topk(zt.float(), 40), mask.bool(), 2.0, temper_student=True)
    torch.testing.assert_close(got, full_kd_loss(zs.float(), zt.float(), mask.bool(), 2.0), rtol=1e-4, atol=1e-6)


def test_at_temperature_one_equals_the_sparse_bucket_kl():
    g = torch.Generator().manual_seed(1)
    zt, zs = torch.randn(2, 5, 300, generator=g) * 2, torch.randn(2, 5, 300, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    sl = encode_topk(zt, 16)
    for temper_student in (False, True):
        got = tempered_kd_loss(zs, sl, mask, torch.ones(2), temper_student=temper_student)
        torch.testing.assert_close(got, sparse_kd_loss(zs, sl, mask), rtol=1e-5, atol=1e-7)


def test_identical_models_have_zero_loss_at_any_temperature_when_both_are_tempered():
    z = torch.randn(2, 5, 300, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    mask = torch.ones(2, 5, dtype=torch.bool)
    got = tempered_kd_loss(z, _topk64(z, 8), mask, torch.tensor([0.3, 4.0], dtype=torch.float64), temper_student=True)
    assert abs(got.item()) < 1e-10


def test_low_temperature_target_sharpens_the_student_and_high_softens_it():
    """Student = teacher: at T < 1 descent raises the top token's logit, at T > 1 lowers it."""
    z = torch.randn(1, 1, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    top = int(z.argmax())
    teacher, mask = _topk64(z, 10), torch.ones(1, 1, dtype=torch.bool)
    grads = {}
    for T in (0.5, 1.0, 2.0):
        s = z.clone().requires_grad_(True)
        tempered_kd_loss(s, teacher, mask, T).backward()
        grads[T] = s.grad[0, 0, top].item()
    assert grads[0.5] < -1e-3 and grads[2.0] > 1e-3 and abs(grads[1.0]) < 1e-6


def test_sampled_targets_at_temperature_one_equal_the_unbiased_estimator():
    g = torch.Generator().manual_seed(4)
    zt, zs = torch.randn(2, 3, 200, generator=g) * 2, torch.randn(2, 3, 200, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    sl = encode_sampled(zt, 32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(tempered_kd_loss(zs, sl, mask, 1.0), sparse_kd_loss(zs, sl, mask), rtol=1e-5, atol=1e-7)


def test_sampled_targets_converge_to_the_dense_tempered_kl():
    g = torch.Generator().manual_seed(5)
    zt, zs = torch.randn(2, 3, 30, generator=g, dtype=torch.float64), torch.randn(2, 3, 30, generator=g,
                                                                                  dtype=torch.float64)
    mask = torch.ones(2, 3)
    temp = torch.tensor([0.5, 2.0], dtype=torch.float64)
    sl = encode_sampled(zt, 50_000, torch.Generator().manual_seed(1))
    for temper_student in (False, True):
        got = tempered_kd_loss(zs.float(), sl, mask.bool(), temp.float(), temper_student=temper_student)
        want = _dense_kl(zt, zs, temp, mask, temper_student)
        assert abs(got.item() - want.item()) / want.item() < 0.02, (temper_student, got.item(), want.item())


def test_kd_gradient_float64_gradcheck():
    g = torch.Generator().manual_seed(6)
    zt = torch.randn(2, 3, 9, generator=g, dtype=torch.float64) * 2
    teacher = _topk64(zt, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    temp = torch.tensor([0.7, 2.5], dtype=torch.float64)
    for temper_student in (False, True):
        s = torch.randn(2, 3, 9, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x: tempered_kd_loss(x, teacher, mask, temp, temper_student=temper_student), (s,))


def test_adaptive_kd_uses_each_responses_temperature():
    g = torch.Generator().manual_seed(7)
    zt, zs = torch.randn(2, 4, 100, generator=g) * 2, torch.randn(2, 4, 100, generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    sl, adv = encode_topk(zt, 16), torch.tensor([1.0, -1.0])
    for coupling, temps in (("as_intended", [1 / (1 + math.tanh(1)), 1 / (1 - math.tanh(1))]),
                            ("as_written", [1 + math.tanh(1), 1 - math.tanh(1)]),
                            ("fixed", [1.0, 1.0])):
        loss, stats = adaptive_kd_loss(zs, sl, mask, adv, Stage2Config(temperature_coupling=coupling))
        torch.testing.assert_close(loss, tempered_kd_loss(zs, sl, mask, torch.tensor(temps)))
        assert stats["kd_temperature_max"].item() == pytest.approx(max(temps), rel=1e-6)
    # the advantage moves the loss away from the zero-advantage (temperature tau) one
    shared, _ = adaptive_kd_loss(zs, sl, mask, torch.zeros(2), Stage2Config())
    intended, _ = adaptive_kd_loss(zs, sl, mask, adv, Stage2Config())
    assert abs(intended.item() - shared.item()) > 1e-3


def test_kd_denom_normalises_by_a_global_count():
    zt, zs = torch.randn(2, 3, 20), torch.randn(2, 3, 20)
    mask = torch.ones(2, 3, dtype=torch.bool)
    sl = encode_topk(zt, 5)
    local = tempered_kd_loss(zs, sl, mask, 1.5)
    torch.testing.assert_close(tempered_kd_loss(zs, sl, mask, 1.5, denom=12.0), local / 2)


def test_kd_shape_errors_name_the_fix():
    sl = encode_topk(torch.randn(2, 3, 20), 5)
    with pytest.raises(ValueError, match=r"\[B\]=2"):
        adaptive_kd_loss(torch.randn(2, 3, 20), sl, torch.ones(2, 3, dtype=torch.bool), torch.zeros(3), Stage2Config())
    with pytest.raises(ValueError, match="temperature must be a float"):
        tempered_kd_loss(torch.randn(2, 3, 20), sl, torch.ones(2, 3, dtype=torch.bool), torch.ones(5))
    with pytest.raises(ValueError, match="> 0"):
        tempered_kd_loss(torch.randn(2, 3, 20), sl, torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, 0.0]))


# --------------------------------------------------------------------------------------
# Stage III: policy losses
# --------------------------------------------------------------------------------------


def _grad(loss_fn, new):
    new = new.clone().requires_grad_(True)
    loss, stats = loss_fn(new)
    loss.backward()
    return loss.item(), new.grad, stats


def test_grpo_clipped_surrogate_by_hand():
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -2.0]], dtype=torch.float64)
    new = old + ratios.log()
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    cfg = Stage3Config(policy="grpo", clip_eps=0.2)
    # A = +1: min(rho, clip(rho)) = [1, 1.2, 0.5]; A = -2: min(-2 rho, -2 clip(rho)) = [-2, -3, (-1.6 masked)]
    loss, grad, stats = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask), cfg), new)
    assert loss == pytest.approx((-1 - 1.2 - 0.5 + 2 + 3) / 5)
    # unclipped tokens: d/dlogp = -A * rho / 5; the clipped token (rho 1.5, A > 0) and the masked one: 0
    want = torch.tensor([[-1.0, 0.0, -0.5], [2.0, 3.0, 0.0]], dtype=torch.float64) / 5
    torch.testing.assert_close(grad, want)
    assert stats["clip_frac"].item() == pytest.approx(1 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((1 + 1.5 + 0.5 + 1 + 1.5) / 5)

    cfg.loss_agg = "seq_mean"
    loss, grad, _ = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask), cfg), new)
    assert loss == pytest.approx(((-1 - 1.2 - 0.5) / 3 + (2 + 3) / 2) / 2)
    want = torch.tensor([[-1.0 / 3, 0.0, -0.5 / 3], [2.0 / 2, 3.0 / 2, 0.0]], dtype=torch.float64) / 2
    torch.testing.assert_close(grad, want)


def test_pr_grpo_damps_only_drifting_tokens_of_bad_responses():
    old = torch.zeros(2, 3, dtype=torch.float64)
    new = torch.zeros(2, 3, dtype=torch.float64)                           # rho = 1 before damping
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    drift = torch.tensor([[0.1, 0.5, 0.0], [0.1, 0.5, 0.0]], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    cfg = Stage3Config(policy="pr_grpo", drift_penalty=1.0, clip_eps=0.2)
    loss, grad, stats = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask, drift=drift), cfg), new)
    g_loss, g_grad, _ = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask), Stage3Config(policy="grpo")), new)
    # positive advantage: untouched by drift, identical to GRPO
    torch.testing.assert_close(grad[0], g_grad[0])
    # negative advantage: rho = exp(-0.1) = 0.905 (inside the clip range, gradient scaled by it);
    # exp(-0.5) = 0.61 < 0.8 (clipped: constant 0.8, no gradient); no drift: as GRPO
    d = math.exp(-0.1)
    torch.testing.assert_close(grad[1], torch.tensor([d, 0.0, 1.0], dtype=torch.float64) / 6)
    assert loss == pytest.approx((-3 + d + 0.8 + 1) / 6)
    assert g_loss == pytest.approx(0.0)
    assert stats["clip_frac"].item() == pytest.approx(1 / 6)
    assert stats["damp_mean"].item() == pytest.approx((3 + d + math.exp(-0.5) + 1) / 6)


def test_rspo_damps_every_token_with_a_floor():
    old = torch.zeros(2, 2, dtype=torch.float64)
    new = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    drift = torch.tensor([[0.1, 2.0], [0.1, 2.0]], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    cfg = Stage3Config(policy="rspo", drift_penalty=1.0, rspo_min_weight=0.5, clip_eps=0.2)
    loss, grad, _ = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask, drift=drift), cfg), new)
    d = math.exp(-0.1)                                                      # exp(-2) = 0.135 -> floor 0.5
    # A > 0: -min(w, clip(w)) = -w for w < 1 (never clipped from below); A < 0: max(w, clip(w))
    assert loss == pytest.approx((-d - 0.5 + d + 0.8) / 4)
    torch.testing.assert_close(grad, torch.tensor([[-d, -0.5], [d, 0.0]], dtype=torch.float64) / 4)


def test_gspo_uses_one_clipped_length_normalised_ratio_per_response():
    old = torch.zeros(2, 3, dtype=torch.float64)
    new = torch.tensor([[0.1, -0.3, 0.5], [0.01, 0.03, 9.0]], dtype=torch.float64)   # [1, 2] is masked
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    cfg = Stage3Config(policy="gspo", seq_clip_low=0.05, seq_clip_high=0.05)
    loss, grad, stats = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask), cfg), new)
    s0, s1 = math.exp(0.1), math.exp(0.02)       # geometric means; s0 > 1.05 is clipped (A > 0)
    assert loss == pytest.approx((-1.05 + s1) / 2)                         # mean over the 2 responses
    # d s1 / d new[1, t] = s1 / 2 (its 2 tokens), then / 2 responses
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0], [s1, s1, 0.0]], dtype=torch.float64) / 4)
    assert stats["clip_frac"].item() == pytest.approx(3 / 5)
    # ratio_level=sequence turns GRPO into the same loss when it also averages per response
    loss2, grad2, _ = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask), Stage3Config(
        policy="grpo", ratio_level="sequence", seq_clip_low=0.05, seq_clip_high=0.05, loss_agg="seq_mean")), new)
    assert loss2 == pytest.approx(loss)
    torch.testing.assert_close(grad2, grad)


def _gspo_reference(new: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, lengths: list[int],
                    low: float, high: float) -> torch.Tensor:
    """GSPO written from its definition, one response at a time: J = 1/G sum_i min(s_i A_i,
    clip(s_i, 1 - low, 1 + high) A_i), s_i = exp(mean of the response's token log-ratios)."""
    terms = []
    for i, n in enumerate(lengths):
        s = torch.exp((new[i, :n] - old[i, :n]).mean())
        terms.append(torch.minimum(s * adv[i], s.clamp(1 - low, 1 + high) * adv[i]))
    return -torch.stack(terms).mean()


def test_gspo_equals_a_reference_implementation_and_not_token_mean():
    g = torch.Generator().manual_seed(3)
    lengths, T, low, high = [7, 1, 4, 2, 5], 7, 0.02, 0.04  # asymmetric, as the GSPO paper's 3e-4 / 4e-4
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    old = -torch.rand(len(lengths), T, generator=g, dtype=torch.float64) * 3
    new = old + 0.05 * torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3], dtype=torch.float64)
    ref_loss, ref_grad, _ = _grad(lambda x: (_gspo_reference(x, old, adv, lengths, low, high), None), new)
    ratios = [math.exp(float((new[i, :n] - old[i, :n]).mean())) for i, n in enumerate(lengths)]
    assert any(r > 1 + high or r < 1 - low for r in ratios) and any(1 - low < r < 1 + high for r in ratios)
    assert any(1 - high < r < 1 - low for r in ratios)  # clipped only because the range is asymmetric
    for agg in ("token_mean", "seq_mean"):  # stage3.loss_agg does not change GSPO
        cfg = Stage3Config(policy="gspo", seq_clip_low=low, seq_clip_high=high, loss_agg=agg)
        assert policy_aggregation(cfg) == "seq_mean"
        loss, grad, _ = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask), cfg), new)
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    # The same sequence ratio aggregated per token (what gspo ran before) weighs long responses more.
    tok_loss, tok_grad, _ = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask), Stage3Config(
        policy="grpo", ratio_level="sequence", seq_clip_low=low, seq_clip_high=high, loss_agg="token_mean")), new)
    assert tok_loss != pytest.approx(ref_loss, rel=1e-3)
    assert F.cosine_similarity(tok_grad.flatten(), ref_grad.flatten(), dim=0) < 0.99


@pytest.mark.parametrize("policy, agg", [("gspo", "token_mean"), ("grpo", "token_mean"), ("grpo", "seq_mean")])
def test_ranks_with_a_global_denom_reproduce_the_whole_batch(policy, agg):
    """rl/step.py: each rank divides by (global units / ranks) and DeepSpeed averages the ranks'
    gradients; the result must be the single-process loss over all responses, however the
    responses are split."""
    g = torch.Generator().manual_seed(5)
    lengths, T = [6, 2, 3, 6, 1], 6
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    old = -torch.rand(5, T, generator=g, dtype=torch.float64)
    new = old + 0.2 * torch.randn(5, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3], dtype=torch.float64)
    cfg = Stage3Config(policy=policy, loss_agg=agg, seq_clip_low=0.1, seq_clip_high=0.1)
    how = policy_aggregation(cfg)
    whole, whole_grad, _ = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask), cfg), new)
    ranks = [slice(0, 1), slice(1, 5)]                             # 1 and 4 responses
    denom = sum(aggregation_units(mask[r], how) for r in ranks) / len(ranks)

    def averaged(x):
        parts = [policy_loss(PolicyInputs(x[r], old[r], adv[r], mask[r]), cfg, denom=denom)[0] for r in ranks]
        return sum(parts) / len(ranks), None
    split, split_grad, _ = _grad(averaged, new)
    assert split == pytest.approx(whole, rel=1e-12)
    torch.testing.assert_close(split_grad, whole_grad)


def test_reference_kl_k3_by_hand():
    new = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-0.5, -2.2]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    kl, grad, _ = _grad(lambda x: (reference_kl(x, ref, mask), None), new)
    k3 = [math.exp(0.5) - 0.5 - 1, math.exp(-0.2) + 0.2 - 1]
    assert kl == pytest.approx(sum(k3) / 2)
    # d k3 / d new = 1 - exp(ref - new)
    torch.testing.assert_close(grad, torch.tensor([[1 - math.exp(0.5), 1 - math.exp(-0.2)]], dtype=torch.float64) / 2)
    assert torch.autograd.gradcheck(lambda x: reference_kl(x, ref, mask, "seq_mean"), (new.clone().requires_grad_(),))


@pytest.mark.parametrize("policy, level", [("grpo", "token"), ("pr_grpo", "token"), ("rspo", "token"),
                                           ("gspo", "token"), ("pr_grpo", "sequence")])
def test_policy_loss_float64_gradcheck(policy, level):
    g = torch.Generator().manual_seed(8)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    new = (old + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.2, -0.7, -1.5], dtype=torch.float64)
    drift = torch.rand(3, 5, generator=g, dtype=torch.float64) * 0.5
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cfg = Stage3Config(policy=policy, ratio_level=level, seq_clip_low=0.05, seq_clip_high=0.05)
    assert torch.autograd.gradcheck(
        lambda x: policy_loss(PolicyInputs(x, old, adv, mask, drift=drift), cfg)[0], (new,))


def test_masked_positions_never_reach_the_loss_or_gradient():
    old = torch.zeros(1, 3, dtype=torch.float64)
    adv, mask = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([[1, 1, 0]], dtype=torch.bool)
    base, base_grad, _ = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask), Stage3Config(policy="grpo")),
                               torch.tensor([[0.1, -0.1, 0.0]], dtype=torch.float64))
    loss, grad, _ = _grad(lambda x: policy_loss(PolicyInputs(x, old, adv, mask), Stage3Config(policy="grpo")),
                          torch.tensor([[0.1, -0.1, -1e30]], dtype=torch.float64))
    assert loss == base and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, base_grad)


def test_policy_denom_and_input_errors():
    old = torch.zeros(2, 2)
    new, adv, mask = torch.full((2, 2), 0.1), torch.tensor([1.0, -1.0]), torch.ones(2, 2, dtype=torch.bool)
    local, _ = policy_loss(PolicyInputs(new, old, adv, mask), Stage3Config(policy="grpo"))
    glob, _ = policy_loss(PolicyInputs(new, old, adv, mask), Stage3Config(policy="grpo"), denom=8.0)
    torch.testing.assert_close(glob, local / 2)
    with pytest.raises(ValueError, match="needs drift=Gamma"):
        policy_loss(PolicyInputs(new, old, adv, mask), Stage3Config(policy="pr_grpo"))
    with pytest.raises(ValueError, match="advantages must have shape"):
        policy_loss(PolicyInputs(new, old, torch.zeros(3), mask), Stage3Config(policy="grpo"))


def test_truncated_is_weights_each_tokens_surrogate_by_the_capped_ratio():
    """stage3.tis_cap: -min(rho A, clip(rho) A) * min(pi_old / pi_rollout, C), by hand."""
    old = torch.zeros(2, 3, dtype=torch.float64)
    new = old.clone()                                                        # rho = 1: no clipping
    rollout = torch.tensor([[0.0, math.log(0.5), math.log(4.0)], [math.log(2.0), 0.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    cfg = Stage3Config(policy="grpo", tis_cap=3.0)
    # pi_old / pi_rollout = exp(old - rollout): [1, 2, 0.25], [0.5, 1, (masked)]; none reaches the cap
    x = lambda n: PolicyInputs(n, old, adv, mask, rollout_logp=rollout)
    loss, grad, stats = _grad(lambda n: policy_loss(x(n), cfg), new)
    assert loss == pytest.approx((-(1 + 2 + 0.25) + (0.5 + 1)) / 5)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -2.0, -0.25], [0.5, 1.0, 0.0]], dtype=torch.float64) / 5)
    assert stats["tis_mean"].item() == pytest.approx((1 + 2 + 0.25 + 0.5 + 1) / 5)
    # a cap of 1.5 truncates the token with ratio 2; tis_cap=0 is the plain loss
    capped, _, _ = _grad(lambda n: policy_loss(x(n), Stage3Config(policy="grpo", tis_cap=1.5)), new)
    assert capped == pytest.approx((-(1 + 1.5 + 0.25) + (0.5 + 1)) / 5)
    plain, _, plain_stats = _grad(lambda n: policy_loss(x(n), Stage3Config(policy="grpo")), new)
    assert plain == pytest.approx((-3 + 2) / 5) and "tis_mean" not in plain_stats
    with pytest.raises(ValueError, match="stage3.tis_cap=3.0 needs rollout_logp"):
        policy_loss(PolicyInputs(new, old, adv, mask), cfg)


def test_router_drift_by_hand():
    p_old = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]],
                          [[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]]])                 # [L=2, T=2, E=3]
    p_new = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]],
                          [[0.2, 0.5, 0.3], [0.0, 0.0, 1.0]]], requires_grad=True)
    gamma = router_drift(p_new, p_old)
    # token 0: layers 0 and sqrt(0.08); token 1: sqrt(2) and 0
    torch.testing.assert_close(gamma, torch.tensor([math.sqrt(0.08) / 2, math.sqrt(2) / 2]))
    assert not gamma.requires_grad
    assert router_drift(p_new.detach().unsqueeze(1), p_old.unsqueeze(1)).shape == (1, 2)   # [L, B, T, E] -> [B, T]
    with pytest.raises(ValueError, match="router probabilities"):
        router_drift(p_new, p_old[:1])


@pytest.mark.parametrize("override, expected", [
    ("stage2.coupling_floor=0", "stage2.coupling_floor must be in (0, 1]"),
    ("stage3.seq_clip_low=1", "stage3.seq_clip_low must be in (0, 1)"),
    ("stage3.seq_clip_high=0", "stage3.seq_clip_high must be in (0, 1)"),
    ("stage3.rspo_min_weight=1.5", "stage3.rspo_min_weight must be in [0, 1]"),
    ("stage3.loss_agg=sum", "stage3.loss_agg: 'sum' is not allowed"),
    ("stage3.tis_cap=0.5", "stage3.tis_cap must be 0 (off) or >= 1"),
])
def test_new_config_fields_are_range_checked(override, expected):
    with pytest.raises(ConfigError) as info:
        validate(load_config(None, [override]))       # ranges are checked before any path
    assert expected in str(info.value)
