"""Resume on another allocation. Here: the data position does not depend on how a step is cut
into ranks and micro-steps, so a run resumed on another number of student ranks with the same
global batch trains on the same problems in every step."""

from __future__ import annotations

from padd_ds.teacher.feed import BatchPlan


def test_a_step_holds_the_same_problems_however_it_is_cut():
    """BatchPlan: per_rank x ranks x micro-steps = 8 problems per step, across epoch ends (30 // 8)."""
    cuts = [(4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 8, 1), (2, 1, 4)]
    plans = [BatchPlan(30, per_rank, ranks, accum, seed=7) for per_rank, ranks, accum in cuts]
    for step in range(12):
        steps = [sorted(i for m in range(p.grad_accum) for r in range(p.num_ranks) for i in p.indices(step, m, r))
                 for p in plans]
        assert all(s == steps[0] for s in steps) and len(set(steps[0])) == 8, step
