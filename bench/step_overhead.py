"""What does a PADD training step cost over a vanilla GRPO step, on the same rollouts and model?

One process, the toy student in a ZeRO-3 + AutoEP engine (EP 1, CPU). Rollouts are sampled
once, scored once and the teacher's sparse logits computed once (on the cluster they arrive
from the teacher ranks while the student runs its forward, see PLATFORM_NOTES / teacher
wait in the README), then both variants run the trainer's own step function
(`padd_ds.rl.step.update_on_rollouts`) alternately on identical inputs:

    grpo  stage3.policy=grpo, no KD, no Stage IV statistics use, no drift penalty
    padd  PR-GRPO with router drift + advantage-tempered KD + Stage IV bias update

Both do forward, backward and optimizer step; PADD adds the recorded router probabilities,
the drift against the previous routers, the KD loss over top-k teacher targets and the bias
controller. The engine's weights change every step either way, which is the real regime.
The last line is

    STEP_OVERHEAD padd_over_grpo=<median PADD step time / median GRPO step time>

Usage: python bench/step_overhead.py [--steps 20] [--micro-batch 16]   (PADD_TOY_DIR or the demo world)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 2 warm-up steps each)")
    ap.add_argument("--micro-batch", type=int, default=16, help="rollouts per step (4 prompts x G=4)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))

    import deepspeed
    import torch

    from padd_ds.data.math import load_train_problems
    from padd_ds.engine.build import initialize_engine
    from padd_ds.models.loading import load_causal_lm, load_tokenizer
    from padd_ds.models.router import router_weights, routers, set_bias
    from padd_ds.recipe import load_config
    from padd_ds.rl.balance import BiasController
    from padd_ds.rl.rewards import group_advantages, reward
    from padd_ds.rl.rollout import sample_rollouts
    from padd_ds.rl.step import update_on_rollouts
    from padd_ds.rl.trainer import model_paths
    from padd_ds.teacher.service import TeacherModel
    from padd_ds.toy.resolve import use_toy_world_for

    cfg = load_config(str(REPO / "recipes" / "toy_cpu.yaml"),
                      ["train.mode=padd", f"train.micro_batch_size={args.micro_batch}", "train.lr=1e-5",
                       "deepspeed.expert_parallel_size=1", "topology.colocated=true"])
    use_toy_world_for(cfg)
    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo")
    from padd_ds.launch.world import leave, release_shm_names

    release_shm_names()
    teacher_path, student_path, tok_path = model_paths(cfg)
    tok = load_tokenizer(tok_path)
    engine, _ = initialize_engine(cfg, load_causal_lm(student_path, "float32"), 1)
    teacher = TeacherModel(load_causal_lm(teacher_path, "float32"))

    G = cfg.stage3.group_size
    problems = load_train_problems("toy")[: args.micro_batch // G]
    ro = sample_rollouts(engine.module, tok, problems, G, 1.0, 1.0, args.max_new_tokens, cfg.data.max_prompt_tokens,
                         synced=False)
    rewards = torch.tensor([reward(r, problems[i // G]["answer"], cfg.stage3)[0] for i, r in enumerate(ro.responses)])
    adv = group_advantages(rewards.view(-1, G))[0].reshape(-1)
    targets = teacher.score(ro.batch.ids, ro.batch.lengths, cfg.teacher.logits_top_k).logits

    grpo_cfg = dataclasses.replace(cfg.stage3, policy="grpo")
    mod = engine.module
    controller = BiasController(len(routers(mod)), routers(mod)[0].num_experts, cfg.stage4)

    def grpo_step() -> None:
        update_on_rollouts(engine, ro.batch, adv, router_weights(mod), cfg, grpo_cfg, 1, None)

    prev = [router_weights(mod)]

    def padd_step() -> None:
        cur = router_weights(mod)
        res = update_on_rollouts(engine, ro.batch, adv, prev[0], cfg, cfg.stage3, 1, lambda: targets)
        controller.update(res.counts, res.adv_sum, res.adv_count)
        set_bias(mod, controller.bias)
        prev[0] = cur

    times = {"grpo": [], "padd": []}
    for i in range(args.steps + 2):
        for name, fn in (("grpo", grpo_step), ("padd", padd_step)) if i % 2 == 0 else (("padd", padd_step),
                                                                                        ("grpo", grpo_step)):
            t0 = time.perf_counter()
            fn()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    g, p = statistics.median(times["grpo"]), statistics.median(times["padd"])
    tokens = int(ro.batch.lengths.sum())
    print(f"rollouts: {ro.batch.ids.shape[0]} sequences, {tokens} tokens; median step: grpo {g * 1e3:.1f} ms, "
          f"padd {p * 1e3:.1f} ms (n={args.steps} each, interleaved)")
    print(f"STEP_OVERHEAD padd_over_grpo={p / g:.4f}")
    leave(0)  # skip interpreter teardown (see padd_ds.launch.world)


if __name__ == "__main__":
    main()
