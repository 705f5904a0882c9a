"""Routing analysis of an MoE student: expert load, router drift, expert specialization, provenance.

- Load, per MoE layer: tokens per expert (top-k assignments), their coefficient of variation
  (0 = perfectly balanced), normalized entropy (1 = uniform) and max/min over the mean load.
- Router drift between two router states on the same tokens: per token, the L2 distance of
  the router probability vectors, averaged over MoE layers - Stage III's Gamma_t.
- Specialization: normalized mutual information between the expert a token is routed to and
  the subject of its problem (the paper reports it on MATH500's seven subjects). NMI is
  I(E; S) / mean(H(E), H(S)), scikit-learn's default normalization.
- Provenance: which teacher layer and neuron cluster each expert came from (Stage I).

``collect_routing`` runs a Hugging Face MoE model (Qwen3-MoE, Qwen2-MoE, Mixtral) with
``output_router_logits=True``; the statistics also take plain tensors, so router outputs
from anywhere (e.g. a DeepSpeed engine's router) can be analysed. ``RoutingLog`` keeps the
history in ``run_dir/routing.json``, which ``padd_ds.report.report`` turns into figures.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from padd_ds.data.prompt import format_prompt

ROUTING_FILE = "routing.json"
PROVENANCE_FILE = "padd_provenance.json"  # written by padd_ds.models.decompress
DRIFT_BINS = 30  # histogram bins kept per drift distribution: enough for a plot, small on disk


# ----------------------------------------------------------------------------------------
# Statistics on tensors
# ----------------------------------------------------------------------------------------

def layer_load_stats(counts: torch.Tensor | Sequence[float]) -> dict[str, Any]:
    """Load statistics of one layer from its per-expert token counts ``[E]``."""
    c = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if c.numel() < 1 or bool((c < 0).any()):
        raise ValueError(f"expert counts must be a non-empty, non-negative vector, got {c.tolist()}")
    total, n = float(c.sum()), c.numel()
    if total == 0:
        return {"counts": c.tolist(), "fraction": [0.0] * n, "cv": None, "entropy": None,
                "max_over_mean": None, "min_over_mean": None}
    f = c / total
    mean = total / n
    nz = f[f > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(n)) if n > 1 else 1.0
    return {"counts": [int(x) if float(x).is_integer() else float(x) for x in c.tolist()], "fraction": f.tolist(),
            "cv": float(c.std(unbiased=False) / mean), "entropy": entropy,
            "max_over_mean": float(c.max() / mean), "min_over_mean": float(c.min() / mean)}


def expert_counts(selected: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Top-k assignments ``[T, k]`` (expert ids) -> tokens per expert ``[E]``."""
    return torch.bincount(selected.reshape(-1).long(), minlength=num_experts)[:num_experts]


def subject_contingency(selected: torch.Tensor, token_subject: torch.Tensor, num_subjects: int,
                        num_experts: int) -> np.ndarray:
    """``[S, E]`` counts of (subject, expert) over all top-k assignments; tokens with subject -1
    (problem without a subject) are left out."""
    k = selected.shape[-1]
    subj = token_subject.reshape(-1, 1).expand(-1, k).reshape(-1).long()
    exp = selected.reshape(-1).long()
    keep = subj >= 0
    flat = subj[keep] * num_experts + exp[keep]
    return torch.bincount(flat, minlength=num_subjects * num_experts).reshape(num_subjects, num_experts).numpy()


def normalized_mutual_information(contingency: np.ndarray) -> float:
    """NMI of a ``[S, E]`` count table: I / ((H_S + H_E) / 2); 1.0 when both are constant and 0.0
    when only one is (scikit-learn's conventions)."""
    t = np.asarray(contingency, dtype=np.float64)
    total = t.sum()
    if t.ndim != 2 or total <= 0:
        raise ValueError("contingency must be a 2-D table of counts with a positive total")
    p = t / total
    ps, pe = p.sum(1), p.sum(0)
    h = lambda q: float(-(q[q > 0] * np.log(q[q > 0])).sum())  # noqa: E731
    hs, he = h(ps), h(pe)
    if hs == 0 and he == 0:
        return 1.0
    if hs == 0 or he == 0:
        return 0.0
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(ps, pe)[nz])).sum())
    return max(0.0, mi / ((hs + he) / 2))


