"""The memory planner (padd_ds/plan.py, `padd plan`, and train.py's refusal).

References are independent of the planner: parameter counts of real transformers modules
(built on the meta device), the published sizes of the models our recipes name, the bytes
autograd really saves in a training forward, and hand arithmetic.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from padd_ds.config import ConfigError
from padd_ds.recipe import load_config
from padd_ds.plan import (GPU_RESERVE_GB, KNOWN_CONFIGS, Cluster, arch_from_config, make_plan, min_shards,
                          slurm_shape)
from padd_ds.validate import validate

RECIPE_70B = str(REPO / "recipes" / "qwen25_72b_to_qwen3_30b_a3b.yaml")
H100 = dict(gpus_per_node=8, gpu_memory_gb=80.0)

# Tiny configs of every architecture family the planner parses; each exercises a feature
# (qkv bias, o bias, q/k norm, dense layers inside an MoE, shared experts, MLA with and
# without q compression, tied embeddings).
TINY = {
    "qwen2": dict(intermediate_size=96, tie_word_embeddings=True),
    "qwen3": dict(intermediate_size=96, head_dim=24),
    "llama": dict(intermediate_size=96, attention_bias=True),
    "qwen3_moe": dict(intermediate_size=96, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      mlp_only_layers=[1], decoder_sparse_step=1),
    "qwen2_moe": dict(intermediate_size=96, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=48),
    "mixtral": dict(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(intermediate_size=96, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                        moe_intermediate_size=16, first_k_dense_replace=1, num_key_value_heads=4, q_lora_rank=24,
                        kv_lora_rank=16, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
}


def tiny_config(model_type: str) -> dict:
    return {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 211, **TINY[model_type]}


def hf_model(conf: dict, device: str = "meta"):
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.for_model(**conf)
    c._attn_implementation = "sdpa"
    with torch.device(device):
        return AutoModelForCausalLM.from_config(c)


# --------------------------------------------------------------------------------------
# Shapes: parameters and activations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_parameter_count_equals_the_transformers_model(model_type):
    conf = tiny_config(model_type)
    model = hf_model(conf)
    assert arch_from_config(conf, model_type).total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, total, active", [
    # model cards: "72.7B"; "30.5B in total and 3.3B activated"; "15.7B total, 2.4B activated"
    # (DeepSeek counts activated parameters without the input embedding); "7.61B"; "6.9B"
    ("Qwen/Qwen2.5-72B-Instruct", 72.7e9, None),
    ("Qwen/Qwen3-30B-A3B", 30.5e9, 3.3e9),
    ("deepseek-ai/DeepSeek-V2-Lite", 15.7e9, 2.4e9),
    ("Qwen/Qwen2.5-Math-7B", 7.61e9, None),
    ("deepseek-ai/deepseek-math-7b-base", 6.9e9, None),
])
def test_known_models_have_their_published_sizes(name, total, active):
    arch = arch_from_config(KNOWN_CONFIGS[name], name)
    assert arch.total_params() == pytest.approx(total, rel=0.005)
    if active is not None:
        counted = arch.active_params() - (arch.embedding_params() if name.startswith("deepseek") else 0)
        assert counted == pytest.approx(active, rel=0.03)


@pytest.mark.parametrize("model_type, dtype", [("qwen2", torch.float32), ("qwen3", torch.float32),
                                               ("qwen3_moe", torch.float32), ("deepseek_v2", torch.float32),
                                               ("qwen3", torch.bfloat16), ("qwen3_moe", torch.bfloat16)])
def test_activation_estimate_matches_what_autograd_saves(model_type, dtype):
    """Bytes of the tensors a training forward of the decoder layers saves for backward
    (each storage once, parameters excluded), per token, against the estimate. (bf16 MLA
    is left out: CPU attention upcasts it to fp32, which GPU kernels do not.)"""
    conf = {**tiny_config(model_type), "hidden_size": 128, "num_attention_heads": 4, "head_dim": 32}
    if model_type == "deepseek_v2":
        conf.pop("head_dim")
    torch.manual_seed(0)
    model = hf_model(conf, "cpu").to(dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    B, L = 4, 64
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, conf["vocab_size"], (B, L)))
    measured = sum(n for ptr, n in saved.items() if ptr not in params) / (B * L)
    estimate = arch_from_config(conf, model_type).train_activation_bytes_per_token(dtype.itemsize)
    assert estimate == pytest.approx(measured, rel=0.10)


# --------------------------------------------------------------------------------------
# Memory against hand arithmetic
# --------------------------------------------------------------------------------------


def test_70b_bf16_teacher_weights_need_two_80gb_gpus():
    """A 70B model in bf16 is 140 GB of weights: one 80 GB GPU cannot hold it, two can
    (before any working memory)."""
    assert 70e9 * 2 / 1e9 == 140.0
    assert min_shards(140.0, 80.0) == 2 and min_shards(80.0, 80.0) == 1 and min_shards(160.1, 80.0) == 3


def test_a_72b_teacher_replica_is_refused_and_zero3_over_a_node_fits():
    cfg = load_config(RECIPE_70B, ["teacher.parallel=replicas"])
    plan = make_plan(cfg, Cluster(nodes=8, **H100))
    weights = next(it.gb for it in plan.teacher if it.label.startswith("weights"))
    assert weights == pytest.approx(2 * 72_706_203_648 / 1e9)  # 145.41 GB in every replica
    assert not plan.fits
    assert any("its weights alone are 145 GB: shard it with teacher.parallel=zero3 over at least 2 ranks" in p
               for p in plan.problems), plan.problems
    # The recipe's layout: one ZeRO-3 teacher over the 8 GPUs of the last node.
    plan = make_plan(load_config(RECIPE_70B), Cluster(nodes=8, **H100))
    weights = next(it.gb for it in plan.teacher if it.label.startswith("weights"))
    assert weights == pytest.approx(2 * 72_706_203_648 / 8 / 1e9)  # 18.18 GB
    assert plan.fits, plan.report()


def test_zero3_and_zero2_student_partitions():
    """Qwen3-30B-A3B over 56 student ranks, EP 8. ZeRO-3: bf16 params and 14 B/param of
    gradients + fp32 master + Adam m, v, all divided by 56. ZeRO-2: each rank holds the
    non-expert parameters and its 16 of 128 experts whole."""
    P = 30_532_122_624
    experts = 48 * 128 * 3 * 2048 * 768            # routed expert weights
    cfg = load_config(RECIPE_70B)
    items = {it.label.split(" ")[0]: it.gb for it in make_plan(cfg, Cluster(nodes=8, **H100)).student}
    assert items["params"] == pytest.approx(2 * P / 56 / 1e9)
    assert items["grads"] == pytest.approx(14 * P / 56 / 1e9)
    cfg2 = load_config(RECIPE_70B, ["deepspeed.config=ds_configs/zero2.json"])
    items = {it.label.split(" ")[0]: it.gb for it in make_plan(cfg2, Cluster(nodes=8, **H100)).student}
    assert items["params"] == pytest.approx(2 * (P - experts + experts / 8) / 1e9)  # 10.33 GB


def test_offload_moves_optimizer_state_to_host_ram():
    cfg = load_config(RECIPE_70B, ["deepspeed.config=ds_configs/zero3_offload.json"])
    plan = make_plan(cfg, Cluster(nodes=8, host_memory_gb=2000, **H100))
    items = {it.label.split(" ")[0]: it.gb for it in plan.student}
    assert items["params:"] == 0 and items["grads"] == 0
    P = 30_532_122_624
    # 8 student ranks per node: each loads the full bf16 student, then holds 16 B/param
    # (fp32 master + m + v + fp32 gradient) and its bf16 parameter partition in host RAM.
    student_node = 8 * (2 * P + (16 + 2) * P / 56) / 1e9
    teacher_node = 8 * 2 * 72_706_203_648 / 1e9
    assert plan.host_gb == pytest.approx(max(student_node, teacher_node))


# --------------------------------------------------------------------------------------
# Divisibility, layout, fixes
# --------------------------------------------------------------------------------------


def test_expert_parallel_size_must_divide_students_and_experts():
    cfg = load_config(RECIPE_70B, ["deepspeed.expert_parallel_size=6"])
    plan = make_plan(cfg, Cluster(nodes=8, **H100))
    assert "128 experts do not divide over expert-parallel size 6" in plan.problems
    cfg = load_config(RECIPE_70B, ["topology.teacher_ranks=4", "teacher.parallel=replicas"])
    plan = make_plan(cfg, Cluster(nodes=8, **H100))
    assert "60 student ranks do not divide into expert-parallel groups of 8" in plan.problems


def test_a_sharded_teacher_must_stay_on_one_node():
    cfg = load_config(RECIPE_70B, ["topology.teacher_ranks=16"])
    plan = make_plan(cfg, Cluster(nodes=8, **H100))
    assert any("span nodes 6-7" in p for p in plan.problems), plan.problems


def test_every_suggested_fix_really_fits():
    cfg = load_config(str(REPO / "recipes" / "qwen25math7b_to_qwen3_30b_a3b.yaml"),
                      ["train.micro_batch_size=2", "train.mode=distill", "train.activation_checkpointing=false"])
    cfg.check()
    cluster = Cluster(nodes=4, **H100)
    plan = make_plan(cfg, cluster)
    assert not plan.fits and len(plan.fixes) >= 2, plan.report()
    assert "--set train.activation_checkpointing=true" in [f.what for f in plan.fixes]
    for fix in plan.fixes:
        c, cl = fix.apply(cfg, cluster)
        assert make_plan(c, cl).fits, fix.what



def test_fixes_are_configs_the_trainer_accepts():
    """Without activation checkpointing the whole rollout batch of 8 sequences as one
    micro-batch does not fit 80 GB. 3 x 4k sequences might, but 3 does not divide the rollout
    batch and 4 does not fit: the planner suggests the largest micro-batch the trainer accepts
    (2), without train.grad_accum (the rollout batch sets the accumulation in train.mode=padd)."""
    cfg = load_config(str(REPO / "recipes" / "deepseekmath7b_to_v2lite.yaml"),
                      ["train.micro_batch_size=8", "train.activation_checkpointing=false",
                       "stage1.eval_problems=192"])  # Stage I measures in global batches of 8 x 24
    cluster = Cluster(nodes=4, **H100)
    validate(cfg, world_size=cluster.world)
    plan = make_plan(cfg, cluster)
    sizes = [f.overrides for f in plan.fixes if "train.micro_batch_size" in f.overrides]
    assert sizes == [{"train.micro_batch_size": 2}], plan.report()
    for fix in plan.fixes:
        fixed, _ = fix.apply(cfg, cluster)
        validate(fixed, world_size=cluster.world)


def test_the_rollout_layout_check_uses_the_trainers_words():
    """56 prompts per step do not split over the 48 student ranks of 7 nodes: the plan fails
    with the sentence validation (and so train.py) refuses the launch with, and suggests 8 nodes."""
    cfg = load_config(RECIPE_70B)
    plan = make_plan(cfg, Cluster(nodes=7, **H100))
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=56)
    assert plan.problems == [str(e.value)] == ["stage3.prompts_per_step=56 does not split over 48 student ranks; "
                                               "make it a multiple of the student ranks"]
    assert [f.what for f in plan.fixes] == ["8 nodes (sbatch --nodes=8)"]
    ok = make_plan(cfg, Cluster(nodes=8, **H100))
    assert ("stage3.prompts_per_step=56: 1 prompt x G=8 = 8 rollouts per student rank and step, 8 micro-batches of 1"
            in [c.message for c in ok.checks if c.ok])
    # The rollout phase holds a KV cache for the whole rollout batch; training, one micro-batch.
    kv = next(it for it in ok.student if it.label.startswith("(rollouts"))
    assert "KV cache 8 x 16384 tokens" in kv.label
    assert any(it.label.startswith("activations (1 x 16384 tokens") for it in ok.student)

def test_speed_estimate_from_flops():
    """Teacher-bound 70B layout: the sharded teacher splits each 1-sequence request over 8
    ranks, so 1 GPU computes; one forward costs 2 FLOPs per non-embedding weight plus
    attention over half the 16384-token context."""
    plan = make_plan(load_config(RECIPE_70B), Cluster(nodes=8, **H100, peak_tflops=1000.0, mfu=0.5))
    T = arch_from_config(KNOWN_CONFIGS["Qwen/Qwen2.5-72B-Instruct"], "t")
    flops = 2 * (72_706_203_648 - 152064 * 8192) + 2 * 80 * 8192 * (8192 + 8192)
    assert T.forward_flops_per_token(8192) == flops
    rate = 1000e12 * 0.5 / flops
    assert f"teacher {rate:,.0f} tok/s" in plan.speed[0] and plan.speed[1].startswith("teacher-bound")


def test_speed_counts_every_update_on_a_rollout_batch():
    """An RL step samples its rollout batch once (one forward) and makes
    stage3.updates_per_batch updates on it, each fwd + bwd + the checkpoint's recompute."""
    cluster = Cluster(nodes=8, **H100, peak_tflops=1000.0, mfu=0.5)
    speeds = {}
    for u in (1, 2):
        plan = make_plan(load_config(RECIPE_70B, [f"stage3.updates_per_batch={u}"]), cluster)
        passes, student = re.search(r"student ([\d,]+) tok/s \([\d.]+ GFLOP/token over (\d+) passes", plan.speed[0]).group(2, 1)
        speeds[u] = (int(passes), float(student.replace(",", "")))
    assert speeds[1][0] == 1 + 4 and speeds[2][0] == 1 + 2 * 4
    assert speeds[2][1] / speeds[1][1] == pytest.approx(5 / 9, rel=1e-3)


