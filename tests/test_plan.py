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
from padd_ds.plan import (GPU_RESERVE_GB, KNOWN_CONFIGS, Arch, Cluster, Hardware, RolloutLayout, arch_from_config,
                          VllmEngines, decode_gathered, decode_hf, decode_vllm, make_plan, min_shards, slurm_shape)
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
    # A student node maps the bf16 student's checkpoint once (its 8 ranks copy from the shared
    # page cache to their GPUs), then each rank holds 16 B/param (fp32 master + m + v + fp32
    # gradient) and its bf16 parameter partition in host RAM: 61 + 78.5 GB. The teacher node
    # maps the 72B checkpoint once (145 GB; its ZeRO-3 ranks load their partitions from it).
    student_node = (2 * P + 8 * (16 + 2) * P / 56) / 1e9
    teacher_node = 2 * 72_706_203_648 / 1e9
    assert plan.host_gb == pytest.approx(max(student_node, teacher_node))
    assert plan.host_gb == pytest.approx(145.4, abs=0.1)


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
    """Teacher-bound 70B layout: the sharded teacher's 8 ranks each score one of the 56
    students' 1-sequence requests per round, so all 8 GPUs compute; one forward costs 2 FLOPs
    per non-embedding weight plus attention over half the 16384-token context."""
    plan = make_plan(load_config(RECIPE_70B), Cluster(nodes=8, **H100, peak_tflops=1000.0, mfu=0.5))
    T = arch_from_config(KNOWN_CONFIGS["Qwen/Qwen2.5-72B-Instruct"], "t")
    flops = 2 * (72_706_203_648 - 152064 * 8192) + 2 * 80 * 8192 * (8192 + 8192)
    assert T.forward_flops_per_token(8192) == flops
    rate = 8 * 1000e12 * 0.5 / flops
    assert f"teacher {rate:,.0f} tok/s" in plan.speed[0] and plan.speed[1].startswith("teacher-bound")
    assert "8 of 8 ranks busy, one request each" in plan.speed[0]


def test_speed_counts_every_update_on_a_rollout_batch():
    """An RL step makes stage3.updates_per_batch updates on its rollout batch, each fwd + bwd +
    the checkpoint's recompute (the rollout phase is the decode model's, not a forward)."""
    cluster = Cluster(nodes=8, **H100, peak_tflops=1000.0, mfu=0.5)
    speeds = {}
    for u in (1, 2):
        plan = make_plan(load_config(RECIPE_70B, [f"stage3.updates_per_batch={u}"]), cluster)
        passes, student = re.search(r"student ([\d,]+) tok/s \([\d.]+ GFLOP/token over (\d+) passes", plan.speed[0]).group(2, 1)
        speeds[u] = (int(passes), float(student.replace(",", "")))
    assert speeds[1][0] == 4 and speeds[2][0] == 2 * 4
    assert speeds[2][1] / speeds[1][1] == pytest.approx(1 / 2, rel=1e-3)


# --------------------------------------------------------------------------------------
# Rollouts: the decode model per backend, against hand arithmetic
# --------------------------------------------------------------------------------------

# One MoE layer, hidden 10, one head of 10, 4 experts of width 10, top-2, vocab 100:
#   attention 10 x (10 + 2 x 10) + 10 x 10 = 400; two RMSNorms 20; router 10 x 4 = 40;
#   routed experts 4 x 3 x 10 x 10 = 1200; embedding 1000; LM head 1000; final norm 10;
#   total 3670; read by a decode step besides the experts: 3670 - 1200 - 1000 (input embedding) = 1470.
#   KV cache: 1 layer x (10 + 10) x 2 B = 40 B per token.
TOY_MOE = Arch(name="toy", model_type="qwen3_moe", layers=1, hidden=10, vocab=100, heads=1, kv_heads=1, head_dim=10,
               intermediate=0, experts=4, top_k=2, expert_intermediate=10, moe_layers=1)
