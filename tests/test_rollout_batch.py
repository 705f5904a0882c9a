"""The rollout batch apart from the micro-batch (train.mode=padd): a step's rollouts are
trained in micro-batches of train.micro_batch_size with gradient accumulation, and the
result equals one pass over the whole batch."""

from __future__ import annotations


import pytest
import torch

from conftest import two_sgd_ranks
from padd_ds.data.batch import TokenBatch, micro_batches


def test_micro_batches_are_consecutive_rows_cut_to_their_longest():
    lengths = torch.tensor([5, 3, 9, 4, 2])
    ids = torch.arange(5 * 9).view(5, 9)
    mask = torch.arange(9).unsqueeze(0) < lengths.unsqueeze(1) - 1
    parts = micro_batches(TokenBatch(ids, lengths, mask), 2)
    assert [p.ids.shape for p in parts] == [(2, 5), (2, 9), (1, 2)]
    assert torch.equal(torch.cat([p.lengths for p in parts]), lengths)
    assert torch.equal(parts[0].ids, ids[:2, :5]) and torch.equal(parts[2].loss_mask, mask[4:, :2])
    assert sum(int(p.loss_mask.sum()) for p in parts) == int(mask.sum())


@pytest.fixture(scope="module")
def accumulated(toy_build, tmp_path_factory) -> list[dict]:
    return two_sgd_ranks("_rollout_accum.py", tmp_path_factory.mktemp("accum"), timeout=600)


@pytest.mark.parametrize("updates", [1, 2])
def test_micro_batch_8_equals_2_x_accumulation_4(accumulated, updates):
    """One rollout batch of 8 sequences per rank on 2 ZeRO-3 + AutoEP ranks, with the policy
    loss, router drift and the KD term: one micro-batch of 8, or 4 of 2 accumulated, give the
    same weights (within 1e-6), the same Stage IV statistics and the same loss sums, with one
    PPO epoch or two. Fails if the micro-batch losses are divided again by the accumulation
    steps (engine.backward without scale_wrt_gas=False)."""
    for r in accumulated:
        whole, split = r[f"u{updates}_mbs8"], r[f"u{updates}_mbs2"]
        assert whole["global_steps"] == split["global_steps"] == updates  # one optimiser step per epoch
        assert whole["pending"] == split["pending"] == 0                  # every teacher request answered
        assert whole["moved"] > 1e-2, whole["moved"]                      # the update is far above the tolerance
        diff = (torch.tensor(whole["weights"]) - torch.tensor(split["weights"])).abs().max().item()
        assert diff < 1e-6, (r["rank"], updates, diff)
        assert whole["counts"] == split["counts"] and whole["drift_n"] == split["drift_n"]
        assert torch.allclose(torch.tensor(whole["adv_sum"]), torch.tensor(split["adv_sum"]), rtol=0, atol=1e-9)
        assert whole["drift_sum"] == pytest.approx(split["drift_sum"], rel=1e-6) and whole["drift_sum"] > 0
        assert set(whole["stats"]) == set(split["stats"]) >= {"policy_loss", "kd_loss", "kd_temperature"}
        for key, value in whole["stats"].items():
            assert split["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_router_lr_scale_moves_only_the_routers_faster(accumulated):
    """train.router_lr_scale=10 on the same rollout batch (SGD, so a step is lr x gradient): the
    routers move exactly 10x as far and every other weight exactly as far as with one rate."""
    for r in accumulated:
        one, ten = r["u1_mbs8"], r["u1_mbs8_router10"]
        assert set(one["group_lrs"]) == {0.05} and sorted(set(ten["group_lrs"])) == [0.05, pytest.approx(0.5)]
        before = torch.tensor(one["before"])
        assert torch.equal(before, torch.tensor(ten["before"]))
        router = torch.tensor(one["router"])
        assert torch.equal(router, torch.tensor(ten["router"])) and 0 < int(router.sum()) < router.numel()
        d1, d10 = torch.tensor(one["weights"]) - before, torch.tensor(ten["weights"]) - before
        assert d1[router].abs().max() > 1e-3, d1[router].abs().max()
        assert (d10[router] - 10 * d1[router]).abs().max() < 1e-6 * 10
        assert (d10[~router] - d1[~router]).abs().max() < 1e-6
