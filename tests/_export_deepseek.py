"""Run as a 1-rank DeepSpeed job by test_export_deepseek.py: a tiny DeepSeek-V2 / V3 student
in ZeRO-3 + AutoEP with the PADD router, exported to a native transformers checkpoint."""

import json
import os
import sys
import tempfile

import torch


def tiny(arch: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(arch, vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                              num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                              max_position_embeddings=128, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                              qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf).float()
    for name, buf in model.named_buffers():  # a non-trivial V3 selection bias of its own
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn_like(buf) * 0.05)
    return model


def main() -> None:
    import deepspeed

    from padd_ds.launch.world import release_shm_names
    from padd_ds.models.export import export_engine, has_bias_slot
    from padd_ds.models.loading import autoep_preset
    from padd_ds.models.router import padd_router_installed, router_selected, routers, set_bias, set_routing
    from transformers import AutoModelForCausalLM

    arch = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    release_shm_names()
    model = tiny(arch)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "expert_parallel": {"enabled": True, "autoep_size": 1, "preset_model": autoep_preset(model.config),
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
        export_engine(engine, f"{tmp}/biased")
        for tag, ref in (("zero", plain), ("biased", biased)) if out["slot"] else (("zero", plain),):
            hf = AutoModelForCausalLM.from_pretrained(f"{tmp}/{tag}", dtype=torch.float32)
            chosen = []
            # transformers' DeepSeek gates return (logits, top-k weights, top-k indices)
            hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: chosen.append(o[2]))
                     for layer in hf.model.layers]
            with torch.no_grad():
                logits = hf(input_ids=ids).logits
            for h in hooks:
                h.remove()
            out[f"{tag}_logit_diff"] = (logits - ref[0]).abs().max().item()
            out[f"{tag}_same_routes"] = all(torch.equal(c.reshape(-1, c.shape[-1]).sort(-1).values, r.sort(-1).values)
                                            for c, r in zip(chosen, ref[1:]))
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
