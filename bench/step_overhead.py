"""What does a PADD training step cost over a vanilla GRPO step, on the same rollouts and model?

One process, the toy student in a ZeRO-3 + AutoEP engine (EP 1, CPU). Rollouts are sampled
once, scored once and the teacher's sparse logits computed once (in a real run they arrive
from the teacher ranks while the student runs its forward; bench/teacher_stream.py measures
that wait), then both variants run the trainer's own step function
(`padd_ds.rl.step.update_on_rollouts`) alternately on identical inputs:

    grpo  stage3.policy=grpo, no KD, no Stage IV statistics use, no drift penalty
    padd  PR-GRPO with router drift + advantage-tempered KD + Stage IV bias update

Both do forward, backward and optimizer step; PADD adds the recorded router probabilities,
the drift against the previous routers, the KD loss over top-k teacher targets and the bias
controller. The engine's weights change every step either way, which is the real regime.
The last line is

    STEP_OVERHEAD padd_over_grpo=<median PADD step time / median GRPO step time>

Usage: python bench/step_overhead.py [--steps 20] [--micro-batch 16]   (PADD_TOY_DIR or the demo toy build)
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
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 2 warm-up steps each)")
    ap.add_argument("--micro-batch", type=int, default=16, help="rollouts per step (4 prompts x G=4)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    return ap.parse_args()


def init_single_process() -> None:
    """Rank 0 of a one-process world on a free rendezvous port, before deepspeed is imported."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


@dataclasses.dataclass
class Inputs:
    """The engine, and one rollout batch with its advantages and teacher targets, shared by both variants."""

    cfg: object
    engine: object
    rb: object       # rl.rollout.RolloutBatch
    targets: object


def prepare(args: argparse.Namespace) -> Inputs:
    """The toy student in a ZeRO-3 + AutoEP engine, the teacher, and one scored rollout batch."""
    import deepspeed
    import torch

    from padd_ds.data.math import load_train_problems
    from padd_ds.engine.build import initialize_engine
    from padd_ds.models.files import model_paths
    from padd_ds.models.loading import load_causal_lm, load_tokenizer
    from padd_ds.recipe import load_config
    from padd_ds.rl.rewards import group_advantages, reward
    from padd_ds.rl.rollout import RolloutBatch, RolloutSampling, sample_rollouts
    from padd_ds.teacher.service import TeacherModel
    from padd_ds.toy.resolve import use_toy_build_for

    cfg = load_config(str(REPO / "recipes" / "toy_cpu.yaml"),
                      ["train.mode=padd", f"train.micro_batch_size={args.micro_batch}", "train.lr=1e-5",
                       "deepspeed.expert_parallel_size=1", "topology.colocated=true"])
    cfg.stage3.prompts_per_step = args.micro_batch // cfg.stage3.group_size  # the rollout batch = one micro-batch
    use_toy_build_for(cfg)
    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo")
    from padd_ds.launch.world import release_shm_names

    release_shm_names()
    teacher_path, student_path, tok_path = model_paths(cfg)
    tok = load_tokenizer(tok_path)
    engine, _ = initialize_engine(cfg, load_causal_lm(student_path, "float32"), 1)
    teacher = TeacherModel(load_causal_lm(teacher_path, "float32"))

    G = cfg.stage3.group_size
    problems = load_train_problems("toy")[: args.micro_batch // G]
    ro = sample_rollouts(engine.module, tok, problems, RolloutSampling(G, 1.0, 1.0, args.max_new_tokens,
                                                                       cfg.data.max_prompt_tokens), synced=False)
    rewards = torch.tensor([reward(r, problems[i // G]["answer"], cfg.stage3)[0] for i, r in enumerate(ro.responses)])
    adv = group_advantages(rewards.view(-1, G))[0].reshape(-1)
    targets = teacher.score(ro.batch.ids, ro.batch.lengths, cfg.teacher.logits_top_k).logits
    return Inputs(cfg, engine, RolloutBatch(ro, rewards.view(-1, G), adv), targets)


def step_functions(x: Inputs) -> dict[str, Callable[[], None]]:
    """One GRPO step and one PADD step (KD, drift against the previous routers, Stage IV bias) on `x`."""
    from padd_ds.models.router import router_weights, routers, set_bias
    from padd_ds.rl.balance import BiasController
    from padd_ds.rl.step import update_on_rollouts

    cfg, engine, rb, targets = x.cfg, x.engine, x.rb, x.targets
    grpo_cfg = dataclasses.replace(cfg, stage3=dataclasses.replace(cfg.stage3, policy="grpo"))
    mod = engine.module
    controller = BiasController(len(routers(mod)), routers(mod)[0].num_experts, cfg.stage4)

    def grpo_step() -> None:
        update_on_rollouts(engine, rb, router_weights(mod), grpo_cfg)

    prev = [router_weights(mod)]

    def padd_step() -> None:
        cur = router_weights(mod)
        res = update_on_rollouts(engine, rb, prev[0], cfg, lambda i: targets)
        controller.update(res.counts, res.adv_sum, res.adv_count)
        set_bias(mod, controller.bias)
        prev[0] = cur

    return {"grpo": grpo_step, "padd": padd_step}


def time_interleaved(fns: dict[str, Callable[[], None]], steps: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, alternating which goes first; the first 2 rounds are warm-up."""
    (a, fa), (b, fb) = fns.items()
    times = {a: [], b: []}
    for i in range(steps + 2):
        for name, fn in ((a, fa), (b, fb)) if i % 2 == 0 else ((b, fb), (a, fa)):
            t0 = time.perf_counter()
            fn()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    args = parse_args()
    init_single_process()
    x = prepare(args)
    times = time_interleaved(step_functions(x), args.steps)
    g, p = statistics.median(times["grpo"]), statistics.median(times["padd"])
    tokens = int(x.rb.rollouts.batch.lengths.sum())
    print(f"rollouts: {x.rb.rollouts.batch.ids.shape[0]} sequences, {tokens} tokens; median step: grpo {g * 1e3:.1f} ms, "
          f"padd {p * 1e3:.1f} ms (n={args.steps} each, interleaved)")
    print(f"STEP_OVERHEAD padd_over_grpo={p / g:.4f}")
    from padd_ds.launch.world import leave

    leave(0)  # skip interpreter teardown (see padd_ds.launch.world)


if __name__ == "__main__":
    main()
