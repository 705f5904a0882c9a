"""Run by test_router.py on 2 ranks: router weights written into a bf16 ZeRO-3 + AutoEP engine
(Stage I's router init, the Stage IV fold) must survive optimizer steps. bf16 keeps an fp32
master copy that the optimizer copies back into the model after every step."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from padd_ds.launch.world import leave, release_shm_names
    from padd_ds.models.decompress import decompress
    from padd_ds.models.router import padd_router_installed, router_weights, routers
    from padd_ds.models.router import write_router_weights
    from test_decompress import N, TOP_K, VOCAB, make_teacher

    deepspeed.init_distributed(dist_backend="gloo")
    release_shm_names()
    world = deepspeed.comm.get_world_size()
    moe, _ = decompress(make_teacher("qwen3"), num_experts=N, top_k=TOP_K, seed=0, expert_scale=float(N))
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}},  # steps that change nothing
          "expert_parallel": {"enabled": True, "autoep_size": world, "preset_model": "qwen3_moe",
                              "use_grouped_mm": False}}
    with padd_router_installed():
        engine = deepspeed.initialize(model=moe, model_parameters=list(moe.parameters()), config=ds)[0]
    g = torch.Generator().manual_seed(5)
    new = [torch.randn(w.shape, generator=g) for w in router_weights(engine.module)]
    write_router_weights(engine.module, new)
    out = {"dtype": str(next(engine.module.parameters()).dtype)}

    def same(ws):
        return all(torch.equal(a, n.to(torch.bfloat16).float()) for a, n in zip(ws, new))

    out["after_write"] = same(router_weights(engine.module))
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    for _ in range(2):
        engine.backward(engine(input_ids=ids).logits.float().mean())
        engine.step()
    out["after_steps"] = same(router_weights(engine.module))
    out["master"] = all(torch.allclose(safe_get_full_fp32_param(r.gate.weight).float(), n)
                        for r, n in zip(routers(engine.module), new))
    if deepspeed.comm.get_rank() == 0:  # both ranks see the full (gathered) weights; one line of output
        print("RESULT " + json.dumps(out), flush=True)
    leave(0, barrier=True)


if __name__ == "__main__":
    main()
