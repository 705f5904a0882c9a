"""Which rank was lost? Heartbeats in the launch's store, read when a rank fails.

When a rank dies, its peers fail inside whatever collective or bridge call they were in, and
gloo says only "Connection reset by peer [127.0.0.1]:41234". So every rank of the launch
bumps a counter in the bridge's TCPStore (hosted by rank 0) every `period_s` and keeps the
time it last saw each peer's counter move. A rank that fails with a communication error then
waits a few seconds for the picture to settle and names the peers whose heartbeat stopped,
longest silent first (the first to go is the one that was lost; the others followed it).
If the store itself is gone, its host, rank 0, is the one that was lost. A rank that stops
on an error of its own (not a communication one) posts it to the store first, and its peers
then report that error instead of a lost rank.

Every rank must name the same culprit, also when a launcher (deepspeed, torchrun, srun)
tears the others down right after the first death: the first rank to reach a diagnosis posts
it as the launch's verdict, the store's host stays up long enough for the others to read it,
and a rank that then fails (on its own diagnosis, a torn-down peer or the store's loss)
reports the verdict. An error that does not look like communication is still checked
against the verdict and the heartbeats: one that follows a peer's death is a consequence.

It is also the watchdog for hangs: not every collective honours a timeout (gloo groups that
DeepSpeed creates itself, e.g. AutoEP's expert-parallel groups, wait 30 minutes, and a
student whose peer is frozen can wait there indefinitely), so a rank whose peer has been
silent for `exit_after_s` (topology.timeout_s) prints the same diagnosis and exits 1.

    live = Liveness(addr, port, rank, world_size, names={0: "student", 1: "student", 2: "teacher"},
                    timing=HeartbeatTiming(exit_after_s=600))
    ...
    live.diagnose(error)   # "lost rank 1 (student): no heartbeat for 4s" or None

Cost: one background thread per rank, two small store requests per period.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from padd_ds.launch.bridge import BridgeError
from padd_ds.launch.replicas import dead_count, dead_ranks

_FAILURES = "padd/failures"  # how many ranks posted their own error; each is at padd/failure/<n>
_VERDICTS, _VERDICT = "padd/verdicts", "padd/verdict"  # the first diagnosis of a lost rank wins
_PEER_ERROR = re.compile(r"gloo|nccl|connection (reset|closed|refused)|broken pipe|timed out|timeout|socket|"
                         r"peer|bridge", re.I)


def post_verdict_to(store, verdict: str) -> bool:
    """Make `verdict` the launch's diagnosis unless one was posted first; True if this one won."""
    if int(store.add(_VERDICTS, 1)) != 1:
        return False
    store.set(_VERDICT, verdict)
    return True


