"""Run by test_router.py under 1 or 2 ranks: router-weight gradients of a loss that reaches the
PADD router both through the model output (LM) and through its recorded probabilities."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main(out_path: str) -> None:
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.utils import safe_get_full_grad

    from padd_ds.models.decompress import decompress
    from padd_ds.models.router import padd_router_installed, router_scores, routers, set_routing
    from test_decompress import N, TOP_K, VOCAB, make_teacher

    deepspeed.init_distributed(dist_backend="gloo")

    from padd_ds.launch.world import leave, release_shm_names

    release_shm_names()
    rank, world = dist.get_rank(), dist.get_world_size()
    moe, _ = decompress(make_teacher("qwen3"), num_experts=N, top_k=TOP_K, seed=0, expert_scale=float(N))
    moe.train()
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(7))
    target = torch.softmax(torch.randn(4 * 12, N, generator=torch.Generator().manual_seed(8)), -1)
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    ds = {"train_micro_batch_size_per_gpu": 4 // world, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "expert_parallel": {"enabled": True, "autoep_size": world, "preset_model": "qwen3_moe",
                              "use_grouped_mm": False}}
    with padd_router_installed():
        engine = deepspeed.initialize(model=moe, model_parameters=list(moe.parameters()), config=ds)[0]
    set_routing(engine.module, "learned", record=True)
    x = ids[rows]
    logits = engine(input_ids=x).logits
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum")
    tgt = target.view(4, 12, N)[rows].reshape(-1, N)
    path = sum((p * (p.clamp(min=1e-9).log() - tgt.log())).sum() for p in router_scores(engine.module))
    # Per-rank sums over the global count x ranks: DeepSpeed's gradient average is then the global mean.
    loss = (lm / (4 * 11) + 0.5 * path / (4 * 12)) * world
    engine.backward(loss)
    grads = [safe_get_full_grad(r.gate.weight).tolist() for r in routers(engine.module)]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(grads, f)
    leave(0, barrier=True)


if __name__ == "__main__":
    main(sys.argv[-1])  # the DeepSpeed launcher puts --local_rank=N first
