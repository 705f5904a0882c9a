"""DeepSeek students export to native transformers checkpoints: V2 exactly; V3 exactly even
with a Stage IV bias, because V3's router has a selection-bias slot (e_score_correction_bias)
that the export fills with its own bias plus ours - no fold, the same routes."""

from __future__ import annotations

import json
import sys

from conftest import REPO, free_port, run_cmd


def _run(arch: str) -> dict:
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    p = run_cmd([sys.executable, str(REPO / "tests" / "_export_deepseek.py"), arch], timeout=240, env=env)
    return json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])


def test_deepseek_v2_exports_exactly():
    r = _run("deepseek_v2")
    assert r["slot"] is False  # V2 has no selection bias: a Stage IV bias is folded by the trainer
    assert r["zero_same_routes"] and r["zero_logit_diff"] < 1e-5, r


def test_deepseek_v3_exports_the_stage4_bias_exactly():
    r = _run("deepseek_v3")
    assert r["slot"] is True
    assert r["bias_moves_routes"], r  # the bias really changes which experts are chosen
    assert r["zero_same_routes"] and r["zero_logit_diff"] < 1e-5, r
    assert r["biased_same_routes"] and r["biased_logit_diff"] < 1e-5, r
