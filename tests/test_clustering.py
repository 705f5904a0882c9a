"""Balanced k-means (Stage I neuron clustering): exact sizes, quality, determinism, errors."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from padd_ds.models.clustering import ClusterResult, _balanced_assign, balanced_kmeans, neuron_points


def blobs(sizes: list[int], d: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: means N(0, spread^2) per dim, unit noise; returns (points, labels)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    labels = labels[torch.randperm(len(labels), generator=g)]
    means = torch.randn(len(sizes), d, generator=g) * spread
    return means[labels] + torch.randn(len(labels), d, generator=g), labels


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert-Arabie ARI from the contingency table."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    comb = lambda v: (v * (v - 1) / 2).sum()  # noqa: E731
    index, rows, cols, total = comb(table), comb(table.sum(1)), comb(table.sum(0)), comb(np.array([len(a)]))
    expected = rows * cols / total
    return float((index - expected) / ((rows + cols) / 2 - expected))


def lloyd(x: torch.Tensor, k: int, seed: int, iters: int = 100) -> float:
    """Plain unconstrained Lloyd's k-means from k random points; returns the inertia."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        new = torch.stack([x[a == j].mean(0) if (a == j).any() else c[j] for j in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    return float(((x - c[torch.cdist(x, c).argmin(1)]) ** 2).sum())


