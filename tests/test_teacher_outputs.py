"""Cluster activations and hidden states from the teacher, against an independent reference."""

import torch

from padd_ds.launch.bridge import OUT_CLUSTER_ACTS, OUT_HIDDEN
from padd_ds.teacher.clusters import ClusterMap
from padd_ds.teacher.service import TeacherModel


def tiny_teacher():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return Qwen3ForCausalLM(cfg).eval()


def cluster_map(seed=0, layers=(0, 2), n=8, d_ff=64):
    g = torch.Generator().manual_seed(seed)
    assignment = torch.stack([torch.randperm(d_ff, generator=g) % n for _ in layers])
    return ClusterMap(list(layers), assignment, n)


def test_cluster_activations_and_hidden_match_reference():
    model, cmap = tiny_teacher(), cluster_map()
    ids = torch.randint(0, 211, (2, 7), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([7, 5])
    out = TeacherModel(model, cmap).score(ids, lengths, 8, outputs=OUT_CLUSTER_ACTS | OUT_HIDDEN)

    captured = {}
    hooks = [model.model.layers[l].mlp.register_forward_pre_hook(lambda m, a, l=l: captured.__setitem__(l, a[0]))
             for l in cmap.layers]
    mask = (torch.arange(7).unsqueeze(0) < lengths.unsqueeze(1)).long()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for h in hooks:
        h.remove()
    assert out.cluster_acts.shape == (2, 7, 2, 8)
    for i, l in enumerate(cmap.layers):
        mlp = model.model.layers[l].mlp
        x = captured[l]
        neuron = mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)   # [B, L, d_ff]
        for c in range(8):
            expect = neuron[..., cmap.assignment[i] == c].mean(-1)
            torch.testing.assert_close(out.cluster_acts[:, :, i, c], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden, ref.hidden_states[-1], atol=1e-6, rtol=1e-6)
    real = mask.bool()  # the head runs on real positions only (padding rows carry a filler)
    torch.testing.assert_close(out.logits.lse[real], torch.logsumexp(ref.logits, -1)[real], atol=1e-5, rtol=1e-5)


def test_no_cluster_map_is_a_clear_error():
    import pytest

    from padd_ds.launch.bridge import BridgeError

    with pytest.raises(BridgeError, match="no cluster map"):
        TeacherModel(tiny_teacher()).score(torch.ones(1, 3, dtype=torch.long), torch.tensor([3]), 4,
                                           outputs=OUT_CLUSTER_ACTS)
