"""Benchmark padd_ds' balanced_kmeans against scikit-learn and k-means-constrained.

    pip install -r bench/requirements.txt
    python bench/clustering.py             # full size: 18944 x 3584 -> 128 clusters, then the subsample sweep
    python bench/clustering.py --quick     # smoke size, about a minute

The data has planted structure shaped like an FFN layer's neurons: d_ff = 18944 points in
d_model = 3584 dimensions (Qwen2.5-7B's shape), drawn from 128 Gaussian groups whose means
are N(0, spread^2) per dimension around unit noise. spread = 0.5 means the groups explain
20% of the variance: real structure, but noisy, as neuron weights are. Group sizes vary by
up to +-25% around n/k, so an equal-size clustering must move ~6% of the points out of
their planted group: the balance constraint has a real price.

Two comparisons:
1. Full size: ours (timed) against unconstrained k-means (sklearn KMeans, n_init=1). The
   ratio ours / unconstrained is the price of equal sizes plus any optimisation gap.
2. Subproblems of growing size with the same generator and the same points per cluster:
   ours against k-means-constrained (Lloyd with an exact min-cost-flow assignment, the
   reference balanced solver), until k-means-constrained no longer finishes within
   --kmc-budget seconds. Each k-means-constrained run is a separate process, killed at the
   budget.

The last line is machine-readable:
    CLUSTERING seconds=<s> inertia_ratio_vs_unconstrained=<r> sizes_equal=<true|false>
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from padd_ds.models.clustering import balanced_kmeans  # noqa: E402

try:
    from k_means_constrained import KMeansConstrained  # noqa: F401
    from sklearn.cluster import KMeans
except ImportError as e:  # pragma: no cover - depends on the environment
    sys.exit(f"bench/clustering.py needs scikit-learn and k-means-constrained ({e}); "
             "run: pip install -r bench/requirements.txt")


@dataclass
class Profile:
    n: int  # points (d_ff)
    d: int  # dimensions (d_model)
    k: int  # clusters (experts)
    sweep_k: tuple[int, ...]  # cluster counts of the subproblems, same n/k as the full size
    kmc_budget: float  # seconds per k-means-constrained run
    sklearn_max_iter: int


FULL = Profile(n=18944, d=3584, k=128, sweep_k=(8, 16, 32, 64, 128), kmc_budget=600.0, sklearn_max_iter=50)
QUICK = Profile(n=1024, d=64, k=8, sweep_k=(2, 4), kmc_budget=60.0, sklearn_max_iter=50)


def planted(n: int, d: int, k: int, seed: int = 0, spread: float = 0.5, size_jitter: float = 0.25):
    """n points from k Gaussian groups of unequal size; returns (points float32, labels)."""
    g = torch.Generator().manual_seed(seed)
    w = 1 + size_jitter * (2 * torch.rand(k, generator=g) - 1)
    sizes = torch.floor(w / w.sum() * n).long()
    sizes[: n - int(sizes.sum())] += 1
    labels = torch.repeat_interleave(torch.arange(k), sizes)[torch.randperm(n, generator=g)]
    means = torch.randn(k, d, generator=g) * spread
    return means[labels] + torch.randn(n, d, generator=g), labels


def planted_inertia(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    sizes = torch.bincount(labels, minlength=k).clamp_min(1)
    means = torch.zeros(k, x.shape[1]).index_add_(0, labels, x) / sizes[:, None]
    return float(((x - means[labels]) ** 2).sum(dtype=torch.float64))


def run_ours(x: torch.Tensor, k: int) -> tuple[float, float, bool]:
    t = time.perf_counter()
    res = balanced_kmeans(x, k, seed=0)
    seconds = time.perf_counter() - t
    sizes = torch.bincount(res.assignment, minlength=k)
    return seconds, res.inertia, bool((sizes == x.shape[0] // k).all())


def _kmc_worker(path: str, k: int, out: mp.Queue) -> None:
    from k_means_constrained import KMeansConstrained

    x = np.load(path)
    m = x.shape[0] // k
    t = time.perf_counter()
    km = KMeansConstrained(n_clusters=k, size_min=m, size_max=m, n_init=1, random_state=0).fit(x)
    seconds = time.perf_counter() - t
    sizes = np.bincount(km.labels_, minlength=k)
    out.put((seconds, float(km.inertia_), bool((sizes == m).all())))


def run_kmc(x: torch.Tensor, k: int, budget: float) -> tuple[float, float, bool] | None:
    """k-means-constrained in a fresh process; None if it does not finish within `budget` s."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        np.save(path, x.numpy())
        out = ctx.Queue()
        proc = ctx.Process(target=_kmc_worker, args=(path, k, out))
        proc.start()
        proc.join(budget)
        if proc.is_alive():
            proc.terminate()
            proc.join()
            return None
        return out.get() if proc.exitcode == 0 and not out.empty() else None