def test_ari_helper_is_right():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, np.array([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)
    assert adjusted_rand_index(a, np.array([0, 1, 0, 1, 0, 1])) < 0.0


@pytest.mark.parametrize("n,k,d", [(7, 1, 3), (12, 3, 2), (30, 30, 4), (120, 12, 5), (512, 16, 8), (999, 27, 6)])
def test_every_cluster_has_exactly_n_over_k_points(n, k, d):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    res = balanced_kmeans(x, k, seed=1)
    assert isinstance(res, ClusterResult)
    assert res.assignment.dtype == torch.int64 and res.assignment.shape == (n,)
    assert res.centroids.dtype == torch.float32 and res.centroids.shape == (k, d)
    assert torch.bincount(res.assignment, minlength=k).tolist() == [n // k] * k
    # centroids are the cluster means and inertia is measured against them
    means = torch.stack([x[res.assignment == j].mean(0) for j in range(k)])
    torch.testing.assert_close(res.centroids, means, atol=1e-5, rtol=1e-5)
    assert res.inertia == pytest.approx(float(((x - means[res.assignment]) ** 2).sum()), rel=1e-5, abs=1e-6)
    assert 1 <= res.iterations <= 50


def test_recovers_planted_equal_size_blobs():
    x, labels = blobs([40] * 8, d=16, spread=4.0, seed=0)
    res = balanced_kmeans(x, 8, seed=0)
    assert adjusted_rand_index(res.assignment.numpy(), labels.numpy()) >= 0.95


def test_same_seed_same_result_other_seed_still_balanced():
    x, _ = blobs([25] * 6, d=10, spread=1.0, seed=3)
    a, b = balanced_kmeans(x, 6, seed=7), balanced_kmeans(x, 6, seed=7)
    assert torch.equal(a.assignment, b.assignment) and torch.equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia and a.iterations == b.iterations
    c = balanced_kmeans(x, 6, seed=8)
    assert torch.bincount(c.assignment, minlength=6).tolist() == [25] * 6


def test_not_divisible_names_the_fix():
    with pytest.raises(ValueError, match=r"d_ff=10 points not divisible by N=3.*divides the FFN width"):
        balanced_kmeans(torch.randn(10, 4), 3)


@pytest.mark.parametrize("spread,seed", [(3.0, 0), (1.0, 1), (0.5, 2)])
def test_inertia_within_5_percent_of_unconstrained_lloyd(spread, seed):
    # Equal-size blobs from well separated to barely separated: the balanced optimum should
    # cost (almost) nothing over unconstrained k-means here.
    x, _ = blobs([48] * 6, d=12, spread=spread, seed=seed)
    ours = balanced_kmeans(x, 6, seed=seed).inertia
    reference = min(lloyd(x, 6, seed=s) for s in range(5))
    assert ours <= 1.05 * reference, (ours, reference)


def optimal_balanced_cost(cost: np.ndarray, cap: int) -> float:
    """Exact reference by dynamic programming over (point, remaining capacities)."""
    n, k = cost.shape

    @functools.lru_cache(maxsize=None)
    def best(i: int, room: tuple[int, ...]) -> float:
        if i == n:
            return 0.0
        return min(cost[i, j] + best(i + 1, room[:j] + (room[j] - 1,) + room[j + 1:])
                   for j in range(k) if room[j] > 0)

    return best(0, (cap,) * k)


@pytest.mark.parametrize("n,k", [(6, 3), (12, 3), (16, 4), (20, 5), (24, 6)])
@pytest.mark.parametrize("ties", [False, True])
def test_assignment_step_is_the_exact_optimum(n, k, ties):
    """The equal-capacity assignment is optimal, cold or warm-started, also with tied costs."""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        # Cluster-wide offsets make most points prefer the same few clusters, so the
        # assignment must route a lot of excess through chains of clusters.
        cost = torch.rand(n, k, generator=g).double() * 10 + torch.rand(k, generator=g).double() * 20
        cost = (cost.floor() if ties else cost).numpy()  # integer costs: many exact ties
        cap = n // k
        best = optimal_balanced_cost(cost, cap)
        for prices in (np.zeros(k), torch.rand(k, generator=g).double().numpy() * 5):
            a = _balanced_assign(cost, cap, prices.copy())
            assert np.bincount(a, minlength=k).tolist() == [cap] * k
            assert cost[np.arange(n), a].sum() == pytest.approx(best, abs=1e-9), (seed, prices)


def test_bad_points_and_arguments():
    with pytest.raises(ValueError, match="2-D"):
        balanced_kmeans(torch.randn(12), 3)
    with pytest.raises(ValueError, match="n_clusters must be an integer >= 1"):
        balanced_kmeans(torch.randn(12, 2), 0)
    with pytest.raises(ValueError, match="NaN or inf"):
        balanced_kmeans(torch.full((4, 2), math.nan), 2)
    with pytest.raises(ValueError, match="empty"):
        balanced_kmeans(torch.randn(0, 3), 1)


def test_neuron_points_modes_and_normalization():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(32, 8, generator=g) * 5, torch.randn(32, 8, generator=g) * 0.1
    pts = neuron_points(gate, up, "gate_up")
    assert pts.shape == (32, 16) and pts.dtype == torch.float32
    # each half is a unit direction scaled by 1/sqrt(2): both projections weigh the same
    torch.testing.assert_close(pts[:, :8].norm(dim=1), torch.full((32,), 0.5 ** 0.5))
    torch.testing.assert_close(pts[:, 8:].norm(dim=1), torch.full((32,), 0.5 ** 0.5))
    torch.testing.assert_close(pts[:, :8] * 2 ** 0.5, gate / gate.norm(dim=1, keepdim=True))
    assert neuron_points(gate, None, "gate").shape == (32, 8)
    assert neuron_points(None, up, "up").shape == (32, 8)
    torch.testing.assert_close(neuron_points(gate, up, "gate_up", normalize=False), torch.cat([gate, up], 1))
    zero = neuron_points(torch.zeros(4, 3), None, "gate")  # dead neurons stay finite
    assert torch.isfinite(zero).all()


def test_neuron_points_errors():
    with pytest.raises(ValueError, match="unknown mode 'both'"):
        neuron_points(torch.randn(4, 3), torch.randn(4, 3), "both")
    with pytest.raises(ValueError, match="needs up_w"):
        neuron_points(torch.randn(4, 3), None, "gate_up")
    with pytest.raises(ValueError, match=r"gate_w must be a non-empty 2-D \[d_ff, d_model\]"):
        neuron_points(torch.randn(4), None, "gate")
    with pytest.raises(ValueError, match="same"):
        neuron_points(torch.randn(4, 3), torch.randn(5, 3), "gate_up")
