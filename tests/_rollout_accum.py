"""Run as a 2-rank DeepSpeed job by test_rollout_batch.py: `update_on_rollouts` on a fixed
rollout batch of 8 sequences per rank, on the toy student under ZeRO-3 + AutoEP (EP 2), with
the Stage II KD term against the real toy teacher (a LocalTeacher, one request per
micro-batch) and the non-finite guard, as the trainer runs it.

For each stage3.updates_per_batch in (1, 2) the same batch is trained once as one micro-batch
of 8 and once as 4 micro-batches of 2 (gradient accumulation 4). Both start from the same
weights; each rank writes each run's final weights (its view: ZeRO-3 partitions gathered, its
own experts), Stage IV statistics and loss sums to OUT.<rank>.

The optimiser is plain SGD without gradient clipping: its step is linear in the gradient, so
a micro-batch loss divided once too often by the accumulation steps shows in the weights
(AdamW's first steps hardly depend on the gradient's scale, and a clipped gradient neither).
"""

import json
import os
import sys

import torch

PROMPTS_PER_RANK, G = 2, 4
ROWS = PROMPTS_PER_RANK * G


def rollout_batch(rank: int, vocab: int):
    """8 hand-built rollouts of this rank: prompt + response ids, the loss mask on the
    response, group advantages. Fixed by the rank alone, so every run sees the same data."""
    from padd_ds.data.batch import TokenBatch
    from padd_ds.rl.rollout import RolloutBatch, Rollouts

    gen = torch.Generator().manual_seed(100 + rank)
    prompt_len = torch.tensor([6, 9]).repeat_interleave(G)                       # one prompt per group
    resp_len = torch.randint(3, 14, (ROWS,), generator=gen)
    lengths = prompt_len + resp_len
    L = int(lengths.max())
    ids = torch.randint(5, vocab, (ROWS, L), generator=gen)
    loss_mask = torch.zeros(ROWS, L, dtype=torch.bool)
    for i in range(ROWS):
        ids[i, int(lengths[i]):] = 0                                             # right padding
        loss_mask[i, int(prompt_len[i]) - 1:int(lengths[i]) - 1] = True          # t predicts response token t+1
    rewards = torch.randint(0, 2, (PROMPTS_PER_RANK, G), generator=gen).float()
    rewards[0, 0], rewards[0, 1] = 1.0, 0.0                                      # no zero-variance group
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    ro = Rollouts(TokenBatch(ids, lengths, loss_mask), [""] * ROWS, torch.arange(PROMPTS_PER_RANK).repeat_interleave(G),
                  resp_len, torch.ones(ROWS, dtype=torch.bool))
    return RolloutBatch(ro, rewards, adv.reshape(-1))


def config(mbs: int, updates: int, ds_json: str, router_lr_scale: float = 1.0):
    from padd_ds.recipe import load_config
    from padd_ds.toy.resolve import use_toy_build_for

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(repo, "recipes", "toy_cpu.yaml"),
                      ["train.mode=padd", f"train.micro_batch_size={mbs}", "train.lr=0.05",
                       f"stage3.prompts_per_step={2 * PROMPTS_PER_RANK}", f"stage3.group_size={G}",
                       f"stage3.updates_per_batch={updates}", f"deepspeed.config={ds_json}",
                       f"train.router_lr_scale={router_lr_scale}"])
    use_toy_build_for(cfg)
    return cfg


def run(mbs: int, updates: int, ds_json: str, rank: int, router_lr_scale: float = 1.0) -> dict:
    from padd_ds.data.batch import micro_batches
    from padd_ds.engine.build import initialize_engine
    from padd_ds.engine.guard import NonFiniteGuard
    from padd_ds.models.files import model_paths
    from padd_ds.models.loading import load_causal_lm
    from padd_ds.models.router import router_weights
    from padd_ds.rl.step import update_on_rollouts
    from padd_ds.teacher.service import LocalTeacher, TeacherModel

    cfg = config(mbs, updates, ds_json, router_lr_scale)
    teacher_path, student_path, _ = model_paths(cfg)
    engine, _ = initialize_engine(cfg, load_causal_lm(student_path, "float32"), 2)
    assert engine.gradient_accumulation_steps() == ROWS // mbs
    teacher = LocalTeacher(TeacherModel(load_causal_lm(teacher_path, "float32")), cfg.teacher.logits_top_k)
    rb = rollout_batch(rank, engine.module.config.vocab_size)
    rb.requests = [teacher.submit(0, mb.ids, mb.lengths) for mb in micro_batches(rb.rollouts.batch, mbs)]
    # Routers moved away from the current ones: the drift term damps the negative-advantage tokens.
    prev = [w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(7 + l))
            for l, w in enumerate(router_weights(engine.module))]
    before = gathered(engine)
    res = update_on_rollouts(engine, rb, prev, cfg, lambda i: teacher.result(rb.requests[i]).logits,
                             NonFiniteGuard(3), step=0)
    after = gathered(engine)
    return {"weights": after.tolist(), "before": before.tolist(), "router": router_mask(engine).tolist(),
            "group_lrs": [g["lr"] for g in engine.optimizer.param_groups], "moved": float((after - before).abs().max()), "global_steps": engine.global_steps,
            "counts": res.counts.tolist(), "adv_sum": res.adv_sum.tolist(), "drift_sum": float(res.drift.sum()),
            "drift_n": res.drift.numel(), "stats": res.stats, "pending": len(teacher.pending)}


def gathered(engine) -> torch.Tensor:
    """This rank's view of every parameter (ZeRO-3 partitions gathered; its local experts), flat."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().clone().reshape(-1) for p in params])


def router_mask(engine) -> torch.Tensor:
    """Which entries of `gathered` are router weights (AutoEP's name for them)."""
    import deepspeed

    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return torch.cat([torch.full((p.numel(),), ".router.gate." in n) for n, p in named])


def main(out_path: str) -> None:
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo")
    from padd_ds.launch.world import leave, release_shm_names

    release_shm_names()
    rank = dist.get_rank()
    ds_json = os.path.join(os.path.dirname(out_path), "zero3_sgd.json")
    out = {"rank": rank}
    for updates in (1, 2):
        for mbs in (ROWS, 2):
            out[f"u{updates}_mbs{mbs}"] = run(mbs, updates, ds_json, rank)
    out["u1_mbs8_router10"] = run(ROWS, 1, ds_json, rank, router_lr_scale=10.0)
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(out, f)
    leave(0, barrier=True)


if __name__ == "__main__":
    main(sys.argv[-1])  # the DeepSpeed launcher puts --local_rank=N first