# 4 student ranks, 2 per node (so ZeRO-3 gathers cross nodes), EP 2 (inside a node), 2 sequences
# per rank, 4 prompt + 8 response tokens (mean context 4 + 8/2 = 8), bf16.
TOY_LAYOUT = RolloutLayout(students=4, per_node=2, ep=2, batch=2, prompt=4, response=8, elem=2)
# Round rates in bytes/s: HBM 1000, NVLink 100, InfiniBand 10, 1 s per collective.
TOY_HW = Hardware("toy", hbm=1000.0, nvlink=100.0, ib=10.0, latency_s=1.0)
ROLLOUT_NAMES = ("hf", "hf_gathered", "vllm")


def test_toy_moe_shapes_for_the_decode_model():
    assert TOY_MOE.total_params() == 3670 and TOY_MOE.routed_expert_params() == 1200
    assert TOY_MOE.kv_cache_bytes_per_token(2) == 40
    # a batch of n tokens touches 1 - (1 - k/E)^n = 1 - (1/2)^n of the experts
    assert TOY_MOE.touched_expert_fraction(1) == 0.5 and TOY_MOE.touched_expert_fraction(4) == 15 / 16
    assert TOY_MOE.decode_read_params(1) == 1470 + 600           # one token: k/E of the experts
    assert TOY_MOE.decode_read_params(200) == pytest.approx(1470 + 1200)  # a large batch: all of them


def test_decode_hf_by_hand():
    """Per step and rank: gather every non-expert parameter and its EP half of the experts,
    less its own 1/4 of everything, over InfiniBand: 2 B x (2470 + 600 - 917.5) = 4305 B, 430.5 s.
    HBM: 1470 + its 2 experts x 300 touched by the 2 x 2 = 4 tokens of its EP group (15/16):
    2 x (1470 + 600 x 15/16) = 4065 B, plus KV 2 seqs x 8 x 40 = 640 B -> 4.705 s.
    All-to-alls: 2 x 1 layer x 2 seqs x top-2 x 10 x 2 B x 1/2 = 80 B over NVLink, 0.8 s.
    Collectives: 2 x 1 layer + 2 + 1 MoE layer x 3 = 7, 7 s. Step 443.005 s, 8 steps a phase."""
    d = decode_hf(TOY_MOE, TOY_LAYOUT, TOY_HW)
    assert d.setup_s == 0 and d.step_s == pytest.approx(430.5 + 4.705 + 0.8 + 7)
    assert d.phase_s == pytest.approx(8 * 443.005)
    assert d.tok_s == pytest.approx(4 * 2 * 8 / (8 * 443.005))  # 4 ranks x 2 sequences x 8 tokens


def test_decode_hf_gathered_by_hand():
    """Once a phase: the same ZeRO-3 gather (430.5 s over InfiniBand), then the other EP half
    of the experts over NVLink: 2 B x 600 / 100 = 12 s. Each step reads the non-expert weights
    and the experts its own 2 tokens touch (3/4): 2 x (1470 + 900) = 4740 B, plus KV 640 B:
    5.38 s, no collective."""
    d = decode_gathered(TOY_MOE, TOY_LAYOUT, TOY_HW)
    assert d.setup_s == pytest.approx(442.5) and d.step_s == pytest.approx(5.38)
    assert d.phase_s == pytest.approx(442.5 + 8 * 5.38)


def test_decode_vllm_by_hand():
    """Engines of 2 ranks on 2 GPUs each (tensor parallel) serving 2 x 2 = 4 sequences. Weight
    sync: hf_gathered's gather (430.5 + 12 s) and two host copies of 2 B x 3670 at 10 GB/s. Each
    step reads (2 x (1470 + 1200 x 15/16) + 4 x 8 x 40) / 2 = 3235 B per GPU, 3.235 s, plus
    2 collectives (one layer), 2 s."""
    eng = VllmEngines(ranks_per_engine=2, tensor_parallel=2, gpu_fraction=0.5)
    d = decode_vllm(TOY_MOE, TOY_LAYOUT, TOY_HW, eng, 1.0)
    assert d.setup_s == pytest.approx(442.5 + 2 * 2 * 3670 / 10e9) and d.step_s == pytest.approx(5.235)
    assert d.phase_s == pytest.approx(d.setup_s + 8 * 5.235)
    assert d.terms.startswith("2 engines x 2 GPUs, 4 sequences each in 1 wave")