def fmt_row(cols: list) -> str:
    widths = [22, 6, 9, 13, 22, 9, 13, 8, 6]
    return "  ".join(str(c).rjust(w) for c, w in zip(cols, widths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke size")
    ap.add_argument("--kmc-budget", type=float, default=None, help="seconds per k-means-constrained run")
    ap.add_argument("--skip-sweep", action="store_true", help="only the full-size comparison with sklearn")
    args = ap.parse_args()
    prof = QUICK if args.quick else FULL
    budget = args.kmc_budget if args.kmc_budget is not None else prof.kmc_budget
    print(f"torch threads={torch.get_num_threads()}  cpu cores={os.cpu_count()}  "
          f"profile={'quick' if args.quick else 'full'}", flush=True)

    header = fmt_row(["problem", "k", "ours_s", "ours_inertia", "reference", "ref_s", "ref_inertia", "ratio",
                      "equal"])
    rows = []

    x, labels = planted(prof.n, prof.d, prof.k, seed=0)
    print(f"full size {prof.n} x {prof.d} -> {prof.k}: running balanced_kmeans ...", flush=True)
    o_s, o_in, o_eq = run_ours(x, prof.k)
    print(f"  ours {o_s:.2f}s inertia {o_in:.6g} equal sizes {o_eq}", flush=True)
    print(f"  sklearn KMeans(n_init=1, max_iter={prof.sklearn_max_iter}) ...", flush=True)
    t = time.perf_counter()
    km = KMeans(n_clusters=prof.k, n_init=1, max_iter=prof.sklearn_max_iter, random_state=0).fit(x.numpy())
    sk_s = time.perf_counter() - t
    sk_in = float(km.inertia_)
    sk_sizes = np.bincount(km.labels_, minlength=prof.k)
    print(f"  sklearn {sk_s:.1f}s inertia {sk_in:.6g} iterations {km.n_iter_} "
          f"cluster sizes {sk_sizes.min()}..{sk_sizes.max()}", flush=True)
    pl_in = planted_inertia(x, labels, prof.k)
    full_name = f"{prof.n}x{prof.d}"
    rows.append([full_name, prof.k, f"{o_s:.2f}", f"{o_in:.6g}", "sklearn (unconstr.)", f"{sk_s:.1f}",
                 f"{sk_in:.6g}", f"{o_in / sk_in:.4f}", str(o_eq).lower()])
    rows.append([full_name, prof.k, f"{o_s:.2f}", f"{o_in:.6g}", "planted groups", "-", f"{pl_in:.6g}",
                 f"{o_in / pl_in:.4f}", str(o_eq).lower()])

    if not args.skip_sweep:
        m = prof.n // prof.k
        for k_s in prof.sweep_k:
            n_s = m * k_s
            xs, _ = planted(n_s, prof.d, k_s, seed=1)
            print(f"subproblem {n_s} x {prof.d} -> {k_s}: ours, then k-means-constrained "
                  f"(budget {budget:.0f}s) ...", flush=True)
            s_s, s_in, s_eq = run_ours(xs, k_s)
            ref = run_kmc(xs, k_s, budget)
            if ref is None:
                print(f"  k-means-constrained did not finish within {budget:.0f}s at {n_s} points; "
                      "stopping the sweep", flush=True)
                rows.append([f"{n_s}x{prof.d}", k_s, f"{s_s:.1f}", f"{s_in:.6g}", "k-means-constrained",
                             f">{budget:.0f}", "timeout", "-", str(s_eq).lower()])
                break
            r_s, r_in, r_eq = ref
            print(f"  ours {s_s:.1f}s inertia {s_in:.6g}; k-means-constrained {r_s:.1f}s inertia {r_in:.6g} "
                  f"(equal sizes {r_eq})", flush=True)
            rows.append([f"{n_s}x{prof.d}", k_s, f"{s_s:.1f}", f"{s_in:.6g}", "k-means-constrained",
                         f"{r_s:.1f}", f"{r_in:.6g}", f"{s_in / r_in:.4f}", str(s_eq).lower()])

    print()
    print(header)
    for r in rows:
        print(fmt_row(r))
    print("ratio = ours / reference inertia (lower is better); equal = every one of our clusters has n/k points")
    print(f"CLUSTERING seconds={o_s:.2f} inertia_ratio_vs_unconstrained={o_in / sk_in:.4f} "
          f"sizes_equal={str(o_eq).lower()}")


if __name__ == "__main__":
    main()