def router_drift(p_old: torch.Tensor, p_new: torch.Tensor) -> torch.Tensor:
    """Per-token drift ``||p_new - p_old||_2`` over experts, averaged over layers when the inputs
    are ``[L, T, E]``; ``[T, E]`` inputs give one layer's drift. Returns ``[T]``."""
    if p_old.shape != p_new.shape or p_old.dim() not in (2, 3):
        raise ValueError(f"router probabilities must both be [T, E] or [L, T, E] of one shape, got "
                         f"{tuple(p_old.shape)} and {tuple(p_new.shape)}")
    d = (p_new.float() - p_old.float()).norm(dim=-1)
    return d.mean(0) if d.dim() == 2 else d


def drift_summary(drift: torch.Tensor, bins: int = DRIFT_BINS) -> dict[str, Any]:
    """Mean, quantiles and a histogram (from 0 to the largest drift) of per-token drift."""
    d = drift.detach().float().flatten()
    if d.numel() == 0:
        raise ValueError("drift has no tokens")
    q = torch.quantile(d, torch.tensor([0.5, 0.9, 0.99]))
    top = max(float(d.max()), 1e-6)  # all-zero drift still gets a valid histogram
    counts = torch.histc(d, bins=bins, min=0.0, max=top)
    return {"mean": float(d.mean()), "std": float(d.std(unbiased=False)), "p50": float(q[0]), "p90": float(q[1]),
            "p99": float(q[2]), "max": float(d.max()), "tokens": d.numel(),
            "hist": {"edges": torch.linspace(0, top, bins + 1).tolist(), "counts": counts.long().tolist()}}


# ----------------------------------------------------------------------------------------
# Router outputs of an HF MoE model
# ----------------------------------------------------------------------------------------

@dataclass
class RoutingSnapshot:
    """Router outputs on a fixed set of tokens (the real tokens of some problems, no padding)."""

    layers: list[int]            # transformer layer index of each MoE layer
    probs: torch.Tensor          # [L, T, E] router softmax probabilities, float32
    selected: torch.Tensor       # [L, T, k] the top-k experts of each token
    token_ids: torch.Tensor      # [T] the tokens: drift compares snapshots of identical tokens only
    token_subject: torch.Tensor  # [T] index into `subjects`, -1 for problems without one
    subjects: list[str]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def top_k(self) -> int:
        return self.selected.shape[-1]

    def counts(self) -> torch.Tensor:
        """Tokens per expert, ``[L, E]``."""
        return torch.stack([expert_counts(s, self.num_experts) for s in self.selected])

    def contingency(self) -> list[np.ndarray]:
        """Per layer, the ``[S, E]`` subject x expert assignment counts."""
        return [subject_contingency(s, self.token_subject, len(self.subjects), self.num_experts)
                for s in self.selected]

    def nmi(self) -> list[float] | None:
        """Per-layer expert-subject NMI; None without at least two subjects."""
        if len(self.subjects) < 2 or int((self.token_subject >= 0).sum()) == 0:
            return None
        return [normalized_mutual_information(c) for c in self.contingency()]


def _router_layer_ids(model, n: int) -> list[int]:
    """Transformer layer index of each router, in the order the model reports router logits."""
    ids = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith(("TopKRouter", "Router")) or re.search(r"\.mlp\.gate$", name):
            m = re.search(r"layers\.(\d+)\.", name)
            if m:
                ids.append(int(m.group(1)))
    ids = list(dict.fromkeys(ids))
    return ids if len(ids) == n else list(range(n))


