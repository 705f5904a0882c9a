"""Stage I pieces against independent references: the layer map, the teacher's clusters and
streamed per-cluster gate logits, the least-squares router projection, the path KL and the
agreement metric."""

from __future__ import annotations

import pytest
import torch

from padd_ds.launch.bridge import OUT_CLUSTER_ACTS, OUT_CLUSTER_GATE
from padd_ds.models.decompress import decompress
from padd_ds.models.router import RouterFit
from padd_ds.stage1.warmup import path_log_probs
from padd_ds.teacher.clusters import cluster_map_from_provenance, cluster_teacher, layer_map
from padd_ds.stage1.warmup import path_agreement, path_kl
from padd_ds.teacher.service import TeacherModel
from test_decompress import N, TOP_K, make_teacher, tokens


def test_layer_map_is_floor_of_l_times_ratio():
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(2, 5) == [0, 2]
    assert layer_map(48, 28)[:6] == [0, 0, 1, 1, 2, 2] and layer_map(48, 28)[-1] == 27
    assert layer_map(3, 1) == [0, 0, 0]
    with pytest.raises(ValueError):
        layer_map(0, 4)


def test_teacher_clusters_are_the_decompression_clusters():
    """Teacher-side clustering (identity map, same seed) = the clusters decompression built
    the experts from, so p_T's cluster j is expert j of a decompressed student."""
    teacher = make_teacher("qwen3")
    _, prov = decompress(teacher, num_experts=N, top_k=TOP_K, seed=5)
    cmap, records = cluster_teacher(teacher, [0, 1], N, "gate_up", seed=5)
    ref = cluster_map_from_provenance(prov)
    assert ref.layers == cmap.layers == [0, 1]
    assert torch.equal(ref.assignment, cmap.assignment)
    assert [r["teacher_layer"] for r in records] == [0, 1]
    assert all((torch.bincount(a, minlength=N) == a.numel() // N).all() for a in cmap.assignment)


def test_streamed_cluster_gate_is_the_centroid_router_logit():
    """OUT_CLUSTER_GATE = mean gate pre-activation of each cluster = what a router whose row j
    is the mean gate row of cluster j computes (the decompressed student's router)."""
    teacher = make_teacher("qwen3")
    moe, prov = decompress(teacher, num_experts=N, top_k=TOP_K, seed=0)
    tm = TeacherModel(teacher, cluster_map_from_provenance(prov))
    ids = tokens(1)
    out = tm.score(ids, torch.tensor([12, 9]), k=8, outputs=OUT_CLUSTER_GATE | OUT_CLUSTER_ACTS)
    assert out.cluster_gate.shape == (2, 12, 2, N) and out.cluster_acts.shape == (2, 12, 2, N)
    # The MLP input of each layer, captured by a hook (what gate_proj and a router see).
    seen = {}
    hooks = [teacher.model.layers[l].mlp.register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0]))
             for l in range(2)]
    with torch.no_grad():
        teacher(ids, attention_mask=(torch.arange(12) < torch.tensor([[12], [9]])).long())
    for h in hooks:
        h.remove()
    for l in range(2):
        want = seen[l] @ moe.model.layers[l].mlp.gate.weight.T
        torch.testing.assert_close(out.cluster_gate[:, :, l], want, atol=1e-5, rtol=1e-5)


def test_router_fit_is_the_least_squares_projection_of_the_centroids():
    """min_W ||X_S W - X_T C|| (what we accumulate) = M C with M = lstsq(X_S, X_T) (the map
    the method describes), across different hidden sizes; and it is exact for linear data."""
    g = torch.Generator().manual_seed(0)
    T, HS, HT, E = 4000, 12, 20, 6
    xs = torch.randn(T, HS, generator=g, dtype=torch.float64)
    xt = xs @ torch.randn(HS, HT, generator=g, dtype=torch.float64) + 0.1 * torch.randn(T, HT, generator=g, dtype=torch.float64)
    c = torch.randn(HT, E, generator=g, dtype=torch.float64)  # centroids as columns
    fit = RouterFit(1, HS, E, ridge=0.0)
    for chunk in range(4):  # accumulated over batches
        sl = slice(chunk * 1000, (chunk + 1) * 1000)
        fit.add(0, xs[sl].float(), (xt[sl] @ c).float())
    (w,) = fit.solve()
    m = torch.linalg.lstsq(xs, xt).solution
    torch.testing.assert_close(w.double(), (m @ c).T, atol=1e-4, rtol=1e-4)
    # With the ridge on, the fit is still close (it only regularises).
    fit.ridge = 1e-3
    torch.testing.assert_close(fit.solve()[0].double(), (m @ c).T, atol=2e-2, rtol=2e-2)


def test_path_kl_and_agreement_against_hand_computation():
    p_s = [torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])]  # 1 layer, 3 tokens
    acts = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]]).reshape(1, 3, 1, 3)
    log_pt = path_log_probs(acts, xi=1.0)
    valid = torch.tensor([[True, True, False]])  # the third token is padding
    want = 0.0
    for t in range(2):
        pt = torch.softmax(acts[0, t, 0], -1)
        want += float((p_s[0][t] * (p_s[0][t] / pt).log()).sum())
    assert float(path_kl(p_s, log_pt, valid, denom=2.0)) == pytest.approx(want / 2, rel=1e-6)
    a = path_agreement(p_s, log_pt, valid, top_k=2)
    # token 0: argmax 0 vs 0 (agree); token 1: argmax 2 vs 1 (disagree).
    assert a["tokens"] == 2 and a["top1"] == 1
    s_sets = [set(p_s[0][t].topk(2).indices.tolist()) for t in range(2)]
    t_sets = [set(log_pt[0, t, 0].topk(2).indices.tolist()) for t in range(2)]
    assert a["topk"] == pytest.approx(sum(len(s & t) for s, t in zip(s_sets, t_sets)) / 2)
    # xi scales the teacher's sharpness: a larger xi gives a flatter p_T.
    assert path_log_probs(acts, 10.0)[0, 2, 0].exp().max() < log_pt[0, 2, 0].exp().max()
