"""Activation checkpointing (train.activation_checkpointing): the student's decoder layers are
recomputed in backward under ZeRO-3 + AutoEP, with the same gradients, and the planner counts
what it keeps."""

from __future__ import annotations


import pytest
import torch

from conftest import REPO, two_sgd_ranks
from padd_ds.plan import KNOWN_CONFIGS, Cluster, arch_from_config, make_plan
from padd_ds.recipe import load_config

RECIPE_70B = str(REPO / "recipes" / "qwen25_72b_to_qwen3_30b_a3b.yaml")
H100 = dict(gpus_per_node=8, gpu_memory_gb=80.0)


@pytest.fixture(scope="module")
def ranks(toy_build, tmp_path_factory) -> list[dict]:
    return two_sgd_ranks("_ckpt_grads.py", tmp_path_factory.mktemp("ckpt"), timeout=900)


def test_checkpointing_recomputes_the_layers(ranks):
    """On: each decoder layer runs again in the backward of every micro-batch (2 per step), so
    a flag that did nothing fails here. Rollouts run in eval mode: no recomputation."""
    for r in ranks:
        off, on = r["off"], r["on"]
        assert off["checkpointing"] is False and on["checkpointing"] is True
        assert on["calls"][0] == off["calls"][0] > 0                         # generation: one call per token
        assert off["calls"][1:] == [2, 2]                                    # Stage III, warmup: 2 micro-batches
        assert on["calls"][1:] == [4, 4]                                     # each forward once more in backward


@pytest.mark.parametrize("step", ["stage3_grad", "warmup_grad"])
def test_gradients_equal_without_checkpointing(ranks, step):
    """One Stage III update (policy loss, router drift, KD) and one warmup-style step (random
    top-k dispatch, path KL on the router scores) on 2 ZeRO-3 + AutoEP ranks: the gradients
    with checkpointing equal those without (within 1e-5)."""
    for r in ranks:
        off, on = torch.tensor(r["off"][step]), torch.tensor(r["on"][step])
        assert off.abs().max() > 1e-2, off.abs().max()                       # far above the tolerance
        diff = (off - on).abs().max().item()
        assert diff < 1e-5, (r["rank"], step, diff)


def test_generation_is_unaffected(ranks):
    """Rollouts from the same seed sample the same tokens with checkpointing on."""
    for r in ranks:
        assert r["on"]["sampled"] == r["off"]["sampled"]


def test_the_planner_keeps_one_hidden_state_per_layer():
    """With checkpointing a token keeps each decoder layer's input (48 x 2048 bf16 values in
    Qwen3-30B-A3B) plus one layer's full activations while it is recomputed, and the final norm's."""
    S = arch_from_config(KNOWN_CONFIGS["Qwen/Qwen3-30B-A3B"], "s")
    seq = 4096
    cfgs = [load_config(RECIPE_70B, [f"train.activation_checkpointing={v}", f"data.max_response_tokens={seq - 512}"])
            for v in ("false", "true")]
    off, on = (make_plan(c, Cluster(nodes=8, **H100)) for c in cfgs)
    act_off = next(it for it in off.student if it.label.startswith("activations"))
    act_on = next(it for it in on.student if it.label.startswith("activations"))
    assert act_off.label == f"activations (1 x {seq} tokens, no checkpointing)"
    assert act_on.label == f"activations (1 x {seq} tokens, checkpointing)"
    full = S.train_activation_bytes_per_token(2)                             # every layer's activations
    final_norm = 2048 * (4 + 2)
    one_layer = (full - final_norm) / 48                                     # every layer is an MoE layer
    assert act_on.gb == pytest.approx(seq * (48 * 2048 * 2 + one_layer + final_norm) / 1e9)
    assert act_off.gb == pytest.approx(seq * full / 1e9)
    assert "over 4 passes" in on.speed[0] and "over 3 passes" in off.speed[0]  # the recompute is one more forward
