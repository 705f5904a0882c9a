"""Decompression: a dense teacher becomes a native transformers MoE that, with every expert
on at weight 1, computes exactly what the teacher computes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from padd_ds.models.decompress import PROVENANCE_FILE, decompress, save_decompressed

H, D_FF, LAYERS, VOCAB, N, TOP_K = 64, 128, 2, 97, 8, 2
# Larger than HF's 0.02 so activations are O(1) and a 1e-5 tolerance means something.
INIT_STD = 0.15


def _shape(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=D_FF, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, initializer_range=INIT_STD,
                max_position_embeddings=64, **extra)


def make_teacher(kind: str, **extra) -> transformers.PreTrainedModel:
    torch.manual_seed({"qwen3": 0, "llama": 1, "mistral": 2}[kind])
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**_shape(head_dim=16, tie_word_embeddings=True, **extra)))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_shape(tie_word_embeddings=False, **extra)))
    else:
        model = MistralForCausalLM(MistralConfig(**_shape(sliding_window=8, **extra)))
    with torch.no_grad():  # norms start at 1: give them some spread so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.config._name_or_path = f"tiny-{kind}-teacher"
    return model.eval()


@pytest.fixture(scope="module", params=["qwen3", "llama", "mistral"])
def built(request):
    teacher = make_teacher(request.param)
    moe, prov = decompress(teacher, num_experts=N, top_k=TOP_K, seed=0)
    return request.param, teacher, moe, prov


@pytest.fixture
def all_experts_on(monkeypatch):
    """Replace the HF routers' forward so every token goes to every expert at weight 1."""

    def route_all(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        t = hidden_states.shape[0]
        return logits, torch.ones(t, self.num_experts, dtype=hidden_states.dtype), \
            torch.arange(self.num_experts).expand(t, -1)

    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    monkeypatch.setattr(Qwen3MoeTopKRouter, "forward", route_all)
    monkeypatch.setattr(MixtralTopKRouter, "forward", route_all)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_maps_to_the_native_moe_config(built):
    kind, teacher, moe, _ = built
    c = moe.config
    if kind == "qwen3":
        assert type(moe).__name__ == "Qwen3MoeForCausalLM"
        assert (c.num_experts, c.moe_intermediate_size, c.num_experts_per_tok) == (N, D_FF // N, TOP_K)
        assert c.decoder_sparse_step == 1 and c.mlp_only_layers == [] and c.norm_topk_prob is True
        assert c.head_dim == teacher.config.head_dim
    else:
        assert type(moe).__name__ == "MixtralForCausalLM"
        assert (c.num_local_experts, c.intermediate_size, c.num_experts_per_tok) == (N, D_FF // N, TOP_K)
        assert c.sliding_window == getattr(teacher.config, "sliding_window", None)
    assert c.tie_word_embeddings == teacher.config.tie_word_embeddings
    assert c.padd_decompressed_from == f"tiny-{kind}-teacher"
    for layer in moe.model.layers:
        e = layer.mlp.experts
        assert tuple(e.gate_up_proj.shape) == (N, 2 * D_FF // N, H) and tuple(e.down_proj.shape) == (N, H, D_FF // N)


def test_non_ffn_weights_are_copied_exactly(built):
    _, teacher, moe, _ = built
    t_params = dict(teacher.named_parameters())
    checked = 0
    for name, p in moe.named_parameters():
        if ".mlp." not in name:
            assert torch.equal(p, t_params[name]), name
            checked += 1
    assert checked == len([n for n in t_params if ".mlp." not in n])
    tied = moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    assert tied == teacher.config.tie_word_embeddings
    assert torch.equal(moe.lm_head.weight, teacher.lm_head.weight)


def test_experts_all_on_reproduce_each_dense_ffn(built):
    _, teacher, moe, _ = built
    h = torch.randn(24, H, generator=torch.Generator().manual_seed(5))
    every = torch.arange(N).expand(24, -1)
    for t_layer, m_layer in zip(teacher.model.layers, moe.model.layers):
        with torch.no_grad():
            dense = t_layer.mlp(h)
            sparse = m_layer.mlp.experts(h, every, torch.ones(24, N))
            partial = m_layer.mlp.experts(h, every[:, :TOP_K], torch.ones(24, TOP_K))
        assert dense.abs().mean() > 0.05  # the tolerance below is meaningful
        assert (sparse - dense).abs().max() <= 1e-5
        assert (partial - dense).abs().max() > 1e-2  # a subset of experts is not the whole FFN


def test_whole_model_logits_match_with_every_expert_on(built, all_experts_on):
    _, teacher, moe, _ = built
    ids = tokens()
    with torch.no_grad():
        want, got = teacher(ids).logits, moe(ids).logits
    assert want.abs().mean() > 0.1
    assert (got - want).abs().max() <= 1e-5


def test_provenance_covers_every_neuron_once_and_matches_weights(built):
    kind, teacher, moe, prov = built
    assert prov["teacher"] == f"tiny-{kind}-teacher" and prov["num_experts"] == N and prov["top_k"] == TOP_K
    assert len(prov["layers"]) == LAYERS
    for li, layer in enumerate(prov["layers"]):
        assert layer["teacher_layer"] == li
        experts = layer["experts"]
        assert [e["expert"] for e in experts] == list(range(N))
        assert all(e["teacher_layer"] == li and len(e["neurons"]) == D_FF // N for e in experts)
        assert sorted(n for e in experts for n in e["neurons"]) == list(range(D_FF))
        dense, fused = teacher.model.layers[li].mlp, moe.model.layers[li].mlp.experts
        for e in experts:
            ids, j, i = e["neurons"], e["expert"], D_FF // N
            assert torch.equal(fused.gate_up_proj[j, :i], dense.gate_proj.weight[ids])
            assert torch.equal(fused.gate_up_proj[j, i:], dense.up_proj.weight[ids])
            assert torch.equal(fused.down_proj[j], dense.down_proj.weight[:, ids])


def test_centroid_router_logit_is_mean_gate_preactivation(built):
    _, teacher, moe, prov = built
    h = torch.randn(10, H, generator=torch.Generator().manual_seed(9))
    for li, layer in enumerate(prov["layers"]):
        gate_pre = h @ teacher.model.layers[li].mlp.gate_proj.weight.T  # [10, d_ff]
        want = torch.stack([gate_pre[:, e["neurons"]].mean(-1) for e in layer["experts"]], dim=-1)
        with torch.no_grad():
            logits = moe.model.layers[li].mlp.gate(h)[0]
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cluster_input", ["gate", "up"])
def test_other_cluster_inputs_and_zero_router(cluster_input, all_experts_on):
    teacher = make_teacher("qwen3")
    moe, prov = decompress(teacher, num_experts=4, top_k=1, cluster_input=cluster_input, router_init="zeros")
    assert prov["cluster_input"] == cluster_input
    assert all(torch.count_nonzero(layer.mlp.gate.weight) == 0 for layer in moe.model.layers)
    ids = tokens(1)
    with torch.no_grad():
        assert (moe(ids).logits - teacher(ids).logits).abs().max() <= 1e-5


def test_same_seed_same_split():
    teacher = make_teacher("llama")
    a = decompress(teacher, N, TOP_K, seed=3)[1]
    b = decompress(teacher, N, TOP_K, seed=3)[1]
    assert a["layers"] == b["layers"]


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_save_and_reload_without_remote_code(kind, tmp_path):
    teacher = make_teacher(kind)
    moe, prov = decompress(teacher, num_experts=N, top_k=TOP_K)
    out = save_decompressed(moe, prov, tmp_path / "moe")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and PROVENANCE_FILE in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(moe)
    assert loaded.config.padd_decompressed_from == f"tiny-{kind}-teacher"
    assert loaded.config.padd_decompression["num_experts"] == N
    ids = tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, moe(ids).logits, atol=0, rtol=0)

    saved = json.loads((out / PROVENANCE_FILE).read_text())
    assert saved == json.loads(json.dumps(prov))
    for layer in saved["layers"]:
        neurons = [n for e in layer["experts"] for n in e["neurons"]]
        assert sorted(neurons) == list(range(D_FF))  # every neuron exactly once per layer


def test_unsupported_architecture_is_refused():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel .* not supported; supported: Qwen3ForCausalLM"):
        decompress(gpt2, num_experts=2, top_k=1)
    bare = make_teacher("qwen3").model  # a Qwen3Model without lm_head
    with pytest.raises(ValueError, match="not supported"):
        decompress(bare, num_experts=2, top_k=1)


def test_bad_expert_counts_are_refused():
    teacher = make_teacher("qwen3")
    with pytest.raises(ValueError, match=r"d_ff=128 is not divisible by N=3.*divides the FFN width"):
        decompress(teacher, num_experts=3, top_k=1)
    with pytest.raises(ValueError, match=r"top_k=9 is larger than num_experts=8"):
        decompress(teacher, num_experts=8, top_k=9)
    with pytest.raises(ValueError, match="num_experts must be an integer >= 1"):
        decompress(teacher, num_experts=0, top_k=1)
    with pytest.raises(ValueError, match="router_init must be one of centroids, zeros"):
        decompress(teacher, num_experts=8, top_k=2, router_init="random")
    with pytest.raises(ValueError, match="cluster_input must be one of gate_up, gate, up"):
        decompress(teacher, num_experts=8, top_k=2, cluster_input="down")


def test_teacher_features_moe_cannot_express_are_refused():
    with pytest.raises(ValueError, match="mlp_bias=True but Mixtral has no such biases"):
        decompress(make_teacher("llama", mlp_bias=True), num_experts=8, top_k=2)
    mixed = make_teacher("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ValueError, match="sliding-window attention on 1 of 2 layers"):
        decompress(mixed, num_experts=8, top_k=2)
