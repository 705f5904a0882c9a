"""The paper's four disjoint parts of one problem pool.

    parts = split_pool(problems, {"A": .10, "B": .20, "C": .65, "D": .05}, seed=1234)
    parts["A"]   # Stage I clustering statistics (teacher path targets, router fit)
    parts["B"]   # Stage I warmup
    parts["C"]   # main training (Stages II-IV, or online KD)
    parts["D"]   # held out: validation during training (Stage I agreement, KD loss)

A seeded permutation of the pool, cut into consecutive blocks: deterministic for a seed,
disjoint by construction, and each part's size is floor(fraction * n) with the rounding
remainder going to C (the part that uses the most data), so no problem is dropped.
Benchmark evaluation (`eval.suite`) reads its own files and never touches the pool.
"""

from __future__ import annotations

from typing import Mapping, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
PARTS = ("A", "B", "C", "D")


def split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Part sizes for a pool of `n`; every part gets at least one problem or this raises."""
    if sorted(fractions) != sorted(PARTS):
        raise ValueError(f"data.split_fractions must have exactly the keys A, B, C, D, got {sorted(fractions)}")
    sizes = {k: int(np.floor(fractions[k] * n)) for k in PARTS}
    sizes["C"] += n - sum(sizes.values())
    empty = [k for k in PARTS if sizes[k] < 1]
    if empty:
        raise ValueError(f"data.split_fractions: part(s) {', '.join(empty)} would be empty for a pool of {n} "
                         f"problems; raise their fractions or use a larger data set")
    return sizes


def split_pool(problems: Sequence[T], fractions: Mapping[str, float], seed: int) -> dict[str, list[T]]:
    """Disjoint parts A/B/C/D of `problems` (see the module docstring)."""
    sizes = split_sizes(len(problems), fractions)
    perm = np.random.default_rng([seed, 0x5B1D]).permutation(len(problems))
    parts, start = {}, 0
    for k in PARTS:
        parts[k] = [problems[i] for i in perm[start:start + sizes[k]]]
        start += sizes[k]
    return parts
