"""Stage I end to end on the toy models: teacher ranks cluster their FFNs and stream per-cluster
targets, the students (ZeRO-3 + AutoEP over 2 ranks) fit the router and warm up under a
uniform router. The 3-process run must agree with a 1-process colocated run, Stage I must
move the student's routes towards the teacher's paths, and a decompressed student must start
the warmup as an exact copy of its teacher."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO, deepspeed_cmd, free_port, read_results, run_cmd

COMMON = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.steps=2",
          "--set", "stage1.enabled=true", "--set", "stage1.warmup_steps=6", "--set", "stage1.eval_problems=32",
          "--set", "stage1.targets_max_problems=64", "--set", "train.log_every=2",
          "--set", "eval.num_problems=8", "--set", "eval.max_new_tokens=16", "--set", "logging.wandb_mode=disabled",
          "--set", "logging.progress=false", "--set", "topology.timeout_s=120",
          "--set", "teacher.request_timeout_s=60"]


def _three(out, *extra):
    return run_cmd(deepspeed_cmd(3, *COMMON, "--set", f"run.output_dir={out}", "--set", "train.micro_batch_size=8",
                                 *extra), timeout=420)


def _one(out, *extra):
    return run_cmd([sys.executable, str(REPO / "train.py"), *COMMON, "--set", f"run.output_dir={out}",
                    "--set", "topology.colocated=true", "--set", "deepspeed.expert_parallel_size=1",
                    "--set", "train.micro_batch_size=16", *extra], timeout=300,
                   env={"MASTER_PORT": str(free_port())})


@pytest.fixture(scope="module")
def pretrained_runs(toy_build, tmp_path_factory):
    out3, out1 = tmp_path_factory.mktemp("s1_three"), tmp_path_factory.mktemp("s1_one")
    _three(out3)
    _one(out1)
    return read_results(out3)["stage1"], read_results(out1)["stage1"], out3


def test_three_process_stage1_matches_single_process(pretrained_runs):
    s3, s1, _ = pretrained_runs
    for phase in ("before", "after_init", "after_warmup"):
        for key in ("agreement_top1", "agreement_topk", "path_kl", "kd_loss"):
            assert s3[phase][key] == pytest.approx(s1[phase][key], rel=2e-3, abs=1e-4), (phase, key, s3, s1)
    w3 = [h["stage1/warmup_kd_loss"] for h in s3["warmup"]]
    w1 = [h["stage1/warmup_kd_loss"] for h in s1["warmup"]]
    assert len(w3) == 3 and w3 == pytest.approx(w1, rel=2e-3)


def test_stage1_moves_routes_towards_the_teacher_paths(pretrained_runs):
    s3, _, out = pretrained_runs
    assert s3["router_init"].startswith("least-squares projection")
    # The fitted router sees the teacher's clusters; the student's own router does not.
    assert s3["after_init"]["path_kl"] < 0.5 * s3["before"]["path_kl"], s3
    assert s3["after_warmup"]["path_kl"] < s3["before"]["path_kl"], s3
    # The teacher clustered its own FFNs (one record per student layer) and said so.
    assert [r["student_layer"] for r in s3["clusters"]] == list(range(len(s3["clusters"])))
    assert json.loads((out / "stage1" / "report.json").read_text())["router_init"] == s3["router_init"]


def test_fitted_router_beats_a_random_one(pretrained_runs, tmp_path):
    """Issue acceptance: Stage I's router init measurably helps against a random router.
    Same data and steps (1 process each); measured on the test world: top-1 agreement with
    the teacher's clusters 0.21 vs 0.12 after the init and 0.37 vs 0.30 after 6 warmup
    steps; top-k agreement 0.31 vs 0.22 after the init, 0.41 vs 0.40 after the warmup (the
    warmup's path KL pulls a random router towards the teacher's paths too); warmup KD 0.855
    vs 0.838 (too few steps to separate them here). (Until the fix of write_router_weights
    the init was undone by the first optimizer step, and a random one too.)"""
    _, fitted, _ = pretrained_runs
    _one(tmp_path, "--set", "stage1.router_init=random")
    rand = read_results(tmp_path)["stage1"]
    assert rand["router_init"].startswith("random")
    assert fitted["before"] == pytest.approx(rand["before"])  # same student, same held-out tokens
    for phase in ("after_init", "after_warmup"):
        assert fitted[phase]["agreement_top1"] > rand[phase]["agreement_top1"] + 0.05, (phase, fitted, rand)
    assert fitted["after_init"]["agreement_topk"] > rand["after_init"]["agreement_topk"] + 0.05, (fitted, rand)
    assert fitted["after_warmup"]["agreement_topk"] > rand["after_warmup"]["agreement_topk"], (fitted, rand)
    # Loose: the fitted router must not make the warmup worse at distillation.
    assert fitted["after_warmup"]["kd_loss"] < 1.05 * rand["after_warmup"]["kd_loss"], (fitted, rand)


def test_warmup_learning_rate_and_learned_router(toy_build, tmp_path):
    """stage1.lr governs the warmup only: at ~0 a kept router warmed up with its own routes
    leaves the student unchanged, and the main phase then runs at train.lr."""
    _one(tmp_path, "--set", "stage1.router_init=keep", "--set", "stage1.warmup_router=learned",
         "--set", "stage1.lr=1e-12", "--set", "train.lr=2e-4")
    res = read_results(tmp_path)
    s = res["stage1"]
    assert s["router_init"] == "kept"
    assert s["after_warmup"] == pytest.approx(s["before"], rel=1e-6, abs=1e-7), s
    assert [h["train/lr"] for h in res["history"]] == [2e-4]


def test_decompressed_student_starts_warmup_as_its_teacher(toy_build, tmp_path):
    _three(tmp_path, "--set", "models.student=null", "--set", "train.log_every=1")
    res = read_results(tmp_path)
    s = res["stage1"]
    assert s["router_init"] == "centroids (from decompression)"
    assert s["clusters"][0]["source"] == "decompression"
    # uniform_all over N experts scaled by N = the dense teacher: first warmup step's KD ~ 0.
    assert s["warmup"][0]["stage1/warmup_kd_loss"] < 1e-4, s["warmup"]
    prov = json.loads((tmp_path / "stage1" / "student" / "padd_provenance.json").read_text())
    assert prov["expert_scale"] == prov["num_experts"]
    assert res["export_max_abs_logit_diff"] < 1e-4
