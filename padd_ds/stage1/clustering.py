"""Equal-size (balanced) k-means over FFN neurons: the clustering step of PADD Stage I.

Each expert of the student gets exactly d_ff / N teacher neurons, so the clustering must
split n points into k clusters of exactly n / k points each:

    pts = neuron_points(mlp.gate_proj.weight, mlp.up_proj.weight, "gate_up")  # [d_ff, 2*d_model]
    res = balanced_kmeans(pts, n_clusters=128, seed=0)
    res.assignment            # [d_ff] cluster id of each neuron, every id used d_ff/128 times

The algorithm is Lloyd's k-means with the assignment step replaced by a capacitated one:

1. Init: greedy k-means++ (as in scikit-learn: 2 + ln k candidates per step, keep the one
   that lowers the potential most).
2. Assignment under equal capacities m = n / k: a transportation problem (n points, k
   clusters with m slots each). We solve it with Bertsekas' *auction algorithm* (Jacobi
   variant, fully vectorised): every unassigned point bids for its best cluster at the
   current cluster prices, raising that cluster's price by its margin over the second-best
   cluster; a full cluster keeps its m highest bidders and evicts the rest, who bid again.
   eps-scaling (coarse to fine bid increments) makes it fast, and prices carry over between
   Lloyd iterations, so later auctions start near their answer. The result is exactly
   balanced and eps-optimal: its cost is within n * eps of the best balanced assignment for
   the current centroids; we set eps to 1e-4 of the mean point-to-nearest-centroid distance.
   (Exact min-cost flow or Hungarian on the n x n expanded problem is far too slow at
   d_ff = 18944; greedy regret filling plus pairwise swaps is cheaper but misses the
   exchange cycles the auction's prices resolve.)
3. Update: each centroid is the mean of its m points.
4. Stop when the assignment no longer changes or the relative inertia gain is below `tol`.

Distances use ||x||^2 - 2 x.c + ||c||^2 in float32, computed `chunk_size` rows at a time, so
beyond the points themselves memory stays O(chunk_size * k). Randomness comes only from a
torch.Generator seeded with `seed`: the same inputs and seed give the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Final auction bid increment, relative to the mean distance of a point to its nearest
# centroid. The balanced assignment is then within this fraction of the optimum's cost.
_EPS_REL = 1e-4
# eps shrinks by this factor per scaling phase: 4-10 is the usual range.
_EPS_FACTOR = 8.0


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
# Balanced assignment: auction algorithm
# --------------------------------------------------------------------------------------


def _auction_phase(cost: torch.Tensor, cap: int, prices: torch.Tensor, eps: float, max_rounds: int) -> torch.Tensor:
    """One eps-phase of the Jacobi auction; updates `prices` in place, returns the assignment.

    Values are -cost - price. Each round every unassigned point i bids for its best cluster
    j1 the price that would make it indifferent to its second-best cluster, plus eps. Each
    cluster that got bids keeps its `cap` highest bids (old holders included); the evicted
    bid again next round. A full cluster's price is its lowest kept bid. Prices only rise,
    every bid beats the price it targets by >= eps, so the auction terminates.
    """
    n, k = cost.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    bid = torch.full((n,), -math.inf, dtype=cost.dtype)
    free = torch.arange(n)
    positions = torch.arange(n)
    rounds = 0
    while free.numel() > 0 and rounds < max_rounds:
        rounds += 1
        val = -cost[free] - prices  # [u, k]
        top = val.topk(2, dim=1)
        j1 = top.indices[:, 0]
        assign[free] = j1
        bid[free] = prices[j1] + (top.values[:, 0] - top.values[:, 1]) + eps
        # Re-rank the holders of every cluster that received a bid.
        touched = torch.zeros(k + 1, dtype=torch.bool)
        touched[j1] = True
        cand = touched[assign].nonzero()[:, 0]  # assign == -1 indexes the always-False slot k
        cand = cand[torch.argsort(bid[cand], descending=True, stable=True)]
        cand = cand[torch.argsort(assign[cand], stable=True)]
        cl = assign[cand]
        counts = torch.bincount(cl, minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        rank = positions[:cand.numel()] - starts[cl]
        last = cand[rank == cap - 1]  # lowest kept bid of each full cluster sets its price
        prices[assign[last]] = bid[last]
        free = cand[rank >= cap]
        assign[free] = -1
        bid[free] = -math.inf
    if free.numel() > 0:  # safety net, not expected: fill the open slots by cost, still balanced
        _fill_greedy(cost, cap, assign)
    return assign


def _fill_greedy(cost: torch.Tensor, cap: int, assign: torch.Tensor) -> None:
    k = cost.shape[1]
    room = cap - torch.bincount(assign[assign >= 0], minlength=k)
    for i in (assign < 0).nonzero()[:, 0].tolist():
        c = cost[i].masked_fill(room <= 0, math.inf)
        j = int(c.argmin())
        assign[i] = j
        room[j] -= 1


def _balanced_assign(dist: torch.Tensor, cap: int, prices: torch.Tensor) -> torch.Tensor:
    """Equal-capacity assignment minimising total distance (eps-optimal); prices warm-start."""
    n, k = dist.shape
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    cost = dist.to(torch.float64)
    scale = float(cost.min(dim=1).values.mean())
    if not scale > 0:  # every point on a centroid: any positive increment resolves ties
        scale = float(cost.mean()) or 1.0
    eps_final = _EPS_REL * scale
    # Start at the typical margin between a point's best and second-best cluster: coarse
    # enough to settle the prices in a few rounds, then refine by _EPS_FACTOR per phase.
    margins = (-cost - prices).topk(2, dim=1).values
    eps = max(float((margins[:, 0] - margins[:, 1]).median()), eps_final)
    max_rounds = 50 * n + 1000
    while True:
        assign = _auction_phase(cost, cap, prices, eps, max_rounds)
        if eps <= eps_final:
            break
        eps = max(eps / _EPS_FACTOR, eps_final)
    prices -= prices.min()  # only differences matter; keep the numbers small across calls
    return assign


# --------------------------------------------------------------------------------------
# Balanced k-means
# --------------------------------------------------------------------------------------


def balanced_kmeans(points: torch.Tensor, n_clusters: int, seed: int = 0, max_iter: int = 50,
                    tol: float = 1e-4, chunk_size: int = 4096) -> ClusterResult:
    """Split n points into `n_clusters` clusters of exactly n / n_clusters points each.

    Lloyd's k-means (greedy k-means++ init) whose assignment step is an eps-optimal
    equal-capacity auction; see the module docstring. Deterministic for a given `seed`.
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
    centroids = _kmeans_pp(x, x_sq, k, gen, chunk_size)
    prices = torch.zeros(k, dtype=torch.float64)
    dist = torch.empty(n, k, dtype=torch.float32)
    assignment = None
    prev_inertia = math.inf
    iterations = 0
    for iterations in range(1, max_iter + 1):
        _sq_dists(x, x_sq, centroids, chunk_size, out=dist)
        new = _balanced_assign(dist, cap, prices)
        inertia = float(dist.gather(1, new[:, None]).sum(dtype=torch.float64))
        changed = assignment is None or not torch.equal(new, assignment)
        assignment = new
        centroids = torch.zeros(k, d, dtype=torch.float32).index_add_(0, assignment, x).div_(cap)
        if not changed or (math.isfinite(prev_inertia) and prev_inertia - inertia <= tol * prev_inertia):
            break
        prev_inertia = inertia
    return ClusterResult(assignment=assignment, centroids=centroids,
                         inertia=_exact_inertia(x, centroids, assignment, chunk_size), iterations=iterations)
