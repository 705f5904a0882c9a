"""stage3.updates_per_batch: with one update per rollout batch the ratio is 1, so the clip
never acts and GRPO averaged per response (loss_agg=seq_mean) trains like GSPO; with two, the
second update's ratio is against the sampling policy, the clip acts and the policies differ."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO, read_results, run_cmd

COMMON = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.mode=padd", "--set", "train.steps=3",
          "--set", "train.log_every=1", "--set", "train.micro_batch_size=16", "--set", "stage3.prompts_per_step=4",
          "--set", "stage2.enabled=false",
          "--set", "stage4.enabled=false", "--set", "data.max_response_tokens=32", "--set", "eval.num_problems=4",
          "--set", "eval.max_new_tokens=16", "--set", "logging.wandb_mode=disabled", "--set", "logging.progress=false",
          "--set", "topology.colocated=true", "--set", "deepspeed.expert_parallel_size=1"]


def _history(tmp_path, policy: str, updates: int) -> list[dict]:
    out = tmp_path / f"{policy}_{updates}"
    # GSPO is a per-response mean; GRPO matches it at one update only when aggregated the same way.
    agg = "seq_mean" if updates == 1 else "token_mean"
    run_cmd([sys.executable, str(REPO / "train.py"), *COMMON, "--set", f"run.output_dir={out}",
             "--set", f"stage3.policy={policy}", "--set", f"stage3.updates_per_batch={updates}",
             "--set", f"stage3.loss_agg={agg}"],
            timeout=300)
    return read_results(out)["history"]


def test_one_update_is_on_policy_and_two_updates_clip(toy_build, tmp_path):
    h = {(p, u): _history(tmp_path, p, u) for p in ("grpo", "gspo") for u in (1, 2)}
    loss = {k: [r["train/policy_loss"] for r in v] for k, v in h.items()}
    clip = {k: [r["train/clip_frac"] for r in v] for k, v in h.items()}
    # One update: ratio 1, nothing clipped, and GRPO with seq_mean is the same algorithm as GSPO.
    assert clip[("grpo", 1)] == [0.0] * 3 and clip[("gspo", 1)] == [0.0] * 3
    assert loss[("grpo", 1)] == pytest.approx(loss[("gspo", 1)], rel=1e-5, abs=1e-7)
    # Two updates: the first update's step moves the second one's ratio; GSPO's tight
    # sequence clip (4e-4) then clips, and the trajectories part.
    assert max(clip[("gspo", 2)]) > 0
    assert [r["train/reward"] for r in h[("grpo", 2)]][0] == [r["train/reward"] for r in h[("grpo", 1)]][0]
    assert loss[("grpo", 2)] != pytest.approx(loss[("gspo", 2)], rel=1e-3)