def looks_like_peer_failure(error: BaseException) -> bool:
    """A failure of communication (a collective or the bridge), not of this rank's own work."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, BridgeError):
            return True
        try:
            import torch.distributed as dist

            if isinstance(e, dist.DistError):
                return True
        except (ImportError, AttributeError):
            pass
        if type(e) is RuntimeError and _PEER_ERROR.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


@dataclass(frozen=True)
class HeartbeatTiming:
    period_s: float = 1.0  # each rank bumps its counter this often
    stale_s: float = 3.0  # a peer whose counter has not moved for this long is silent
    exit_after_s: float | None = None  # the watchdog: exit 1 once a peer is silent this long (None: never)


class Liveness:
    def __init__(self, addr: str, port: int, rank: int, world_size: int, names: dict[int, str],
                 timing: HeartbeatTiming = HeartbeatTiming(), host: int = 0):
        """`names`: each rank's role, for the messages; `host`: the rank whose process holds the store."""
        self.addr, self.port, self.rank, self.world_size = addr, port, rank, world_size
        self.names, self.host = names, host
        self.period_s, self.stale_s, self.exit_after_s = timing.period_s, timing.stale_s, timing.exit_after_s
        self.peers = [r for r in range(world_size) if r != rank]
        self._lock = threading.Lock()
        self._values: dict[int, int] = {}
        self._changed: dict[int, float] = {}   # peer -> monotonic time its counter last moved
        self._store_lost: float | None = None  # when the store stopped answering
        self._failed: list[tuple[int, str]] = []  # (rank, its error) posted by peers that stopped on their own
        self._verdict: str | None = None  # a peer's diagnosis of a lost rank, posted to the store
        self._failures_read = 0
        self.dead: set[int] = set()  # peers declared dead (a lost teacher replica): never waited for
        self._dead_read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="padd-liveness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import torch.distributed as dist

        keys = {r: f"padd/heartbeat/{r}" for r in range(self.world_size)}
        try:
            store = dist.TCPStore(self.addr, self.port, self.world_size, False,
                                  timeout=timedelta(seconds=max(5.0, 3 * self.period_s)), wait_for_workers=False)
            all_seen = False
            while True:
                store.add(keys[self.rank], 1)
                self._read_dead(store)
                peer_keys = [keys[r] for r in self.peers]
                all_seen = all_seen or store.check(peer_keys)
                if all_seen and peer_keys:
                    values = [int(v) for v in store.multi_get(peer_keys)]
                    now = time.monotonic()
                    with self._lock:
                        for r, v in zip(self.peers, values):
                            if self._values.get(r) != v:
                                self._values[r], self._changed[r] = v, now
                    quiet = self.silent()[0]
                    if self.exit_after_s is not None and quiet and quiet[0][1] > self.exit_after_s:
                        self._exit()
                self._read_failures(store)
                if self._stop.wait(self.period_s):
                    return
        except Exception:  # noqa: BLE001 - the store (rank 0) is gone or unreachable; that is the news
            with self._lock:
                self._store_lost = time.monotonic()
        # A process that outlives its store by exit_after_s (a normal exit takes milliseconds) hangs.
        if self.exit_after_s is not None and not self._stop.wait(self.exit_after_s):
            self._exit()

    def _read_dead(self, store) -> None:
        """Peers declared dead (launch/replicas.py): their silence is known and handled."""
        n = dead_count(store)
        if n != self._dead_read:
            found = dead_ranks(store, self.peers)
            with self._lock:
                self.dead, self._dead_read = found, n

    def _read_failures(self, store) -> None:
        if self._verdict is None and store.check([_VERDICT]):
            verdict = store.get(_VERDICT).decode(errors="replace")
            with self._lock:
                self._verdict = verdict
        posted = int(store.add(_FAILURES, 0))
        while self._failures_read < posted:
            key = f"padd/failure/{self._failures_read + 1}"
            if not store.check([key]):
                return  # counted but not yet written: next period
            rank, message = store.get(key).decode(errors="replace").split("\t", 1)
            with self._lock:
                self._failed.append((int(rank), message))
            self._failures_read += 1

    def post_failure(self, message: str) -> None:
        """Tell the peers this rank stops on an error of its own (not a lost peer), so that
        when they fail on its absence they say why instead of "lost rank N". The store lives
        in rank 0's process, so rank 0 waits two heartbeat periods for the peers to read it."""
        try:
            store = self._client()
            n = int(store.add(_FAILURES, 1))
            store.set(f"padd/failure/{n}", f"{self.rank}\t{message[:1000]}")
        except Exception:  # noqa: BLE001 - the store is gone: peers fall back to "lost rank"
            return
        if self.rank == self.host and self.peers:
            time.sleep(2 * self.period_s + 0.5)

    def post_verdict(self, lost: str) -> None:
        """Post this rank's diagnosis as the launch's verdict, unless one was posted first;
        the store's host then stays up two heartbeat periods so that its peers read it."""
        if self._verdict is None:  # else adopted: already in the store
            try:
                post_verdict_to(self._client(), f"{lost} (seen by {self.describe(self.rank)})")
            except Exception:  # noqa: BLE001 - the store is gone: each peer diagnoses on its own
                return
        if self.rank == self.host and self.peers:
            time.sleep(2 * self.period_s + 0.5)

    def _client(self):
        import torch.distributed as dist

        return dist.TCPStore(self.addr, self.port, self.world_size, False, timeout=timedelta(seconds=5),
                             wait_for_workers=False)

    def _exit(self) -> None:
        """The watchdog: a peer has been silent longer than any wait may last."""
        import os
        import sys

        quiet, store_lost = self.silent()
        lost = self._explain(quiet, store_lost) or "lost a peer"
        if not store_lost:
            self.post_verdict(lost)
        print(f"padd-ds: {self.describe(self.rank)} failed: {lost}: nothing may wait longer than "
              f"topology.timeout_s={self.exit_after_s:.0f}; exiting", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def silent(self) -> tuple[list[tuple[int, float]], bool]:
        """(peers whose heartbeat stopped, with seconds of silence, longest first; store lost?).
        Silence is measured up to the moment the store was lost: after that nothing is known."""
        with self._lock:
            until = self._store_lost if self._store_lost is not None else time.monotonic()
            quiet = [(r, until - t) for r, t in self._changed.items()
                     if until - t > self.stale_s and r not in self.dead]
            return sorted(quiet, key=lambda x: -x[1]), self._store_lost is not None

    def describe(self, r: int) -> str:
        return f"rank {r} ({self.names.get(r, '?')})"

    def diagnose(self, error: BaseException, torn_down: bool = False) -> str | None:
        """Which peer(s) were lost, as one clause, or None when every peer still has a
        heartbeat. A communication failure (or any failure after a termination signal,
        `torn_down`: a launcher stopping us because a peer died) waits for the picture to
        settle; another error is only checked against what is already known, so that a
        rank's own error is reported at once."""
        try:
            settle = looks_like_peer_failure(error) or torn_down
            return self._diagnose(self.stale_s + 2 * self.period_s if settle else 0.0)
        except Exception:  # noqa: BLE001 - a diagnosis must never hide the error it explains
            return None

    def _diagnose(self, wait_s: float) -> str | None:
        deadline = time.monotonic() + wait_s
        while True:
            quiet, store_lost = self.silent()
            if quiet or store_lost or self._failed or self._verdict or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        settled = wait_s > 0
        if settled and not store_lost:  # what a peer posted just before leaving, not a period later
            try:
                self._read_failures(self._client())
            except Exception:  # noqa: BLE001 - the store went just now: explain from what is known
                pass
        return self._explain(quiet, store_lost, peers_errors=settled)

    def _explain(self, quiet: list[tuple[int, float]], store_lost: bool, peers_errors: bool = True) -> str | None:
        """`peers_errors`: a peer's own error explains this failure (a communication one, after
        the peer left); a rank's own error is its own even when a peer failed the same way."""
        with self._lock:
            failed, verdict, dead = list(self._failed) if peers_errors else [], self._verdict, sorted(self.dead)
        if failed:  # the peers that left told us why
            return "; ".join(f"{self.describe(r)} stopped on its own error ({m})" for r, m in failed)
        if verdict:  # a peer named the lost rank first: every rank says the same
            return verdict
        parts = [f"{self.describe(r)}: no heartbeat for {s:.0f}s" for r, s in quiet]
        if store_lost and self.host != self.rank and self.host not in [r for r, _ in quiet]:
            parts.append(f"{self.describe(self.host)}: unreachable (it hosts the launch's store)")
        if not parts:  # nobody else went silent: the ranks declared dead (a lost teacher replica) are the news
            parts = [f"{self.describe(r)}: its connections closed (declared lost)" for r in dead]
        return ("lost " + "; ".join(parts)) if parts else None
