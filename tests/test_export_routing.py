"""MoE students export to native transformers checkpoints that route like the engine.

With a zero Stage IV bias every architecture exports exactly. With a bias, DeepSeek-V3's
router has a selection-bias slot (e_score_correction_bias) that the export fills with its
own bias plus ours: no fold, the same routes. The other routers have no slot: the export
folds the bias into the router weights (approximate, fidelity reported) and writes the
engine's routers beside it, with which `load_exact_routing` restores the exact routes."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO, free_port, run_cmd


def _run(name: str) -> dict:
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    p = run_cmd([sys.executable, str(REPO / "tests" / "_export_routing.py"), name], timeout=240, env=env)
    return json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v2_grouped"])
def test_slotless_router_folds_and_restores_exact_routing(name):
    r = _run(name)
    assert r["slot"] is False
    assert r["bias_moves_routes"], r  # the bias really changes which experts are chosen
    assert r["zero_same_routes"] and r["zero_logit_diff"] < 1e-5, r
    assert not r["zero_routing_file"], r  # nothing to restore without a bias
    # The fold alone is approximate; the routing file makes the plain model route exactly.
    assert r["routing_file"], r
    assert r["exact_same_routes"] and r["exact_logit_diff"] < 1e-5, r
    # The trainer's fidelity measure agrees with the routes read here.
    assert r["biased_fidelity_fn"] == pytest.approx(r["biased_route_fidelity"]) and r["biased_fidelity_fn"] < 1.0, r
    assert r["exact_fidelity_fn"] == 1.0 and r["zero_fidelity_fn"] == 1.0, r


def test_deepseek_v3_exports_the_stage4_bias_exactly():
    r = _run("deepseek_v3")
    assert r["slot"] is True
    assert r["bias_moves_routes"], r
    assert r["zero_same_routes"] and r["zero_logit_diff"] < 1e-5, r
    assert r["biased_same_routes"] and r["biased_logit_diff"] < 1e-5, r
    assert not r["routing_file"], r  # exact in the checkpoint itself
    assert r["exact_same_routes"] and r["exact_logit_diff"] < 1e-5, r  # load_exact_routing is then a no-op
    # The chosen experts, not top-k of the logits: V3's selection bias changes the choice alone.
    assert r["biased_fidelity_fn"] == 1.0, r
