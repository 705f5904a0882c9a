"""Teacher replicas that outlive one another: what the launch's store records about them.

With several teacher replicas (`teacher.parallel: replicas`), a student whose replica dies
moves its requests to the next live replica (teacher/service.py, RemoteTeacher). The ranks
agree on what happened through the bridge's TCPStore (hosted by rank 0):

    padd/dead/<rank>          set once a rank is declared dead; `padd/dead` counts the
                              declarations, so a reader re-reads the set only when it moved
    padd/adopt/<teacher>      how many students moved to that teacher; entry i (1-based) at
                              padd/adopt/<teacher>/<i> holds the student's rank
    padd/finish/<rank>, padd/left/<rank>   the end-of-run barrier over the live ranks

A rank declared dead is never waited for again: not by the liveness watchdog
(launch/liveness.py), not by the final barrier. Which replica a student moves to is a pure
function of the replica list and the dead set (the next live one after its own, in order),
so a run is reproducible.

Only a replica whose process is gone (its connections closed) can be replaced: a gloo wait
that times out closes every pair of the caller's bridge (gloo signals the timeout to the
whole context), so a hung replica still stops its students, as before.
"""

from __future__ import annotations

import time
from datetime import timedelta
from padd_ds.launch.bridge import BridgeError

DEAD_COUNT = "padd/dead"


def declare_dead(store, rank: int) -> None:
    """Record that `rank` is lost for good (idempotent)."""
    store.set(f"{DEAD_COUNT}/{rank}", "1")
    store.add(DEAD_COUNT, 1)


def dead_count(store) -> int:
    """Moves whenever a rank is declared dead: re-read the set only then."""
    return int(store.add(DEAD_COUNT, 0))


def dead_ranks(store, ranks) -> set[int]:
    """Which of `ranks` were declared dead."""
    if dead_count(store) == 0:
        return set()
    return {r for r in ranks if store.check([f"{DEAD_COUNT}/{r}"])}


def next_replica(replicas: list[int], lost: int, dead: set[int]) -> int | None:
    """The replica that takes over from `lost`: the next live one after it, in order (wrapping)."""
    i = replicas.index(lost)
    for r in replicas[i + 1:] + replicas[:i]:
        if r not in dead:
            return r
    return None


def register_adoption(store, teacher: int, student: int) -> None:
    """Tell `teacher` to expect `student` (and its STOP) before the student sends anything."""
    n = int(store.add(f"padd/adopt/{teacher}", 1))
    store.set(f"padd/adopt/{teacher}/{n}", str(student))


def adopted_since(store, teacher: int, seen: int) -> list[int]:
    """Students that moved to `teacher` after the first `seen` ones."""
    n = int(store.add(f"padd/adopt/{teacher}", 0))
    return [int(store.get(f"padd/adopt/{teacher}/{i}")) for i in range(seen + 1, n + 1)]


def live_barrier(store, rank: int, world_size: int, timeout_s: float) -> None:
    """Meet every rank not declared dead, through the store (a gloo barrier would wait for a
    lost replica). Rank 0 hosts the store, so it leaves last: once every other live rank has
    seen the barrier. A rank lost on the way is named after `timeout_s` (or by the watchdog)."""
    store.set(f"padd/finish/{rank}", "1")
    _wait_for_all(store, "padd/finish", range(world_size), timeout_s)
    if rank == 0:
        _wait_for_all(store, "padd/left", range(1, world_size), timeout_s)
    else:
        store.set(f"padd/left/{rank}", "1")


def _wait_for_all(store, prefix: str, ranks: range, timeout_s: float) -> None:
    """Until `prefix/<r>` is set for every live r in `ranks`; names the missing ranks on failure."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = sorted(set(ranks) - dead_ranks(store, ranks))
        try:  # in slices: the dead set may grow
            store.wait([f"{prefix}/{r}" for r in missing], timedelta(seconds=1))
            return
        except Exception:  # noqa: BLE001 - the store's wait timed out: see who is missing
            missing = [r for r in missing if not store.check([f"{prefix}/{r}"])]
        if time.monotonic() >= deadline:
            raise BridgeError(f"bridge: final barrier: rank(s) {missing} not there after {timeout_s:.0f}s")