def test_slurm_shape():
    env = {"SLURM_NTASKS": "64", "SLURM_JOB_NUM_NODES": "8", "SLURM_TASKS_PER_NODE": "8(x8)"}
    assert slurm_shape(env) == (8, 8, 64)
    assert slurm_shape({"SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "2,1"}) == (2, 2, 3)


# --------------------------------------------------------------------------------------
# The command and the launch check
# --------------------------------------------------------------------------------------


def padd_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "padd_ds.cli", "plan", "--recipe", RECIPE_70B, *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_padd_plan_validates_first_with_the_trainers_words():
    p = padd_plan("--nodes", "8", "--set", "train.grad_accum=8")
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr == ("padd-ds: config error: train.grad_accum=8 in train.mode=padd: accumulation follows from "
                        "stage3.prompts_per_step x stage3.group_size / (student ranks x train.micro_batch_size); "
                        "remove train.grad_accum\n")


def test_padd_plan_70b_on_8_nodes_fits():
    p = padd_plan("--nodes", "8", "--gpus-per-node", "8", "--gpu-mem-gb", "80")
    assert p.returncode == 0, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"PLAN fits=true peak_gpu_gb=\d+\.\d", last), last
    assert float(last.rsplit("=", 1)[1]) <= 80 - GPU_RESERVE_GB
    assert "students 0-55 (nodes 0-6), teacher 56-63 (node 7)" in p.stdout


def test_padd_plan_70b_on_one_node_refuses_clearly():
    p = padd_plan("--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gb", "80")
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    assert re.fullmatch(r"PLAN fits=false peak_gpu_gb=\d+\.\d", lines[-1]), lines[-1]
    assert "verdict  does NOT fit:" in p.stdout
    assert "world size 8 cannot hold topology.teacher_ranks=8 plus at least one student rank" in p.stdout
    assert re.search(r"\d+ nodes \(sbatch --nodes=\d+\)", p.stdout)  # a concrete fix


def test_train_py_refuses_a_plan_that_cannot_fit_before_any_process_group():
    """Rank 0 of a 64-task SLURM launch on this CPU host: the 72B recipe cannot fit a share
    of this machine's RAM, so train.py stops with the plan's reasons, before rendezvous."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="64", SLURM_NTASKS_PER_NODE="8",
               SLURM_JOB_NODELIST="localhost", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "--recipe", RECIPE_70B],
                       env=env, capture_output=True, text=True, timeout=120, cwd=REPO, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("padd-ds: config error: plan: does not fit on 8 nodes x 8 CPU processes"), err
    assert "teacher needs" in err and "student needs" in err
    assert "init_distributed" not in p.stdout + p.stderr


def test_colocated_single_process_plan_adds_the_teacher():
    cfg = load_config(str(REPO / "recipes" / "qwen25math7b_to_qwen3_30b_a3b.yaml"), ["topology.colocated=true"])
    colocated = make_plan(cfg, Cluster(nodes=1, gpus_per_node=1, gpu_memory_gb=80.0))
    separate = make_plan(load_config(str(REPO / "recipes" / "qwen25math7b_to_qwen3_30b_a3b.yaml")),
                         Cluster(nodes=4, **H100))
    assert not colocated.teacher and colocated.student[-1].label.startswith("colocated teacher")
    assert colocated.student[-1].gb == pytest.approx(separate.teacher_peak_gb)
    assert not colocated.fits  # a 30B student and its teacher on one GPU
