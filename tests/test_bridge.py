"""The teacher <-> student bridge in two real processes: exact transport, integrity checks,
and a peer that dies."""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch

from conftest import free_port

TIMEOUT = 20.0


def _tiny_teacher():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return Qwen3ForCausalLM(cfg).eval()


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 211, (3, 12), generator=g)
    lengths = torch.tensor([12, 9, 5])
    return ids, lengths


def _run(role_fns: dict, port: int):
    """Run {rank: fn(bridge) -> result} in spawned processes; return {rank: (ok, value)}."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, rank, len(role_fns), port, q)) for rank, fn in role_fns.items()]
    for p in procs:
        p.start()
    out = {}
    deadline = time.time() + 120
    while len(out) < len(procs) and time.time() < deadline:
        try:
            rank, ok, value = q.get(timeout=1)
            out[rank] = (ok, value)
        except Exception:  # noqa: BLE001 - queue.Empty; also notice children that died silently
            if all(not p.is_alive() for p in procs) and q.empty():
                break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    return out, {rank: p.exitcode for rank, p in zip(role_fns, procs)}


def _child(fn, rank, world, port, q):
    from padd_ds.launch.bridge import Bridge

    torch.set_num_threads(1)
    bridge = None
    try:
        bridge = Bridge("127.0.0.1", port, rank, world, TIMEOUT)
        value = fn(bridge)
        q.put((rank, True, value))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))
    q.close()
    q.join_thread()   # flush the queue before leaving without interpreter teardown
    if bridge is not None:
        _leave_after_the_others(bridge)
    os._exit(0)


def _leave_after_the_others(bridge, grace_s: float = 5.0) -> None:
    """Rank 0 hosts the store: it stays until every other rank (not killed, not declared dead)
    has left, as train.py's final barrier makes it; a rank still reading the store would
    otherwise fail on its host's exit."""
    from padd_ds.launch.replicas import dead_ranks

    try:
        bridge.store.set(f"test/left/{bridge.rank}", "1")
        deadline = time.time() + grace_s
        while bridge.rank == 0 and time.time() < deadline:
            others = set(range(1, bridge.world_size)) - dead_ranks(bridge.store, range(bridge.world_size))
            if all(bridge.store.check([f"test/left/{r}"]) for r in others):
                return
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store is gone: nothing left to wait for
        return


# -- roles (module level so spawn can import them) -----------------------------------------

def teacher_serves(bridge):
    from padd_ds.teacher.service import TeacherModel, serve

    stats = serve(bridge, TeacherModel(_tiny_teacher()), students=[0], idle_timeout_s=TIMEOUT)
    return stats.requests


