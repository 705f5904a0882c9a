"""D_A / D_B / D_C / D_D: disjoint, complete, deterministic, sized from the config."""

import pytest

from padd_ds.data.splits import split_pool, split_sizes

FR = {"A": 0.10, "B": 0.20, "C": 0.65, "D": 0.05}


def test_parts_are_disjoint_complete_and_sized():
    pool = list(range(1003))
    parts = split_pool(pool, FR, seed=7)
    assert {k: len(v) for k, v in parts.items()} == {"A": 100, "B": 200, "C": 653, "D": 50}
    seen = [x for k in "ABCD" for x in parts[k]]
    assert sorted(seen) == pool  # every problem exactly once


def test_same_seed_same_parts_other_seed_other_parts():
    pool = [f"p{i}" for i in range(500)]
    assert split_pool(pool, FR, 1) == split_pool(pool, FR, 1)
    assert split_pool(pool, FR, 1)["A"] != split_pool(pool, FR, 2)["A"]


def test_empty_part_is_a_clear_error():
    with pytest.raises(ValueError, match="part\\(s\\) D would be empty for a pool of 10"):
        split_sizes(10, FR)
    with pytest.raises(ValueError, match="exactly the keys A, B, C, D"):
        split_sizes(100, {"A": 0.5, "C": 0.5})