def _top_k(model) -> int:
    k = getattr(model.config, "num_experts_per_tok", None)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{type(model).__name__}: config has no num_experts_per_tok; routing analysis needs an MoE model")
    return k


def routing_text(problem: dict, include_solution: bool) -> str:
    """The text routed for a problem: the training prompt, then the reference solution."""
    text = format_prompt(problem["question"])
    if include_solution and problem.get("solution"):
        text += " " + problem["solution"]
    return text


@torch.no_grad()
def collect_routing(model, tokenizer, problems: list[dict], *, batch_size: int = 8, include_solution: bool = True,
                    max_tokens_per_problem: int = 512, max_total_tokens: int = 32768) -> RoutingSnapshot:
    """Route ``problems`` (their prompt + solution) through an HF MoE ``model``.

    ``max_total_tokens`` bounds memory: the snapshot holds ``L x T x E`` float32 probabilities
    (48 layers x 32k tokens x 128 experts = 0.8 GB); problems past the budget are skipped."""
    if not problems:
        raise ValueError("collect_routing needs at least one problem")
    k = _top_k(model)
    subjects = sorted({str(p["subject"]) for p in problems if p.get("subject") is not None})
    subject_index = {s: i for i, s in enumerate(subjects)}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs, selected, ids, subj, layer_ids = [], [], [], [], None
    total = 0
    try:
        for start in range(0, len(problems), batch_size):
            if total >= max_total_tokens:
                break
            chunk = problems[start : start + batch_size]
            enc = tokenizer([routing_text(p, include_solution) for p in chunk], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_tokens_per_problem)
            out = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                        output_router_logits=True, use_cache=False)
            logits = getattr(out, "router_logits", None)
            if not logits:
                raise ValueError(f"{type(model).__name__} returned no router logits; routing analysis needs an HF MoE "
                                 "model that supports output_router_logits (Qwen3-MoE, Qwen2-MoE, Mixtral)")
            if layer_ids is None:
                layer_ids = _router_layer_ids(model, len(logits))
            valid = enc["attention_mask"].reshape(-1).bool().to(device)
            lg = torch.stack([x.reshape(valid.numel(), -1)[valid].float() for x in logits])  # [L, t, E]
            probs.append(lg.softmax(-1).cpu())
            selected.append(lg.topk(k, dim=-1).indices.cpu())
            ids.append(enc["input_ids"].reshape(-1)[valid.cpu()])
            per_row = enc["attention_mask"].sum(1).tolist()
            subj += [torch.full((n,), subject_index.get(str(p.get("subject")), -1)) for p, n in zip(chunk, per_row)]
            total += int(valid.sum())
    finally:
        model.train(was_training)
    return RoutingSnapshot(layers=layer_ids, probs=torch.cat(probs, 1), selected=torch.cat(selected, 1),
                           token_ids=torch.cat(ids), token_subject=torch.cat(subj), subjects=subjects)


# ----------------------------------------------------------------------------------------
# Summaries: metrics for the logger, the routing.json history
# ----------------------------------------------------------------------------------------

def summarize(snapshot: RoutingSnapshot) -> dict[str, Any]:
    """Per-layer load stats (+ NMI) of a snapshot, JSON-ready."""
    nmi = snapshot.nmi()
    layers = []
    for i, (layer, counts) in enumerate(zip(snapshot.layers, snapshot.counts())):
        layers.append({"layer": layer, **layer_load_stats(counts), "nmi": nmi[i] if nmi else None})
    return _with_means({"tokens": int(snapshot.token_ids.numel()), "layers": layers})


def _with_means(entry: dict) -> dict:
    for key, stat in (("load_cv", "cv"), ("load_entropy", "entropy"), ("nmi", "nmi")):
        vals = [x[stat] for x in entry["layers"] if x.get(stat) is not None]
        entry[key] = sum(vals) / len(vals) if vals else None
    vals = [x["max_over_mean"] for x in entry["layers"] if x.get("max_over_mean") is not None]
    entry["max_over_mean"] = max(vals) if vals else None
    return entry


