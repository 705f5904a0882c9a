"""Equal-size (balanced) k-means over FFN neurons: the clustering step of PADD Stage I.

Each expert of the student gets exactly d_ff / N teacher neurons, so the clustering must
split n points into k clusters of exactly n / k points each:

    pts = neuron_points(mlp.gate_proj.weight, mlp.up_proj.weight, "gate_up")  # [d_ff, 2*d_model]
    res = balanced_kmeans(pts, n_clusters=128, seed=0)
    res.assignment            # [d_ff] cluster id of each neuron, every id used d_ff/128 times

The algorithm is Lloyd's k-means with an exact equal-capacity assignment step:

1. Init: greedy k-means++ (as in scikit-learn: 2 + ln k candidates per step, keep the one
   that lowers the potential most) on a seeded subsample of at most 32 points per cluster;
   seeding is sequential over k, and on all 18944 x 3584 points it alone took ~20 s here.
2. Assignment with capacity m = n / k per cluster: a transportation problem, solved exactly
   by successive shortest paths on the k-node *cluster* graph (see `_balanced_assign`).
   Because k << n, each augmentation is a dense Dijkstra over k nodes rather than a search
   over n points, and cluster prices (dual variables) carry over between Lloyd iterations,
   so later steps start almost balanced. Exact min-cost flow or Hungarian on the n x n
   expanded problem is far too slow here; greedy regret filling with pairwise swaps is
   fast but misses exchange cycles; a Jacobi auction is eps-optimal but needed thousands
   of rounds at this size in our measurements.
3. Update: each centroid is the mean of its m points.
4. Stop when the assignment no longer changes or the relative inertia gain is below `tol`.
   Both steps are optimal for the other, so inertia never rises.

Distances use ||x||^2 - 2 x.c + ||c||^2 in float32, computed `chunk_size` rows at a time:
beyond the points themselves, memory is O(n * k) for the distance table plus
O(chunk_size * d). Randomness comes only from a torch.Generator seeded with `seed`, and
ties break by index: the same inputs and seed give the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# k-means++ seeds from at most this many points per cluster: plenty to place k seeds well,
# and it bounds the k sequential passes of the seeding.
_INIT_POINTS_PER_CLUSTER = 32


@dataclass
class ClusterResult:
    """A balanced clustering of n points into k clusters of n / k points each."""

    assignment: torch.Tensor  # [n] int64 in [0, k)
    centroids: torch.Tensor  # [k, d] float32, the mean of each cluster's points
    inertia: float  # sum of squared distances of points to their assigned centroid
    iterations: int  # Lloyd iterations run


# --------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------

_MODES = ("gate_up", "gate", "up")


def _check_proj(name: str, w: torch.Tensor | None, mode: str) -> torch.Tensor:
    if w is None:
        raise ValueError(f"neuron_points: mode '{mode}' needs {name}, got None; pass the FFN's {name} "
                         f"([d_ff, d_model]) or choose a mode that does not use it")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"neuron_points: {name} must be a non-empty 2-D [d_ff, d_model] tensor, got {shape}")
    return w.detach().to(torch.float32)


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    # Dead neurons (all-zero rows) stay zero rather than becoming NaN.
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def neuron_points(gate_w: torch.Tensor | None, up_w: torch.Tensor | None, mode: str,
                  normalize: bool = True) -> torch.Tensor:
    """One point per FFN neuron, from the rows of its input projections ([d_ff, d_model]).

    mode "gate_up" concatenates a neuron's gate and up rows ([d_ff, 2 * d_model]): together
    they define a SwiGLU neuron's response completely. "gate" / "up" use one projection.

    normalize=True (the default) scales each row to unit L2 norm, and in "gate_up" each half
    separately, then the pair by 1/sqrt(2). Why: we want neurons that respond to the same
    input *directions* - and so fire together - in one expert. Raw rows would let norm
    differences (a few large-norm neurons, or a gate/up scale mismatch) dominate the
    distances; on unit rows, squared distance is 2 - 2 cos, so k-means groups by cosine.
    """
    if mode not in _MODES:
        raise ValueError(f"neuron_points: unknown mode '{mode}'; use one of {', '.join(_MODES)}")
    parts = []
    if mode in ("gate_up", "gate"):
        parts.append(_check_proj("gate_w", gate_w, mode))
    if mode in ("gate_up", "up"):
        parts.append(_check_proj("up_w", up_w, mode))
    if len(parts) == 2 and parts[0].shape != parts[1].shape:
        raise ValueError(f"neuron_points: gate_w {tuple(parts[0].shape)} and up_w {tuple(parts[1].shape)} must "
                         "have the same [d_ff, d_model] shape (rows of one SwiGLU FFN)")
    if normalize:
        parts = [_unit_rows(p) for p in parts]
        if len(parts) == 2:
            parts = [p * (0.5 ** 0.5) for p in parts]
    return torch.cat(parts, dim=1).contiguous() if len(parts) == 2 else parts[0].contiguous()


# --------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, chunk_size: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """[n, k] squared distances, `chunk_size` rows at a time (clamped at 0 against rounding)."""
    c_sq = (c * c).sum(1)
    out = torch.empty(x.shape[0], c.shape[0], dtype=torch.float32) if out is None else out
    for i in range(0, x.shape[0], chunk_size):
        blk = out[i:i + chunk_size]
        torch.matmul(x[i:i + chunk_size], c.T, out=blk)
        blk.mul_(-2).add_(x_sq[i:i + chunk_size, None]).add_(c_sq).clamp_(min=0)
    return out


def _exact_inertia(x: torch.Tensor, c: torch.Tensor, assignment: torch.Tensor, chunk_size: int) -> float:
    """sum ||x_i - c_a(i)||^2 by direct differences (no cancellation from the expanded form)."""
    total = 0.0
    for i in range(0, x.shape[0], chunk_size):
        diff = x[i:i + chunk_size] - c[assignment[i:i + chunk_size]]
        total += float((diff * diff).sum(dtype=torch.float64))
    return total


# --------------------------------------------------------------------------------------
# Init: greedy k-means++
# --------------------------------------------------------------------------------------


def _kmeans_pp(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator, chunk_size: int) -> torch.Tensor:
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    closest = _sq_dists(x, x_sq, x[first:first + 1], chunk_size)[:, 0]
    for _ in range(1, k):
        total = float(closest.sum(dtype=torch.float64))
        if total > 0:
            cand = torch.multinomial(closest, trials, replacement=True, generator=gen)
        else:  # every point sits on a chosen centre (duplicates): any unchosen point will do
            free = torch.ones(n, dtype=torch.bool)
            free[chosen] = False
            pool = free.nonzero()[:, 0]
            cand = pool[torch.randint(pool.numel(), (1,), generator=gen)]
        d = torch.minimum(_sq_dists(x, x_sq, x[cand], chunk_size), closest[:, None])  # [n, trials]
        best = int(d.sum(0, dtype=torch.float64).argmin())
        chosen.append(int(cand[best]))
        closest = d[:, best].contiguous()
    return x[chosen].clone()


# --------------------------------------------------------------------------------------
# Balanced assignment: successive shortest paths on the cluster graph
# --------------------------------------------------------------------------------------


def _cheapest_moves(cost: np.ndarray, members: np.ndarray, a: int) -> tuple[np.ndarray, np.ndarray]:
    """Row a of the cluster graph: for every b, the cheapest member of a to move to b.

    Returns (move_cost[b] = min_i cost[i, b] - cost[i, a], point[b] = that i); inf / -1 when
    a is empty (nothing can leave it).
    """
    k = cost.shape[1]
    if members.size == 0:
        return np.full(k, np.inf), np.full(k, -1)
    delta = cost[members] - cost[members, a][:, None]
    best = delta.argmin(0)
    return delta[best, np.arange(k)], members[best]


def _balanced_assign(cost: np.ndarray, cap: int, prices: np.ndarray) -> np.ndarray:
    """Exact minimum-cost assignment of n points to k clusters holding `cap` points each.

    A min-cost flow solved by successive shortest paths with node potentials (`prices`,
    updated in place and reused by the next Lloyd iteration):

    - Start: every point goes to its cheapest cluster under the prices, argmin_j cost + p_j.
      Each point then sits at its cheapest cluster by reduced cost, which makes this
      (over-capacity) assignment optimal for the cluster sizes it has.
    - While a cluster is over capacity: on the k-node cluster graph, edge a -> b costs the
      cheapest reduced cost of moving one point from a to b (>= 0 by the invariant). Dijkstra
      from all overfull clusters finds the nearest underfull one; move one point along each
      edge of that path, and lower the prices by the distances (the classic potential update),
      which keeps every point at its cheapest cluster by reduced cost.

    Each augmentation removes one unit of excess and costs O(k^2 + path * (n + cap * k)), so
    a cold start (excess ~ the planted imbalance) takes seconds at d_ff = 18944, k = 128, and
    a warm start (prices from the last Lloyd iteration) a fraction of that. The result is the
    exact optimum, with none of the eps-slack of an auction or the cycles pairwise swaps miss.
    """
    n, k = cost.shape
    assign = (cost + prices).argmin(1)
    counts = np.bincount(assign, minlength=k)
    # Carried-over prices help once centroids settle, but hurt after a big move (the first
    # update, from seed points to means, rescales every distance): start from whichever of
    # them and zero prices leaves less excess to route.
    plain = cost.argmin(1)
    plain_counts = np.bincount(plain, minlength=k)
    if np.maximum(plain_counts - cap, 0).sum() < np.maximum(counts - cap, 0).sum():
        prices[:] = 0.0
        assign, counts = plain, plain_counts
    if (counts == cap).all():
        return assign
    order = np.argsort(assign, kind="stable")
    ends = np.cumsum(counts)
    move_cost = np.empty((k, k))
    move_point = np.empty((k, k), dtype=np.int64)
    for a in range(k):
        members = order[ends[a] - counts[a]:ends[a]]
        move_cost[a], move_point[a] = _cheapest_moves(cost, members, a)
    while True:
        over = counts > cap
        if not over.any():
            break
        under = counts < cap
        weight = np.maximum(move_cost + prices[None, :] - prices[:, None], 0.0)  # reduced, >= 0
        dist = np.where(over, 0.0, np.inf)
        prev = np.full(k, -1)
        done = np.zeros(k, dtype=bool)
        while True:  # dense Dijkstra; every cluster is one hop from a non-empty overfull one
            u = int(np.argmin(np.where(done, np.inf, dist)))
            done[u] = True
            if under[u]:
                break
            step = dist[u] + weight[u]
            better = (step < dist) & ~done
            dist[better] = step[better]
            prev[better] = u
        prices -= np.minimum(dist, dist[u])
        path = [u]
        while prev[path[-1]] >= 0:
            path.append(int(prev[path[-1]]))
        path.reverse()  # overfull source ... underfull target
        for a, b in zip(path[:-1], path[1:]):
            assign[move_point[a, b]] = b
        counts[path[0]] -= 1
        counts[path[-1]] += 1
        for a in path:
            move_cost[a], move_point[a] = _cheapest_moves(cost, np.flatnonzero(assign == a), a)
    prices -= prices.min()  # only differences matter; keep the numbers small across calls
    return assign


# --------------------------------------------------------------------------------------
# Balanced k-means
# --------------------------------------------------------------------------------------


def balanced_kmeans(points: torch.Tensor, n_clusters: int, seed: int = 0, max_iter: int = 50,
                    tol: float = 1e-4, chunk_size: int = 4096) -> ClusterResult:
    """Split n points into `n_clusters` clusters of exactly n / n_clusters points each.

    Lloyd's k-means (greedy k-means++ init) whose assignment step is the exact minimum-cost
    equal-capacity assignment; see the module docstring. Deterministic for a given `seed`.
    """
    if not isinstance(points, torch.Tensor) or points.dim() != 2:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ValueError(f"balanced_kmeans: points must be a 2-D [n, d] tensor, got {shape}")
    n, d = points.shape
    if n == 0 or d == 0:
        raise ValueError(f"balanced_kmeans: points {tuple(points.shape)} is empty; pass at least one [d>0] point")
    if not isinstance(n_clusters, int) or isinstance(n_clusters, bool) or n_clusters < 1:
        raise ValueError(f"balanced_kmeans: n_clusters must be an integer >= 1, got {n_clusters!r}")
    if n % n_clusters != 0:
        raise ValueError(f"balanced_kmeans: d_ff={n} points not divisible by N={n_clusters} clusters; "
                         "choose a number of experts that divides the FFN width")
    if max_iter < 1:
        raise ValueError(f"balanced_kmeans: max_iter must be >= 1, got {max_iter}")
    if tol < 0:
        raise ValueError(f"balanced_kmeans: tol must be >= 0, got {tol}")
    if chunk_size < 1:
        raise ValueError(f"balanced_kmeans: chunk_size must be >= 1, got {chunk_size}")
    x = points.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("balanced_kmeans: points contain NaN or inf; check the weights they came from")

    k, cap = n_clusters, n // n_clusters
    gen = torch.Generator().manual_seed(seed)
    x_sq = (x * x).sum(1)
    sample = torch.randperm(n, generator=gen)[:min(n, _INIT_POINTS_PER_CLUSTER * k)].sort().values
    centroids = _kmeans_pp(x[sample], x_sq[sample], k, gen, chunk_size)
    prices = np.zeros(k)
    dist = torch.empty(n, k, dtype=torch.float32)
    assignment = None
    prev_inertia = math.inf
    iterations = 0
    for iterations in range(1, max_iter + 1):
        cost = _sq_dists(x, x_sq, centroids, chunk_size, out=dist).numpy().astype(np.float64)
        new = _balanced_assign(cost, cap, prices)
        inertia = float(cost[np.arange(n), new].sum())
        changed = assignment is None or not np.array_equal(new, assignment)
        assignment = new
        centroids = torch.zeros(k, d).index_add_(0, torch.from_numpy(assignment), x).div_(cap)
        if not changed or (iterations > 1 and prev_inertia - inertia <= tol * prev_inertia):
            break
        prev_inertia = inertia
    result = torch.from_numpy(assignment).to(torch.int64)
    return ClusterResult(assignment=result, centroids=centroids,
                         inertia=_exact_inertia(x, centroids, result, chunk_size), iterations=iterations)