def test_decode_vllm_decodes_in_waves_what_its_kv_room_cannot_hold():
    """One GPU per engine: weights 2 B x 3670 = 7340 B; the group's KV cache at full length
    4 x 12 tokens x 40 B = 1920 B. A GPU of 16680 B at 0.5 leaves 1000 B beside the weights: 2
    waves of 2 sequences, each step 2 x (2 x (1470 + 1200 x 3/4) + 2 x 8 x 40) B = 2 x 5.38 s.
    Weights beyond the share: no wave fits, and the plan says so."""
    eng = VllmEngines(ranks_per_engine=2, tensor_parallel=1, gpu_fraction=0.5)
    weights, kv, waves = eng.memory(TOY_MOE, TOY_LAYOUT, 16680e-9)
    assert (weights, kv, waves) == (pytest.approx(7340e-9), pytest.approx(1920e-9), 2)
    assert decode_vllm(TOY_MOE, TOY_LAYOUT, TOY_HW, eng, 16680e-9).step_s == pytest.approx(2 * 5.38)
    assert eng.memory(TOY_MOE, TOY_LAYOUT, 14000e-9)[2] == 0


def test_one_student_rank_decodes_with_no_collective():
    solo = RolloutLayout(students=1, per_node=8, ep=1, batch=2, prompt=4, response=8, elem=2)
    d = decode_hf(TOY_MOE, solo, TOY_HW)
    # nothing to gather (the rank holds everything), no all-to-all: HBM 2 x (1470 + 1200 x 3/4) + 640 B
    assert d.step_s == pytest.approx((2 * 2370 + 640) / 1000)


def _rollout_lines(plan) -> dict[str, str]:
    return {m.group(1): line for line in plan.speed if (m := re.match(r"rollout (\w+)[ :]", line))}


def test_72b_rollouts_take_hours_on_the_engine_and_minutes_gathered():
    """The recipe's layout on H100s: 56 ranks x 8 sequences x 15872 decode steps. `hf` gathers
    9.2 GB per rank and step over InfiniBand (~0.2 s a step, most of an hour a phase); the
    gathered copy and a vLLM engine read their weights and KV cache from HBM (~10 ms a step)."""
    plan = make_plan(load_config(RECIPE_70B), Cluster(nodes=8, **H100))
    lines = _rollout_lines(plan)
    assert set(lines) >= {"hf", "hf_gathered", "vllm"}
    assert lines["hf"].startswith("rollout hf (configured):")
    assert lines["vllm"].startswith("rollout vllm:") and "28 engines x 2 GPUs, 16 sequences each in 1 wave" in lines["vllm"]
    phase = {k: float(re.search(r"-> ([\d,]+) s", v).group(1).replace(",", "")) for k, v in lines.items()
             if k in ROLLOUT_NAMES}
    assert phase["hf"] > 2500 and plan.step_s > 3600  # hours per RL step
    assert phase["hf_gathered"] < 300 and phase["vllm"] < 300 and phase["hf"] > 10 * phase["hf_gathered"]
    assert "needs 84.5 GB of 76.0 usable: does NOT fit" in lines["hf_gathered"]  # see the refusal below
    assert plan.rollout_tok_s == pytest.approx(56 * 8 * 15872 / phase["hf"], rel=1e-3)
    assert any("worst case: no response ends early" in line for line in plan.speed)


