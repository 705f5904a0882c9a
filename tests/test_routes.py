"""rl/routes.py: generate's per-forward routes put where the trainer sees the same tokens, and
the agreement count, by hand."""

from __future__ import annotations

import pytest
import torch

from padd_ds.rl.routes import align_routes, replay_routes, route_agreement


def _call(rows: list[list[int]]) -> list[torch.Tensor]:
    """One forward call of a 1-layer, top-1 model: [T, 1] experts."""
    return [torch.tensor(rows, dtype=torch.int16).view(-1, 1)]


def test_prefill_and_decode_steps_land_on_the_trainers_positions():
    # 2 rows; prompts of 2 and 3 tokens left-padded to width 3; responses of 3 and 1 tokens.
    # Prefill experts per column: row 0 [pad, a, b] = [9, 1, 2], row 1 [c, d, e] = [3, 4, 5].
    calls = [_call([[9], [1], [2], [3], [4], [5]]),
             _call([[6], [7]]),     # step 1 feeds response token 0 of each row
             _call([[8], [0]]),     # step 2: row 1 already stopped (its output is ignored)
             _call([[1], [1]])]     # a synced rank stepping on: nobody's token
    out = align_routes(calls, prompt_lens=[2, 3], response_lens=[3, 1], width=3, L=5)
    assert out.shape == (2, 5, 1, 1)
    # row 0: prompt 1, 2 at 0-1; response tokens 0 and 1 at 2-3; its last token (4) never fed: -1
    assert out[0, :, 0, 0].tolist() == [1, 2, 6, 8, -1]
    # row 1: prompt 3, 4, 5; its only response token is its last: nothing fed back
    assert out[1, :, 0, 0].tolist() == [3, 4, 5, -1, -1]


def test_a_prefill_of_the_wrong_size_is_an_error():
    with pytest.raises(RuntimeError, match="the prefill routed 4 tokens, expected 2 rows x 3"):
        align_routes([_call([[1], [2], [3], [4]])], [3, 3], [1, 1], width=3, L=4)


def test_agreement_counts_known_routes_under_the_mask_per_layer():
    routes = torch.tensor([[[[0, 1]], [[2, 3]], [[-1, -1]]]], dtype=torch.int16)   # [b=1, S=3, 1 layer, k=2]
    own = [torch.tensor([[1, 0], [2, 4], [5, 6]])]                                  # set {0,1} agrees, {2,4} not
    mask = torch.tensor([[True, True, True]])
    assert route_agreement(own, routes, mask) == (1.0, 2)   # the third position has no known route
    assert route_agreement(own, routes, torch.tensor([[True, False, False]])) == (1.0, 1)
    assert [t.tolist() for t in replay_routes(routes, 2, torch.device("cpu"))] == [[[0, 1], [2, 3]]]
