"""Run as a 1-rank DeepSpeed job by test_export_routing.py: a tiny MoE student of one
architecture in ZeRO-3 + AutoEP with the PADD router, exported to a native transformers
checkpoint with a zero and with a non-zero Stage IV bias."""

import json
import os
import sys
import tempfile

import torch

ARCHS = {  # test name -> (model_type, extra config)
    "qwen3_moe": ("qwen3_moe", {"num_experts": 8, "head_dim": 16, "norm_topk_prob": True}),
    "mixtral": ("mixtral", {"num_local_experts": 8}),
    "deepseek_v2": ("deepseek_v2", {}),
    "deepseek_v2_grouped": ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                            "routed_scaling_factor": 1.5}),
    "deepseek_v3": ("deepseek_v3", {}),
}


def tiny(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, extra = ARCHS[name]
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, num_experts_per_tok=2, max_position_embeddings=128)
    if arch.startswith("deepseek"):
        kw.update(n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)
    hf = AutoConfig.for_model(arch, **{**kw, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf).float()
    for n, buf in model.named_buffers():  # a non-trivial V3 selection bias of its own
        if n.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn_like(buf) * 0.05)
    return model


def hf_routes(hf, ids):
    """Logits and each MoE layer's chosen experts [T, k] of a transformers model."""
    chosen = []
    # transformers' routers return (logits, top-k weights, top-k indices)
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: chosen.append(o[2])) for layer in hf.model.layers]
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
    for h in hooks:
        h.remove()
    return logits, [c.reshape(-1, c.shape[-1]) for c in chosen]


def compare(out: dict, tag: str, hf, ids, ref) -> None:
    from padd_ds.data.batch import TokenBatch
    from padd_ds.models.export import routing_fidelity

    logits, chosen = hf_routes(hf, ids)
    batch = TokenBatch(ids=ids, lengths=torch.full((ids.shape[0],), ids.shape[1]),
                       loss_mask=torch.zeros_like(ids, dtype=torch.bool))
    out[f"{tag}_fidelity_fn"] = routing_fidelity(hf, [batch], [ref[1:]])  # the trainer's measure
    out[f"{tag}_logit_diff"] = (logits - ref[0]).abs().max().item()
    same = [(c.sort(-1).values == r.sort(-1).values).all(-1) for c, r in zip(chosen, ref[1:])]
    out[f"{tag}_same_routes"] = all(bool(s.all()) for s in same)
    out[f"{tag}_route_fidelity"] = torch.cat(same).float().mean().item()


def main() -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM

    from padd_ds.data.batch import TokenBatch
    from padd_ds.launch.world import leave, release_shm_names
    from padd_ds.models.arch import autoep_preset
    from padd_ds.models.export import EXACT_ROUTING_FILE, export_engine, fold_router_bias, has_bias_slot, load_exact_routing
    from padd_ds.models.router import padd_router_installed, router_selected, routers, set_bias, set_routing

    name = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    release_shm_names()
    model = tiny(name)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    fit = [TokenBatch(ids=torch.randint(0, 256, (8, 20), generator=torch.Generator().manual_seed(3 + i)),
                      lengths=torch.full((8,), 20), loss_mask=torch.zeros(8, 20, dtype=torch.bool)) for i in range(2)]
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "expert_parallel": {"enabled": True, "autoep_size": 1, "preset_model": autoep_preset(model.config.model_type),
                              "use_grouped_mm": False}}
    with padd_router_installed():
        engine = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)[0]
    engine.eval()
    L, N = len(routers(engine.module)), routers(engine.module)[0].num_experts
    bias = torch.randn(L, N, generator=torch.Generator().manual_seed(2)) * 0.2  # moves many routes
    out = {"slot": has_bias_slot(engine.module)}
    with torch.no_grad():
        set_routing(engine.module, "learned", record=True)
        plain = [s.clone() for s in (engine(input_ids=ids).logits, *router_selected(engine.module))]
        set_bias(engine.module, bias)
        biased = [s.clone() for s in (engine(input_ids=ids).logits, *router_selected(engine.module))]
    out["bias_moves_routes"] = any(not torch.equal(a.sort(-1).values, b.sort(-1).values)
                                   for a, b in zip(plain[1:], biased[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        set_bias(engine.module, torch.zeros(L, N))
        export_engine(engine, f"{tmp}/zero")
        set_bias(engine.module, bias)
        # No slot: fold the bias into the router weights, as the trainer does.
        folded = None if out["slot"] else fold_router_bias(engine, fit)[0]
        export_engine(engine, f"{tmp}/biased", router_weights=folded)
        out["routing_file"] = os.path.exists(f"{tmp}/biased/{EXACT_ROUTING_FILE}")
        out["zero_routing_file"] = os.path.exists(f"{tmp}/zero/{EXACT_ROUTING_FILE}")
        load = lambda tag: AutoModelForCausalLM.from_pretrained(f"{tmp}/{tag}", dtype=torch.float32)
        compare(out, "zero", load("zero"), ids, plain)
        compare(out, "biased", load("biased"), ids, biased)
        # The routing file restores the engine's routes in a plain transformers model.
        compare(out, "exact", load_exact_routing(load("biased"), f"{tmp}/biased"), ids, biased)
    print("RESULT " + json.dumps(out), flush=True)
    leave(0)


if __name__ == "__main__":
    main()
