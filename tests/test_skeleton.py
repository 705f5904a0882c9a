"""The walking skeleton: 1 teacher rank + 2 student ranks (ZeRO-3 + AutoEP, EP size 2),
online KD from streamed top-k logits, DeepSpeed checkpoint, HF export, evaluation."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO, deepspeed_cmd, read_results, run_cmd

STEPS = 16
COMMON = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", f"train.steps={STEPS}",
          "--set", "train.log_every=4", "--set", "eval.num_problems=16", "--set", "logging.wandb_mode=disabled",
          "--set", "logging.progress=false", "--set", "topology.timeout_s=120",
          "--set", "teacher.request_timeout_s=60"]


@pytest.fixture(scope="module")
def three_process_run(toy_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("skeleton3")
    # eval.references=false: the teacher rank skips its own evaluation and posts none, the
    # students evaluate only the trained model (the single-process run below keeps all three).
    p = run_cmd(deepspeed_cmd(3, *COMMON, "--set", f"run.output_dir={out}", "--set", "train.micro_batch_size=8",
                              "--set", "eval.references=false"), timeout=420)
    return out, p


def test_three_process_distillation_learns_and_exports(three_process_run):
    out, proc = three_process_run
    res = read_results(out)
    kd = [h["train/kd_loss"] for h in res["history"]]
    assert len(kd) == STEPS // 4
    assert kd[-1] < 0.9 * kd[0], f"KD loss did not fall: {kd}"
    # The teacher really served the students over the bridge: 2 students x STEPS requests.
    assert f"served {2 * STEPS} requests" in proc.stdout + proc.stderr
    assert res["export_max_abs_logit_diff"] < 1e-4
    assert "Held-out accuracy" in proc.stdout
    assert 0.0 <= res["student_after"]["accuracy"] <= 1.0 and res["student_after"]["n"] == 16
    assert res["teacher"] is None and res["student_before"] is None  # eval.references=false
    assert (out / "checkpoints" / f"step_{STEPS}").is_dir()


def test_export_is_a_native_transformers_checkpoint(three_process_run, toy_build):
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

    out, _ = three_process_run
    model = AutoModelForCausalLM.from_pretrained(out / "hf", trust_remote_code=False)
    assert isinstance(model, Qwen3MoeForCausalLM)
    assert not list((out / "hf").glob("*.py")) and not list((out / "hf").glob("*.bin"))
    # Training changed the weights relative to the starting student.
    start = AutoModelForCausalLM.from_pretrained(toy_build.student_dir)
    ids = torch.arange(1, 20).unsqueeze(0)
    assert (model(ids).logits - start(ids).logits).abs().max() > 1e-3


def test_single_process_run_matches_three_process_run(three_process_run, tmp_path):
    """Colocated teacher, one student, EP 1, the same global batch: the same training."""
    out3, _ = three_process_run
    run_cmd([sys.executable, str(REPO / "train.py"), *COMMON, "--set", f"run.output_dir={tmp_path}",
             "--set", "topology.colocated=true", "--set", "deepspeed.expert_parallel_size=1",
             "--set", "train.micro_batch_size=16"], timeout=300)
    res1 = read_results(tmp_path)
    for key in ("teacher", "student_before", "student_after"):  # eval.references=true (default)
        assert 0.0 <= res1[key]["accuracy"] <= 1.0 and res1[key]["n"] == 16
    kd1 = [h["train/kd_loss"] for h in res1["history"]]
    kd3 = [h["train/kd_loss"] for h in read_results(out3)["history"]]
    assert kd1 == pytest.approx(kd3, rel=2e-3), (kd1, kd3)


def test_impossible_combination_is_refused_before_any_process_group(toy_build):
    """A PADD rollout batch must split into whole micro-batches: refused in a second, not after loading."""
    p = run_cmd([sys.executable, str(REPO / "train.py"), *COMMON, "--set", "topology.colocated=true",
                 "--set", "deepspeed.expert_parallel_size=1", "--set", "train.mode=padd",
                 "--set", "train.micro_batch_size=6"], timeout=120, check=False)
    assert p.returncode == 2
    assert ("config error: the rollout batch of 32 sequences per student rank (stage3.prompts_per_step=8 / 1 ranks "
            "x stage3.group_size=4) does not split into micro-batches of train.micro_batch_size=6") in p.stderr, \
        p.stderr[-2000:]
    assert "init_distributed" not in p.stdout + p.stderr
