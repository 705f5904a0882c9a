"""Run as a 1-rank DeepSpeed job by test_router.py: the PADD router inside ZeRO-3 + AutoEP."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    import deepspeed

    from padd_ds.models.decompress import decompress
    from padd_ds.models.router import moe_layers, router_scores, routers, set_routing, padd_router_installed
    from test_decompress import N, TOP_K, make_teacher, tokens

    deepspeed.init_distributed(dist_backend="gloo")

    from padd_ds.launch.world import leave, release_shm_names

    release_shm_names()
    teacher = make_teacher("qwen3")
    moe, _ = decompress(teacher, num_experts=N, top_k=TOP_K, seed=0, expert_scale=float(N))
    ids = tokens(3)
    with torch.no_grad():
        hf_logits = moe(ids).logits.clone()  # HF's own top-k routing
        teacher_logits = teacher(ids).logits
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "expert_parallel": {"enabled": True, "autoep_size": 1, "preset_model": "qwen3_moe", "use_grouped_mm": False}}
    with padd_router_installed():
        engine = deepspeed.initialize(model=moe, model_parameters=list(moe.parameters()), config=ds)[0]
    from deepspeed.module_inject import auto_ep_layer
    from deepspeed.moe.ep_router import TokenChoiceTopKRouter

    out = {"restored": auto_ep_layer.TokenChoiceTopKRouter is TokenChoiceTopKRouter,
           "n_routers": len(routers(engine.module))}
    engine.eval()
    with torch.no_grad():
        out["learned_vs_hf"] = (engine(input_ids=ids).logits - hf_logits).abs().max().item()
        set_routing(engine.module, "uniform_all", record=True)
        out["uniform_all_vs_teacher"] = (engine(input_ids=ids).logits - teacher_logits).abs().max().item()
        scores = router_scores(engine.module)
        out["scores_rows_sum_to_1"] = all(torch.allclose(s.sum(-1), torch.ones(s.shape[0])) for s in scores)
        set_routing(engine.module, "uniform_random_topk", seed=1)
        r = routers(engine.module)[0]
        x = torch.randn(50, moe.config.hidden_size)
        top, sel, counts = r(x)
        out["random_topk_distinct"] = all(len(set(row)) == TOP_K for row in sel.tolist())
        out["random_topk_weights"] = top.unique().tolist()
        out["random_topk_counts"] = int(counts.sum())
        out["layer_top_k"] = [l.top_k for l in moe_layers(engine.module)]
        set_routing(engine.module, "learned", record=False)
        out["layer_top_k_after"] = [l.top_k for l in moe_layers(engine.module)]
        out["learned_again_vs_hf"] = (engine(input_ids=ids).logits - hf_logits).abs().max().item()
        # Stage IV's bias changes which experts are chosen, not their weights' source.
        r.padd_bias.copy_(torch.tensor([10.0] + [0.0] * (N - 1)))
        _, sel_b, _ = r(x)
        out["bias_forces_expert0"] = bool((sel_b == 0).any(-1).all())
    print("RESULT " + json.dumps(out), flush=True)
    leave(0, barrier=True)


if __name__ == "__main__":
    main()
