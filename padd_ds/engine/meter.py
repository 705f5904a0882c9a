"""Sums of named quantities over a logging window, totalled over every student rank.

    meter = Meter()
    meter.add("kd", kd.item() * denom)          # local sums, any number of keys
    tot = meter.totals()                        # one all-reduce; then the window starts over
    row = {"train/kd_loss": tot["kd"] / tot["count"], "tokens_per_s": tot["tokens"] / tot.seconds}

Exact global means come from summing numerators and denominators separately over ranks and
dividing once. Every rank must add the same keys (the all-reduce is over a sorted key list);
`add_max` keeps a maximum instead (one more all-reduce when any is kept).
"""

from __future__ import annotations

import time

from padd_ds.launch.comm import all_max, all_sum


class Totals(dict):
    """A window's totals over all ranks, plus its wall time in `seconds`."""

    seconds: float


class Meter:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def add(self, key: str, value) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def add_max(self, key: str, value) -> None:
        """A maximum over the window and the ranks (its own key space: totals() holds both)."""
        self.maxima[key] = max(self.maxima.get(key, float("-inf")), float(value))

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of work outside the window's (an evaluation) out of its wall time."""
        self.t0 += seconds

    def totals(self) -> Totals:
        """Collective: every rank's sums added up, maxima taken; resets the window."""
        keys = sorted(self.sums)
        out = Totals(zip(keys, all_sum([self.sums[k] for k in keys]))) if keys else Totals()
        mkeys = sorted(self.maxima)
        if mkeys:
            out.update(zip(mkeys, all_max([self.maxima[k] for k in mkeys])))
        out.seconds = time.perf_counter() - self.t0
        self.sums, self.maxima, self.t0 = {}, {}, time.perf_counter()
        return out
