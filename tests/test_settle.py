"""stage4.settle_steps: the Stage IV bias is folded into the routers before the last N steps
and stays 0 through them, so the model trains its last steps on the routing it is exported
with: the export has no bias to fold and routes exactly like the engine."""

from __future__ import annotations

import sys

from conftest import REPO, free_port, read_results, run_cmd

ARGS = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.mode=padd", "--set", "train.steps=4",
        "--set", "train.log_every=1", "--set", "train.micro_batch_size=16", "--set", "stage3.prompts_per_step=4", "--set", "train.lr=1e-4",
        "--set", "stage4.balance_rate=0.05", "--set", "stage4.settle_steps=2", "--set", "data.max_response_tokens=32",
        "--set", "eval.num_problems=4", "--set", "eval.max_new_tokens=16", "--set", "eval.references=false",
        "--set", "logging.wandb_mode=disabled", "--set", "logging.progress=false",
        "--set", "topology.colocated=true", "--set", "deepspeed.expert_parallel_size=1"]


def test_settle_steps_train_and_export_the_final_routing(toy_build, tmp_path):
    run_cmd([sys.executable, str(REPO / "train.py"), *ARGS, "--set", f"run.output_dir={tmp_path}"], timeout=300,
            env={"MASTER_PORT": str(free_port())})
    res = read_results(tmp_path)
    h = res["history"]
    assert h[0]["routing/bias_norm"] > 0 and "routing/fold_kept" not in h[0]  # steps 1-2 build a bias
    assert 0.5 < h[1]["routing/fold_kept"] <= 1.0, h[1]                          # ... folded after step 2
    assert [x["routing/bias_norm"] for x in h[1:]] == [0.0, 0.0, 0.0]             # ... and 0 from then on
    assert "routing/fold_kept" not in h[2] and "routing/fold_kept" not in h[3]
    # Nothing left to fold: the export is exact (the engine's logits and routes).
    assert res["export_bias_folded"] is False and res["export_exact_routing"] is None
    assert res["export_routing_fidelity"] == 1.0 and res["export_max_abs_logit_diff"] < 1e-4, res
