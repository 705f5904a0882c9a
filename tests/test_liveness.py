"""The lost-rank diagnosis in one process: real TCPStore, real heartbeat threads (ranks 0 and
1 of a world of 2). Multi-process faults are in test_faults.py, test_teardown.py and
test_failover.py; these pin the ordering rules those runs hit only by chance."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from conftest import free_port
from padd_ds.launch.liveness import HeartbeatTiming, Liveness, post_verdict_to

TIMING = HeartbeatTiming(period_s=0.5, stale_s=1.5)
NAMES = {0: "student", 1: "student"}


@pytest.fixture
def pair():
    port = free_port()
    host = dist.TCPStore("127.0.0.1", port, 2, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    lives = [Liveness("127.0.0.1", port, r, 2, NAMES, TIMING) for r in (0, 1)]
    yield host, lives
    for live in lives:
        live.stop()
    for live in lives:  # before the store's host goes: no thread mid-request on a closed socket
        live._thread.join(timeout=5)


def _until_silent(live: Liveness, peer: int) -> None:
    t0 = time.monotonic()
    while peer not in [r for r, _ in live.silent()[0]]:
        assert time.monotonic() - t0 < 10, "the stopped peer never went silent"
        time.sleep(0.05)


def test_a_silent_peer_is_named(pair):
    _, (live0, live1) = pair
    live1.stop()
    _until_silent(live0, 1)
    assert live0.diagnose(RuntimeError("gloo: Connection closed by peer")).startswith(
        "lost rank 1 (student): no heartbeat for")


def test_a_verdict_posted_just_before_the_diagnosis_wins(pair):
    """A student that leaves because no teacher replica is left posts why, then exits; its peer
    fails on its absence a moment later, between two heartbeat periods, and must say the same
    (the CI failure: it named the heartbeat it had seen stop instead)."""
    host, (live0, live1) = pair
    live1.stop()
    _until_silent(live0, 1)
    assert post_verdict_to(host, "no teacher replica is left (teacher ranks [2, 3] lost) (seen by rank 1)")
    assert live0.diagnose(RuntimeError("gloo: Connection closed by peer")) == \
        "no teacher replica is left (teacher ranks [2, 3] lost) (seen by rank 1)"


def test_the_first_verdict_wins(pair):
    host, (live0, _) = pair
    assert post_verdict_to(host, "first")
    assert not post_verdict_to(host, "second")
    live0.post_verdict("third")  # adopted or not, the store keeps the first
    assert host.get("padd/verdict").decode() == "first"
    assert live0.diagnose(ValueError("own error")) == "first"


def test_an_own_error_is_not_a_lost_peer(pair):
    _, (live0, _) = pair
    t0 = time.monotonic()
    assert live0.diagnose(ValueError("bad batch")) is None
    assert time.monotonic() - t0 < 1.0  # no settling wait for an error of the rank's own


def test_a_peers_own_error_explains_a_communication_failure_but_not_an_own_error(pair):
    """Both ranks hit the same error of their own (test_nonfinite_run.py): each reports its
    own; the rank that then fails talking to the one that left reports why it left."""
    _, (live0, live1) = pair
    live1.post_failure("NonFiniteLossError: non-finite loss")
    assert live0.diagnose(ValueError("non-finite loss")) is None
    assert live0.diagnose(RuntimeError("gloo: Connection closed by peer")) == \
        "rank 1 (student) stopped on its own error (NonFiniteLossError: non-finite loss)"