def student_streams(bridge, mode="topk"):
    from padd_ds.teacher.service import RemoteTeacher, TeacherModel
    from padd_ds.teacher.sparse import sparse_kd_loss

    client = RemoteTeacher(bridge, teacher_rank=1, top_k=8, timeout_s=TIMEOUT, student_rank=0, mode=mode)
    local = TeacherModel(_tiny_teacher())
    batches = [_batch(s) for s in range(4)]
    # the logits of each row from its scored_from on (a rollout's response), or everywhere (None)
    starts = [None, torch.tensor([3, 0, 5]), None, torch.tensor([1, 2, 0])]
    rids = [client.submit(i, *b, scored_from=starts[i]) for i, b in enumerate(batches[:2])]   # two in flight
    diffs = []
    student_logits = torch.randn(3, 12, 211, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(3, 12, dtype=torch.bool)
    for i, b in enumerate(batches):
        remote = client.result(rids[i]).logits
        if i + 2 < len(batches):
            rids.append(client.submit(i + 2, *batches[i + 2], scored_from=starts[i + 2]))
        # sampling is seeded by the request id
        ref = local.score(*b, k=8, mode=mode, seed=rids[i], scored_from=starts[i]).logits
        assert torch.equal(remote.indices, ref.indices)
        assert (remote.weights is None) == (mode == "topk")
        if mode == "sampled":
            assert torch.equal(remote.weights, ref.weights)
        diffs.append(max((remote.values - ref.values).abs().max().item(), (remote.lse - ref.lse).abs().max().item()))
        kd_remote = sparse_kd_loss(student_logits, remote, mask)
        kd_local = sparse_kd_loss(student_logits, ref, mask)
        assert kd_remote.item() == kd_local.item()
    client.close()
    return max(diffs)


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_streamed_logits_equal_local_and_kd_identical(mode):
    out, codes = _run({0: functools.partial(student_streams, mode=mode), 1: teacher_serves}, free_port())
    assert out[0] == (True, 0.0), out
    assert out[1] == (True, 4), out


def student_sends_bad_checksum(bridge):
    from padd_ds.launch.bridge import KIND_TOPK_LOGITS, TAG_REQUEST, Header, crc32

    ids, lengths = _batch(0)
    h = Header(KIND_TOPK_LOGITS, 7, 0, 3, 12, 8, input_crc=crc32(ids) ^ 1)
    bridge.send_message(h, [ids, lengths, torch.zeros(3, dtype=torch.int64)], 1,
                        header_tag=TAG_REQUEST).wait()   # the teacher has read it all
    time.sleep(3)
    return "sent"


def teacher_serves_clusters(bridge):
    from padd_ds.teacher.service import TeacherModel, serve
    from test_teacher_outputs import cluster_map, tiny_teacher

    return serve(bridge, TeacherModel(tiny_teacher(), cluster_map()), students=[0], idle_timeout_s=TIMEOUT).requests


def student_asks_everything(bridge):
    from padd_ds.launch.bridge import OUT_CLUSTER_ACTS, OUT_HIDDEN
    from padd_ds.teacher.service import RemoteTeacher, TeacherModel
    from test_teacher_outputs import cluster_map, tiny_teacher

    client = RemoteTeacher(bridge, teacher_rank=1, top_k=8, timeout_s=TIMEOUT, student_rank=0)
    ids, lengths = torch.randint(0, 211, (3, 9), generator=torch.Generator().manual_seed(4)), torch.tensor([9, 6, 2])
    remote = client.result(client.submit(0, ids, lengths, outputs=OUT_CLUSTER_ACTS | OUT_HIDDEN))
    local = TeacherModel(tiny_teacher(), cluster_map()).score(ids, lengths, 8, outputs=OUT_CLUSTER_ACTS | OUT_HIDDEN)
    plain = client.result(client.submit(1, ids, lengths))            # logits only: no extras sent
    client.close()
    assert plain.cluster_acts is None and plain.hidden is None
    return [torch.equal(remote.cluster_acts, local.cluster_acts), torch.equal(remote.hidden, local.hidden),
            torch.equal(remote.logits.values, local.logits.values)]


def test_cluster_activations_and_hidden_states_stream_exactly():
    out, _ = _run({0: student_asks_everything, 1: teacher_serves_clusters}, free_port())
    assert out[0] == (True, [True, True, True]), out
    assert out[1] == (True, 2), out


def test_corrupted_request_is_refused_by_the_teacher():
    out, _ = _run({0: student_sends_bad_checksum, 1: teacher_serves}, free_port())
    ok, msg = out[1]
    assert not ok and "checksum mismatch in request 7 from rank 0" in msg, msg


def teacher_corrupts_reply(bridge):
    from padd_ds.launch.bridge import KIND_TOPK_LOGITS, TAG_REQUEST, Header, crc32
    from padd_ds.teacher.service import TeacherModel

    h = bridge.recv_header(0, tag=TAG_REQUEST)
    ids, lengths, _ = bridge.recv_payload(h, [((h.batch, h.seqlen), torch.int64), ((h.batch,), torch.int64),
                                              ((h.batch,), torch.int64)], 0)  # ids, lengths, scored_from
    sl = TeacherModel(_tiny_teacher()).score(ids, lengths, h.arg).logits
    good_crc = crc32(*sl.tensors())
    sl.values[0, 0, 0] += 1.0                      # a flipped value "in transit"
    reply = Header(KIND_TOPK_LOGITS, h.request_id, h.step, h.batch, h.seqlen, h.arg, input_crc=h.input_crc,
                   payload_crc=good_crc)
    bridge.send_message(reply, sl.tensors(), 0).wait()
    time.sleep(2)
    return "sent"


def student_receives(bridge):
    from padd_ds.teacher.service import RemoteTeacher

    client = RemoteTeacher(bridge, teacher_rank=1, top_k=8, timeout_s=TIMEOUT, student_rank=0)
    rid = client.submit(0, *_batch(0))
    client.result(rid)
    return "used corrupted data"


def test_corrupted_reply_is_detected_by_the_student():
    out, _ = _run({0: student_receives, 1: teacher_corrupts_reply}, free_port())
    ok, msg = out[0]
    assert not ok and "payload checksum mismatch for request 0" in msg, msg


def student_dies(bridge):
    from padd_ds.teacher.service import RemoteTeacher

    client = RemoteTeacher(bridge, teacher_rank=1, top_k=8, timeout_s=TIMEOUT, student_rank=0)
    client.result(client.submit(0, *_batch(0)))
    os._exit(3)                                    # dies without STOP


def test_teacher_exits_when_its_student_dies():
    t0 = time.time()
    out, codes = _run({0: student_dies, 1: teacher_serves}, free_port())
    assert codes[0] == 3
    ok, msg = out[1]
    assert not ok and "student rank 0 lost while this teacher waits" in msg, msg
    assert time.time() - t0 < TIMEOUT  # its connection closed: no timeout is waited out


# -- a lost peer: the other pairs keep working; a student moves to another teacher replica ---

def _exchange_after_rank_3_dies(bridge):
    """Ranks 0-2 see rank 3 go (PeerGone), then talk among themselves, point to point and
    from any source, on the same gloo group."""
    import signal

    from padd_ds.launch.bridge import KIND_RESULT, TAG_REQUEST, Header, PeerGone

    if bridge.rank == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        bridge.recv_header(3, timeout_s=TIMEOUT)
        return "rank 3 answered"
    except PeerGone:
        pass
    nxt, prev = (bridge.rank + 1) % 3, (bridge.rank - 1) % 3
    ring = bridge.send_message(Header(KIND_RESULT, bridge.rank), [torch.arange(5) * bridge.rank], nxt)
    h = bridge.recv_header(prev)
    (got,) = bridge.recv_payload(h, [((5,), torch.int64)], prev)
    ring.wait()
    if bridge.rank == 2:  # from any source: both others, whatever the order
        srcs = sorted(bridge.recv_header_any(TAG_REQUEST, TIMEOUT).src for _ in range(2))
        return [h.src, got.tolist(), srcs]
    bridge.send_message(Header(KIND_RESULT, 9), [], 2, header_tag=TAG_REQUEST).wait()
    return [h.src, got.tolist()]


def test_pairs_between_the_other_ranks_work_after_a_peer_is_killed():
    out, codes = _run({r: _exchange_after_rank_3_dies for r in range(4)}, free_port())
    assert codes[3] == -9
    assert out[0] == (True, [2, [0, 2, 4, 6, 8]]), out
    assert out[1] == (True, [0, [0, 0, 0, 0, 0]]), out
    assert out[2] == (True, [1, [0, 1, 2, 3, 4], [0, 1]]), out


def replica_serves(bridge):
    """A teacher replica (ranks 2 and 3) that says where it runs, so a student can kill it."""
    from padd_ds.teacher.service import TeacherModel, serve

    bridge.store.set(f"test/pid/{bridge.rank}", str(os.getpid()))
    own = [bridge.rank - 2]  # replica 0 serves student 0, replica 1 student 1
    return serve(bridge, TeacherModel(_tiny_teacher()), students=own, idle_timeout_s=TIMEOUT).requests


def student_of_two_replicas(bridge, kill_after: int = -1):
    """Six sampled-logit requests, two in flight, to this student's replica; with `kill_after`
    the student kills its replica after that many answers. Every answer must equal the local
    model's with the request id as the seed, whichever replica gave it."""
    import signal

    from padd_ds.launch.replicas import dead_ranks
    from padd_ds.teacher.service import RemoteTeacher, TeacherModel

    me = bridge.rank
    client = RemoteTeacher(bridge, teacher_rank=2 + me, top_k=8, timeout_s=TIMEOUT, student_rank=me,
                           mode="sampled", replicas=[2, 3])
    local = TeacherModel(_tiny_teacher())
    batches = [_batch(10 * me + s) for s in range(6)]
    rids = [client.submit(i, *b) for i, b in enumerate(batches[:2])]
    same = []
    for i, b in enumerate(batches):
        if i == kill_after:
            os.kill(int(bridge.store.get(f"test/pid/{2 + me}")), signal.SIGKILL)
        remote = client.result(rids[i]).logits
        if i + 2 < len(batches):
            rids.append(client.submit(i + 2, *batches[i + 2]))
        ref = local.score(*b, k=8, mode="sampled", seed=rids[i]).logits
        same.append(all(torch.equal(x, y) for x, y in zip(remote.tensors(), ref.tensors())))
    bridge.store.set(f"test/done/{me}", "1")  # the students of a run step together: none stops early
    bridge.store.wait([f"test/done/{1 - me}"])
    client.close()
    return [all(same), client.teacher_rank, sorted(dead_ranks(bridge.store, [2, 3]))]


def test_a_student_whose_replica_is_killed_moves_to_the_other_with_the_same_answers():
    """Student 1 kills its replica (rank 3) with two requests in flight: they go to rank 2 with
    the same request ids, so the sampled logits draw the same seeds; rank 2 serves both
    students to the end. A replica lost with nobody left is covered by the run tests
    (test_failover.py)."""
    roles = {0: student_of_two_replicas, 1: functools.partial(student_of_two_replicas, kill_after=2),
             2: replica_serves, 3: replica_serves}
    out, codes = _run(roles, free_port())
    assert codes[3] == -9
    assert out[0] == (True, [True, 2, [3]]), out
    assert out[1] == (True, [True, 2, [3]]), out
    assert out[2] == (True, 6 + 4), out  # its own student's six, and the four student 1 had left
