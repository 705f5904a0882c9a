"""Routing analysis: load statistics, NMI and drift against hand-computed values, and the router
outputs of a real HF MoE checked against the router modules themselves."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from padd_ds.data.math import load_problems
from padd_ds.eval.routing import (RoutingLog, collect_routing, drift_summary, expert_counts, expert_provenance,
                                  layer_load_stats, normalized_mutual_information, router_drift, routing_metrics,
                                  routing_text, subject_contingency, summarize)


def test_layer_load_stats_hand_computed():
    even = layer_load_stats([2, 2, 2, 2])
    assert even["cv"] == 0 and even["entropy"] == pytest.approx(1.0) and even["max_over_mean"] == 1.0
    one = layer_load_stats(torch.tensor([4, 0, 0, 0]))
    # mean 1, population variance (9 + 1 + 1 + 1) / 4 = 3
    assert one["cv"] == pytest.approx(math.sqrt(3)) and one["entropy"] == 0.0
    assert one["max_over_mean"] == 4.0 and one["min_over_mean"] == 0.0 and one["fraction"] == [1.0, 0, 0, 0]
    half = layer_load_stats([1, 1, 0, 0])  # two of four experts used evenly: entropy log2 / log4
    assert half["entropy"] == pytest.approx(0.5)
    assert layer_load_stats([0, 0])["cv"] is None
    with pytest.raises(ValueError):
        layer_load_stats([1, -1])


def test_counts_and_contingency_hand_computed():
    selected = torch.tensor([[0, 1], [1, 2], [0, 2]])  # 3 tokens, top-2 of 3 experts
    assert expert_counts(selected, 4).tolist() == [2, 2, 2, 0]
    table = subject_contingency(selected, torch.tensor([0, 1, -1]), num_subjects=2, num_experts=3)
    assert table.tolist() == [[1, 1, 0], [0, 1, 1]]  # the subject-less token is left out


def _nmi_from_labels(a, b) -> float:
    """Independent reference: NMI = 2 (H_a + H_b - H_ab) / (H_a + H_b) from label counts."""
    def h(xs):
        n = len(xs)
        return -sum(c / n * math.log(c / n) for c in Counter(xs).values())
    ha, hb = h(a), h(b)
    return 2 * (ha + hb - h(list(zip(a, b)))) / (ha + hb)


def test_nmi_hand_computed_and_against_a_reference():
    assert normalized_mutual_information(np.array([[5, 0], [0, 5]])) == pytest.approx(1.0)
    assert normalized_mutual_information(np.array([[2, 2], [2, 2]])) == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_information(np.array([[3, 1]])) == 0.0  # one subject: no information
    rng = np.random.default_rng(0)
    subj = rng.integers(0, 7, 3000)
    expert = (subj + rng.integers(0, 3, 3000)) % 8  # partly determined by the subject
    table = np.zeros((7, 8))
    np.add.at(table, (subj, expert), 1)
    ours = normalized_mutual_information(table)
    assert ours == pytest.approx(_nmi_from_labels(subj.tolist(), expert.tolist()), rel=1e-9)
    assert 0.2 < ours < 0.9
    sklearn = pytest.importorskip("sklearn.metrics")
    assert ours == pytest.approx(sklearn.normalized_mutual_info_score(subj, expert), rel=1e-9)


def test_router_drift_hand_computed():
    old = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    new = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    assert router_drift(old, new).tolist() == pytest.approx([math.sqrt(2), 0.0])
    # [L, T, E]: averaged over layers
    layered = router_drift(torch.stack([old, old]), torch.stack([new, old]))
    assert layered.tolist() == pytest.approx([math.sqrt(2) / 2, 0.0])
    with pytest.raises(ValueError):
        router_drift(old, new[:1])
    s = drift_summary(torch.tensor([0.0, 0.1, 0.2, 0.3]))
    assert s["mean"] == pytest.approx(0.15) and s["max"] == pytest.approx(0.3) and sum(s["hist"]["counts"]) == 4


# ---------------------------------------------------------------------------------------
# A real HF MoE: the toy student (Qwen3-MoE, 8 experts, top-2)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student(toy_build):
    from padd_ds.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(str(toy_build.student_dir), "float32"), load_tokenizer(str(toy_build.tokenizer_dir))


@pytest.fixture(scope="module")
def problems():
    return load_problems("math500", limit=12)


def test_collect_routing_matches_the_router_modules(student, problems):
    model, tok = student
    snap = collect_routing(model, tok, problems, batch_size=5, max_tokens_per_problem=128)
    L, T, E = snap.probs.shape
    assert (L, E, snap.top_k) == (2, 8, 2) and snap.layers == [0, 1]
    lengths = [len(tok(routing_text(p, True), truncation=True, max_length=128)["input_ids"]) for p in problems]
    assert T == sum(lengths) == snap.token_ids.numel()  # every real token, no padding
    assert torch.allclose(snap.probs.sum(-1), torch.ones(L, T), atol=1e-5)
    assert snap.counts().sum(1).tolist() == [T * 2, T * 2]
    # Reference: the experts each router module itself picks, one unpadded problem at a time.
    picked = {}
    hooks = [model.model.layers[i].mlp.gate.register_forward_hook(
        lambda m, args, out, i=i: picked.setdefault(i, []).append(out[2].detach())) for i in range(2)]
    try:
        with torch.no_grad():
            for p in problems:
                model(**tok(routing_text(p, True), return_tensors="pt", truncation=True, max_length=128))
    finally:
        for h in hooks:
            h.remove()
    for i in range(2):
        ref = torch.cat(picked[i]).sort(-1).values
        assert torch.equal(snap.selected[i].sort(-1).values, ref)
    # Subjects per token follow the problems.
    expected = [snap.subjects.index(p["subject"]) for p, n in zip(problems, lengths) for _ in range(n)]
    assert snap.token_subject.tolist() == expected


def test_snapshot_nmi_equals_the_label_reference(student, problems):
    model, tok = student
    snap = collect_routing(model, tok, problems, max_tokens_per_problem=96)
    nmi = snap.nmi()
    k = snap.top_k
    subj_labels = snap.token_subject.repeat_interleave(k).tolist()
    for layer, value in enumerate(nmi):
        assert value == pytest.approx(_nmi_from_labels(subj_labels, snap.selected[layer].reshape(-1).tolist()), rel=1e-9)
    summary = summarize(snap)
    assert summary["nmi"] == pytest.approx(sum(nmi) / 2)
    metrics = routing_metrics(summary)
    assert all(k.startswith("routing/") for k in metrics) and metrics["routing/nmi"] == summary["nmi"]


def test_routing_log_drift_and_file(student, problems, tmp_path):
    model, tok = student
    log = RoutingLog(tmp_path / "routing.json")
    first = log.add(0, collect_routing(model, tok, problems[:4], max_tokens_per_problem=64))
    assert first["drift"] is None  # nothing to compare with yet
    same = log.add(1, collect_routing(model, tok, problems[:4], max_tokens_per_problem=64))
    assert same["drift"]["max"] == pytest.approx(0.0, abs=1e-6)  # same weights, same tokens
    gate = model.model.layers[1].mlp.gate.weight
    saved = gate.detach().clone()
    try:
        with torch.no_grad():
            gate.add_(torch.randn_like(gate) * 0.5)
        moved = log.add(2, collect_routing(model, tok, problems[:4], max_tokens_per_problem=64))
    finally:
        with torch.no_grad():
            gate.copy_(saved)
    assert moved["drift"]["mean"] > 1e-3
    other = log.add(3, collect_routing(model, tok, problems[4:6], max_tokens_per_problem=64))
    assert other["drift"] is None  # different tokens: drift is undefined
    log.add_counts(4, {0: [1, 1, 1, 1, 1, 1, 1, 1], 1: [8, 0, 0, 0, 0, 0, 0, 0]})
    data = json.loads((tmp_path / "routing.json").read_text())
    assert [s["step"] for s in data["snapshots"]] == [0, 1, 2, 3, 4]
    assert data["snapshots"][4]["layers"][0]["cv"] == 0 and data["snapshots"][4]["layers"][1]["max_over_mean"] == 8
    assert data["num_experts"] == 8 and data["specialization"]["step"] == 3


def test_provenance_of_a_decompressed_student(toy_build, tmp_path, problems):
    from padd_ds.models.decompress import decompress, save_decompressed
    from padd_ds.models.loading import load_causal_lm, load_tokenizer

    teacher = load_causal_lm(str(toy_build.teacher_dir), "float32")
    tok = load_tokenizer(str(toy_build.tokenizer_dir))
    moe, prov = decompress(teacher, num_experts=8, top_k=2)
    out = save_decompressed(moe, prov, tmp_path / "moe", tok)
    summary = expert_provenance(out)
    d_ff = teacher.config.intermediate_size
    assert [layer["student_layer"] for layer in summary["layers"]] == list(range(teacher.config.num_hidden_layers))
    for layer in summary["layers"]:
        assert [e["neurons"] for e in layer["experts"]] == [d_ff // 8] * 8
        assert [e["cluster"] for e in layer["experts"]] == list(range(8))
    assert expert_provenance(toy_build.student_dir) is None  # trained directly, not decompressed
    snap = collect_routing(load_causal_lm(str(out), "float32"), tok, problems[:3], max_tokens_per_problem=64)
    assert snap.probs.shape[0] == teacher.config.num_hidden_layers and snap.num_experts == 8


def test_dense_model_is_refused(toy_build, problems):
    from padd_ds.models.loading import load_causal_lm, load_tokenizer

    with pytest.raises(ValueError, match="MoE"):
        collect_routing(load_causal_lm(str(toy_build.teacher_dir), "float32"),
                        load_tokenizer(str(toy_build.tokenizer_dir)), problems[:1])
