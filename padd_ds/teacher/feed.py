"""Student-side batches paired with the teacher's outputs, requested ahead of use.

    plan = BatchPlan(len(problems), per_rank=16, num_ranks=2, grad_accum=1, seed=1234)
    batches = RankBatches(problems, plan, rank, encode)
    for step, micro, batch, out in TeacherFeed(teacher, batches, range(steps), prefetch=1,
                                               outputs=OUT_CLUSTER_ACTS):
        ...   # out.logits (sparse), out.cluster_acts, ...

The data position is a pure function of (step, micro, rank) (`BatchPlan`), so every student
rank runs the same number of forwards (AutoEP's all-to-alls need that) and a resumed run
sees the batches an uninterrupted one would. `prefetch` requests stay in flight beyond the
one being consumed: the teacher scores step t+1 while the student trains on step t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from padd_ds.data.batch import TokenBatch
from padd_ds.launch.bridge import OUT_LOGITS


class BatchPlan:
    """Which problems each student rank sees at each (step, micro-step): a seeded permutation
    per epoch, cut into the optimiser steps' batches, each cut into micro-steps x ranks. The
    data position is a pure function of the step, and a step's problems depend only on its
    size (per_rank x num_ranks x grad_accum): a run resumed on another number of ranks with
    the same step size (engine/layout.py) sees the same problems in every step."""

    def __init__(self, n: int, per_rank: int, num_ranks: int, grad_accum: int, seed: int):
        self.n, self.per_rank, self.num_ranks, self.grad_accum, self.seed = n, per_rank, num_ranks, grad_accum, seed
        self.global_batch = per_rank * num_ranks        # one micro-step over all ranks
        self.step_batch = self.global_batch * grad_accum  # one optimiser step
        if self.step_batch > n:
            raise ValueError(f"a step's batch of {self.step_batch} problems ({per_rank} per rank x {num_ranks} ranks x "
                             f"{grad_accum} micro-steps) exceeds the {n} problems of this data split")
        self.batches_per_epoch = n // self.global_batch
        self.steps_per_epoch = n // self.step_batch

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        start = pos * self.step_batch + micro * self.global_batch + rank * self.per_rank
        return perm[start:start + self.per_rank].tolist()


@dataclass(frozen=True)
class RankBatches:
    """The token batches one student rank sees: its share of `plan`, encoded."""

    problems: list[dict]
    plan: BatchPlan
    rank: int
    encode: Callable[[list[dict]], TokenBatch]

    def __call__(self, step: int, micro: int) -> TokenBatch:
        return self.encode([self.problems[j] for j in self.plan.indices(step, micro, self.rank)])


class TeacherFeed:
    def __init__(self, teacher, batches: RankBatches, steps: range, prefetch: int, outputs: int = OUT_LOGITS):
        """`steps`: the optimiser steps to feed (each has `plan.grad_accum` micro-steps); `prefetch`:
        requests kept in flight beyond the one being consumed; `outputs`: the OUT_* flags asked for."""
        self.teacher, self.batches = teacher, batches
        self.micro_steps = [(s, m) for s in steps for m in range(batches.plan.grad_accum)]
        self.prefetch, self.outputs = prefetch, outputs
        self.wait_s = 0.0  # time blocked on the teacher, for the wait-fraction metric

    def __len__(self) -> int:
        return len(self.micro_steps)

    def __iter__(self) -> Iterator[tuple[int, int, TokenBatch, object]]:
        inflight: dict[int, tuple[int, TokenBatch]] = {}

        def request(i: int) -> None:
            if i < len(self.micro_steps) and i not in inflight:
                s, m = self.micro_steps[i]
                b = self.batches(s, m)
                inflight[i] = (self.teacher.submit(s, b.ids, b.lengths, outputs=self.outputs), b)

        for i, (step, micro) in enumerate(self.micro_steps):
            for j in range(i, i + 1 + self.prefetch):
                request(j)
            rid, batch = inflight.pop(i)
            w0 = self.teacher.stats.wait_s
            out = self.teacher.result(rid)
            self.wait_s += self.teacher.stats.wait_s - w0
            yield step, micro, batch, out