def test_hf_gathered_that_cannot_hold_the_student_and_its_kv_cache_is_refused():
    """Each rank keeps its training state (params 1.09 + grads and Adam 7.63 + ZeRO-3 gather
    buffers 1.34 = 10.06 GB) and adds the whole bf16 student (2 x 30,532,122,624 B = 61.06 GB),
    the KV cache of its 8 rollouts at 16384 tokens (48 layers x (512 + 512) x 2 B = 98,304 B a
    token: 12.88 GB) and the prefill's temporaries: 84.5 GB, over 76 usable on 80 GB. A 141 GB
    H200 holds it."""
    cfg = load_config(RECIPE_70B, ["rollout.backend=hf_gathered"])
    plan = make_plan(cfg, Cluster(nodes=8, **H100))
    assert 2 * 30_532_122_624 / 1e9 == pytest.approx(61.06, abs=0.005)
    assert 8 * 16384 * 48 * 1024 * 2 / 1e9 == pytest.approx(12.88, abs=0.005)
    assert not plan.fits and plan.student_peak_gb == pytest.approx(84.5, abs=0.05)
    [problem] = plan.problems
    assert problem.startswith("student needs 84.5 GB per GPU, 76.0 GB usable (rollout.backend=hf_gathered: "
                              "the gathered student 61.1 GB (2 B x 30.53B) + KV cache 8 x 16384 tokens 12.9 GB"), problem
    assert "--set rollout.backend=hf" in [f.what for f in plan.fixes]
    assert make_plan(cfg, Cluster(nodes=8, gpus_per_node=8, gpu_memory_gb=141.0)).fits
    assert make_plan(load_config(RECIPE_70B), Cluster(nodes=8, **H100)).fits  # hf holds no copy


def test_the_main_ranks_export_check_and_evaluation_must_fit_too():
    """At the end every student rank loads the exported student in bf16 (61.06 GB) with its training
    state parked on the host, and evaluates eval.batch_size prompts of 512 + eval.max_new_tokens
    tokens: 16 x 4096 x 98,304 B = 6.44 GB of KV cache, plus the prefill's temporaries. At 64
    prompts the KV cache alone is 25.8 GB: refused, naming the phase, with a smaller batch as a fix."""
    plan = make_plan(load_config(RECIPE_70B), Cluster(nodes=8, **H100))
    final = next(it for it in plan.student if it.label.startswith("(export check + evaluation"))
    assert 16 * 4096 * 98_304 / 1e9 == pytest.approx(6.44, abs=0.005)
    assert "the exported student 61.1 GB + KV cache 16 x 4096 tokens 6.4 GB" in final.label
    assert plan.fits and plan.student_peak_gb == pytest.approx(final.gb) and 67.5 < final.gb < 76.0
    big = make_plan(load_config(RECIPE_70B, ["eval.batch_size=64"]), Cluster(nodes=8, **H100))
    [problem] = big.problems
    assert "(the export check and evaluation at the end: the exported student 61.1 GB + KV cache 64 x 4096 " \
           "tokens 25.8 GB" in problem and problem.endswith("lower eval.batch_size or eval.max_new_tokens)"), problem
    assert "--set eval.batch_size=32" in [f.what for f in big.fixes]


def test_stage1_uniform_warmup_warns_when_its_all_expert_activations_outgrow_the_device():
    """uniform_all sends each token through all 128 experts: the recomputed layer keeps 1.84 MB
    a token instead of 0.12 MB, so at 16384 tokens the warmup needs more than training does.
    A warning (the warmup's solutions are short), with the longest sequence that fits; a
    random top-k warmup routes like training and is not checked."""
    def stage1_lines(*overrides):
        plan = make_plan(load_config(RECIPE_70B, list(overrides)), Cluster(nodes=8, **H100))
        return plan, [c for c in plan.checks if "Stage I warmup" in c.message]

    plan, [check] = stage1_lines()
    assert plan.fits and not check.ok and not check.fatal
    longest = int(re.search(r"1 x (\d+) tokens fit", check.message)[1])
    assert 8192 < longest < 16384, check.message
    _, [short] = stage1_lines("data.max_response_tokens=7680")
    assert short.ok and "fits 8192-token sequences" in short.message
    assert stage1_lines("stage1.warmup_router=uniform_random_topk")[1] == []


