"""Stage IV bias controller and the Switch auxiliary-loss baseline (padd_ds/rl/balance.py)."""

import io

import pytest
import torch

from padd_ds.config import Stage4Config
from padd_ds.rl.balance import BiasController, switch_aux_loss


def _controller(sign="balancing", eta=0.01, gamma=0.0, decay=0.9, layers=2, experts=4):
    return BiasController(layers, experts, Stage4Config(balance_rate=eta, advantage_rate=gamma, ema_decay=decay,
                                                        bias_sign=sign))


def test_overloaded_expert_loses_bias_when_balancing_and_gains_as_written():
    counts = torch.tensor([[70.0, 10.0, 10.0, 10.0], [25.0, 25.0, 25.0, 25.0]])
    zeros = torch.zeros(2, 4)
    for sign, s in (("balancing", -1.0), ("as_written", 1.0)):
        ctl = _controller(sign)
        ctl.update(counts, zeros, zeros)
        # f = [0.7, 0.1, 0.1, 0.1], 1/N = 0.25: b += s * 0.01 * (f - 0.25); a balanced layer stays put
        torch.testing.assert_close(ctl.bias, torch.tensor([[0.0045, -0.0015, -0.0015, -0.0015], [0.0] * 4]) * s)
        assert (ctl.bias[0, 0] < 0) == (sign == "balancing")


def test_advantage_ema_and_bias_by_hand_idle_experts_keep_their_ema():
    ctl = _controller(eta=0.01, gamma=0.1, decay=0.9, layers=1, experts=4)
    counts = torch.tensor([[10.0, 10.0, 10.0, 10.0]])                      # balanced: only the EMA term moves b
    # step 1: mean advantages [1, -1, (no tokens), 2]
    ctl.update(counts, torch.tensor([[3.0, -2.0, 0.0, 2.0]]), torch.tensor([[3.0, 2.0, 0.0, 1.0]]))
    ema1 = torch.tensor([[0.1, -0.1, 0.0, 0.2]])
    torch.testing.assert_close(ctl.adv_ema, ema1)
    torch.testing.assert_close(ctl.bias, 0.1 * ema1)
    # step 2: mean advantages [(none), 1, 1, (none)], load [0.4, 0.2, 0.2, 0.2]
    ctl.update(torch.tensor([[20.0, 10.0, 10.0, 10.0]]), torch.tensor([[0.0, 4.0, 1.0, 0.0]]),
               torch.tensor([[0.0, 4.0, 1.0, 0.0]]))
    ema2 = torch.tensor([[0.1, 0.9 * -0.1 + 0.1, 0.1, 0.2]])
    torch.testing.assert_close(ctl.adv_ema, ema2)
    excess = torch.tensor([[0.15, -0.05, -0.05, -0.05]])
    torch.testing.assert_close(ctl.bias, 0.1 * ema1 - 0.01 * excess + 0.1 * ema2)
    assert ctl.steps == 2


def _route(scores: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k on scores + bias: per-expert assignment counts [E] (the router's use of the bias)."""
    top = torch.topk(scores + bias, k, dim=-1).indices
    return torch.bincount(top.reshape(-1), minlength=scores.shape[-1]).float()


@pytest.mark.parametrize("sign", ["balancing", "as_written"])
def test_closed_loop_balancing_flattens_load_and_as_written_concentrates_it(sign):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(512, 8, generator=g)
    scores[:, 0] += 1.0                                                    # expert 0 starts overloaded
    ctl = BiasController(1, 8, Stage4Config(balance_rate=0.05, advantage_rate=0.0, bias_sign=sign))
    first = _route(scores, ctl.bias[0], 2)
    for _ in range(300):
        counts = _route(scores, ctl.bias[0], 2)
        stats = ctl.update(counts[None], torch.zeros(1, 8), torch.zeros(1, 8))
    last = _route(scores, ctl.bias[0], 2)
    start, end = first.max() / first.mean(), last.max() / last.mean()
    if sign == "balancing":
        assert start > 2.0 and end < 1.15, (start, end)
    else:
        assert end > start and end > 3.5, (start, end)
    assert stats["load_max_over_mean"] > 0


def test_state_dict_resumes_bit_exactly_through_torch_save():
    g = torch.Generator().manual_seed(1)
    steps = [(torch.randint(0, 50, (2, 4), generator=g).float() + 1, torch.randn(2, 4, generator=g),
              torch.randint(0, 3, (2, 4), generator=g).float()) for _ in range(10)]
    straight = _controller(gamma=0.01)
    for s in steps:
        straight.update(*s)
    first = _controller(gamma=0.01)
    for s in steps[:5]:
        first.update(*s)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _controller(gamma=0.01)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for s in steps[5:]:
        resumed.update(*s)
    assert torch.equal(resumed.bias, straight.bias) and torch.equal(resumed.adv_ema, straight.adv_ema)
    assert resumed.steps == straight.steps == 10


def test_controller_input_errors():
    ctl = _controller()
    z = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"counts must be \[layers, experts\]=\[2, 4\]"):
        ctl.update(torch.ones(2, 5), z, z)
    with pytest.raises(ValueError, match="MoE layer 1 are all zero"):
        ctl.update(torch.tensor([[1.0, 2, 3, 4], [0, 0, 0, 0]]), z, z)
    with pytest.raises(ValueError, match="shape"):
        ctl.load_state_dict(_controller(experts=8).state_dict())
    with pytest.raises(ValueError, match="lacks"):
        ctl.load_state_dict({"bias": z})


def test_switch_aux_loss_by_hand():
    probs = torch.tensor([[[0.8, 0.2], [0.6, 0.4]]], requires_grad=True)   # [L=1, T=2, E=2]; P = [0.7, 0.3]
    counts = torch.tensor([[2.0, 0.0]])                                    # f = [1, 0]
    loss = switch_aux_loss(probs, counts)
    assert loss.item() == pytest.approx(2 * 0.7)
    loss.backward()
    # d/dp[t, j] = N * f_j / T
    torch.testing.assert_close(probs.grad, torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))
    uniform = torch.full((3, 5, 4), 0.25)
    assert switch_aux_loss(uniform, torch.full((3, 4), 7.0)).item() == pytest.approx(1.0)
    # a masked-out token does not count towards P
    masked = switch_aux_loss(torch.tensor([[[0.8, 0.2], [0.0, 1.0]]]), counts, mask=torch.tensor([1, 0]))
    assert masked.item() == pytest.approx(2 * 0.8)