def routing_metrics(summary: dict[str, Any], drift: dict[str, Any] | None = None) -> dict[str, float]:
    """Flat ``routing/*`` scalars for ``MetricsLogger.log`` from a ``summarize`` result."""
    out = {f"routing/{k}": summary[k] for k in ("load_cv", "load_entropy", "max_over_mean", "nmi")
           if summary.get(k) is not None}
    for x in summary["layers"]:
        if x.get("cv") is not None:
            out[f"routing/layer{x['layer']}/load_cv"] = x["cv"]
    if drift:
        out.update({f"routing/drift_{k}": drift[k] for k in ("mean", "p90", "max")})
    return out


def expert_provenance(model_dir: str | Path) -> dict | None:
    """Stage I provenance of a decompressed student (teacher layer, cluster and neuron count of
    each expert), or None when the model was not built by decompression."""
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return {"teacher": raw.get("teacher"), "num_experts": raw.get("num_experts"), "top_k": raw.get("top_k"),
            "layers": [{"student_layer": r["student_layer"], "teacher_layer": r["teacher_layer"],
                        "experts": [{"expert": e["expert"], "teacher_layer": e["teacher_layer"], "cluster": e["cluster"],
                                     "neurons": len(e["neurons"])} for e in r["experts"]]}
                       for r in raw.get("layers", [])]}


class RoutingLog:
    """The routing history of a run in ``path`` (``run_dir/routing.json``), rewritten after each
    ``add``. Drift is measured against the previous snapshot when both routed the same tokens."""

    def __init__(self, path: str | Path, provenance: dict | None = None):
        self.path = Path(path)
        self.data: dict[str, Any] = {"version": 1, "num_experts": None, "top_k": None, "subjects": [],
                                     "snapshots": [], "specialization": None, "provenance": provenance}
        self._previous: RoutingSnapshot | None = None

    def add(self, step: int, snapshot: RoutingSnapshot, drift: torch.Tensor | None = None) -> dict[str, Any]:
        """Record ``snapshot`` at ``step``; returns the entry (``routing_metrics(entry, entry['drift'])``
        gives the scalars to log)."""
        entry = {"step": int(step), **summarize(snapshot)}
        prev = self._previous
        if drift is None and prev is not None and torch.equal(prev.token_ids, snapshot.token_ids):
            drift = router_drift(prev.probs, snapshot.probs)
        entry["drift"] = drift_summary(drift) if drift is not None else None
        self.data.update(num_experts=snapshot.num_experts, top_k=snapshot.top_k, subjects=snapshot.subjects)
        nmi = snapshot.nmi()
        if nmi is not None:
            self.data["specialization"] = {"step": int(step), "layers": snapshot.layers, "nmi": nmi,
                                           "contingency": [c.tolist() for c in snapshot.contingency()]}
        self._previous = snapshot
        return self._append(entry)

    def add_counts(self, step: int, counts: dict[int, Sequence[float]] | Sequence[Sequence[float]],
                   drift: torch.Tensor | None = None) -> dict[str, Any]:
        """Record per-layer expert counts from elsewhere (e.g. a router's own token counters)."""
        items = counts.items() if isinstance(counts, dict) else enumerate(counts)
        layers = [{"layer": int(layer), **layer_load_stats(c), "nmi": None} for layer, c in items]
        if not layers:
            raise ValueError("add_counts needs the counts of at least one layer")
        self.data["num_experts"] = len(layers[0]["counts"])
        entry = _with_means({"step": int(step), "tokens": None, "layers": layers})
        entry["drift"] = drift_summary(drift) if drift is not None else None
        return self._append(entry)

    def _append(self, entry: dict) -> dict:
        self.data["snapshots"].append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data) + "\n")
        tmp.replace(self.path)
        return entry