def test_plan_last_line_gains_the_configured_rollout_backend():
    for backend in ROLLOUT_NAMES[:2]:
        plan = make_plan(load_config(RECIPE_70B, [f"rollout.backend={backend}"]),
                         Cluster(nodes=8, gpus_per_node=8, gpu_memory_gb=141.0))
        last = plan.report().splitlines()[-1]
        assert re.fullmatch(r"PLAN fits=true peak_gpu_gb=\d+\.\d rollout_tok_s=\d+ step_s=\d+\.\d", last), last
        line = _rollout_lines(plan)[backend]
        assert line.startswith(f"rollout {backend} (configured):")
        assert f"rollout_tok_s={plan.rollout_tok_s:,.0f}" in line
    distill = make_plan(load_config(RECIPE_70B, ["train.mode=distill", "train.grad_accum=1"]), Cluster(nodes=8, **H100))
    assert re.fullmatch(r"PLAN fits=\w+ peak_gpu_gb=\d+\.\d", distill.report().splitlines()[-1])
    cpu = make_plan(load_config(RECIPE_70B), Cluster(nodes=8, gpus_per_node=8, gpu_memory_gb=500.0, device="cpu"))
    assert "rollout not estimated (the decode model needs GPU bandwidths)" in cpu.speed


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
    """The cluster of slurm/padd_70b.sbatch: the plan fits, and the configured `hf` rollouts
    make an RL step take hours where hf_gathered and vllm decode a phase in minutes."""
    sbatch = (REPO / "slurm" / "padd_70b.sbatch").read_text()
    nodes = re.search(r"^#SBATCH --nodes=(\d+)$", sbatch, re.M).group(1)
    per_node = re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", sbatch, re.M).group(1)
    p = padd_plan("--nodes", nodes, "--gpus-per-node", per_node, "--gpu-mem-gb", "80")
    assert p.returncode == 0, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"PLAN fits=true peak_gpu_gb=(\d+\.\d) rollout_tok_s=(\d+) step_s=(\d+\.\d)", last)
    assert m, last
    assert float(m.group(1)) <= 80 - GPU_RESERVE_GB
    assert float(m.group(3)) > 3600  # hf: hours per RL step
    assert "students 0-55 (nodes 0-6), teacher 56-63 (node 7)" in p.stdout
    per_phase = dict(re.findall(r"speed    rollout (\w+).*-> [\d,]+ s \(([\d.]+ (?:h|min))\) per phase", p.stdout))
    print(last, per_phase)
    assert per_phase["hf"].endswith("min") and float(per_phase["hf"].split()[0]) > 45
    assert all(per_phase[k].endswith("min") and float(per_phase[k].split()[0]) < 5 for k in ("hf_gathered", "vllm"))


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


def test_72b_with_vllm_engines_that_cannot_hold_the_student_is_refused():
    """The recipe's placement (28 engines x 2 GPUs at 0.6) fits; one engine per GPU at 0.3 cannot
    hold the 61 GB student: the plan refuses, naming the fix."""
    ok = make_plan(load_config(RECIPE_70B, ["rollout.backend=vllm"]), Cluster(nodes=8, **H100))
    assert ok.fits and ok.step_s < 900, [c.message for c in ok.checks if not c.ok]
    bad = make_plan(load_config(RECIPE_70B, ["rollout.backend=vllm", "rollout.vllm_ranks_per_engine=1",
                                             "rollout.vllm_tensor_parallel=1", "rollout.vllm_gpu_memory_utilization=0.3"]),
                    Cluster(nodes=8, **H100), search_fixes=False)
    assert not bad.fits
    assert any(not c.ok and "weights 61.1 GB" in c.message and "the weights do NOT fit; raise rollout.vllm_tensor_parallel"
               in c.message for c in bad.checks), [c.message for c in bad.checks]
