"""Stage I on the teacher's side: which teacher layer each student layer learns from, and the
teacher's neuron clusters there.

    layers = layer_map(num_student_layers, num_teacher_layers)   # floor(l * L_T / L_S)
    cmap, records = cluster_teacher(teacher, layers, N, "gate_up", seed)   # on the teacher ranks

Clustering runs where the teacher's weights are (the teacher ranks); students only ever see
per-token, per-cluster numbers streamed over the bridge (`OUT_CLUSTER_ACTS`,
`OUT_CLUSTER_GATE`), never the teacher's weights. When the student was decompressed from
the teacher, its experts already are clusters and the map comes from its provenance.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from padd_ds.models.clustering import balanced_kmeans, neuron_points
from padd_ds.models.loading import decoder_layers


@dataclass
class ClusterMap:
    """Which teacher FFN neurons form each cluster (Stage I), for the layers students need.

    `assignment[i, n]` is the cluster of neuron n of teacher layer `layers[i]`; clusters are
    equal-sized, so pooling is a fixed [d_ff, N] averaging matrix per layer."""

    layers: list[int]
    assignment: torch.Tensor  # [len(layers), d_ff] int64
    num_clusters: int

    def pooling(self) -> torch.Tensor:
        """[len(layers), d_ff, N]: column j averages the neurons of cluster j."""
        onehot = torch.nn.functional.one_hot(self.assignment, self.num_clusters).float()
        return onehot / onehot.sum(1, keepdim=True).clamp(min=1)

def layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Student layer l learns from teacher layer floor(l * L_T / L_S) (the paper's map)."""
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(f"layer_map needs positive layer counts, got student {num_student_layers}, "
                         f"teacher {num_teacher_layers}")
    return [l * num_teacher_layers // num_student_layers for l in range(num_student_layers)]


def _gathered(params: list[torch.nn.Parameter]):
    """Full weights even when the teacher is ZeRO-3-partitioned (a no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


@torch.no_grad()
def cluster_teacher(model: torch.nn.Module, layers: list[int], num_clusters: int, cluster_input: str,
                    seed: int) -> tuple[ClusterMap, list[dict]]:
    """Balanced k-means of the FFN neurons of each teacher layer in `layers` (one entry per
    student layer; a teacher layer used twice is clustered once). Layer t uses seed + t,
    exactly as decompression does, so both give the same clusters for the same teacher."""
    decoder = decoder_layers(model)
    done: dict[int, tuple[torch.Tensor, dict]] = {}
    for t in sorted(set(layers)):
        if not 0 <= t < len(decoder):
            raise ValueError(f"layer map names teacher layer {t} but the teacher has {len(decoder)} layers")
        mlp = decoder[t].mlp
        with _gathered([mlp.gate_proj.weight, mlp.up_proj.weight]):
            gate = mlp.gate_proj.weight.detach().to("cpu", torch.float32).clone()
            up = mlp.up_proj.weight.detach().to("cpu", torch.float32).clone()
        if gate.shape[0] % num_clusters:
            raise ValueError(f"teacher layer {t}: FFN width {gate.shape[0]} is not divisible by the student's "
                             f"{num_clusters} experts; equal-size clusters are impossible")
        res = balanced_kmeans(neuron_points(gate, up, cluster_input), num_clusters, seed=seed + t)
        done[t] = (res.assignment, {"teacher_layer": t, "inertia": res.inertia, "iterations": res.iterations})
    assignment = torch.stack([done[t][0] for t in layers])
    records = [{"student_layer": l, **done[t][1]} for l, t in enumerate(layers)]
    return ClusterMap(layers=list(layers), assignment=assignment, num_clusters=num_clusters), records


def cluster_map_from_provenance(provenance: dict) -> ClusterMap:
    """The cluster map a decompressed student was built from: cluster j = expert j."""
    n = provenance["num_experts"]
    layers, rows = [], []
    for rec in provenance["layers"]:
        d_ff = sum(len(e["neurons"]) for e in rec["experts"])
        a = torch.empty(d_ff, dtype=torch.int64)
        for e in rec["experts"]:
            a[e["neurons"]] = e["expert"]
        layers.append(rec["teacher_layer"])
        rows.append(a)
    return ClusterMap(layers=layers, assignment=torch.stack(rows), num_clusters=n)
