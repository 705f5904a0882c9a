"""The teacher: a dense causal LM that scores student batches, on its own ranks or colocated.

Remote mode: `serve()` runs on a teacher rank and answers requests from the student ranks
it is assigned to (and from those of a lost replica that move to it) until each of them sends
STOP. `RemoteTeacher` is the student side; it keeps up to `prefetch` requests in flight so the
teacher computes step t+1 while the student trains on step t, and moves to another replica
when its own is lost. `LocalTeacher` has the same interface with the model in the
student process (one-process runs, and the baseline for measuring the bridge).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from padd_ds.launch.bridge import (FOREVER_S, KIND_SAMPLED_LOGITS, KIND_STOP, KIND_TOPK_LOGITS, OUT_CLUSTER_ACTS,
                                   OUT_CLUSTER_GATE, OUT_HIDDEN, OUT_LOGITS, TAG_REQUEST, Bridge, BridgeError, Header,
                                   PeerGone, crc32)
from padd_ds.launch.liveness import post_verdict_to
from padd_ds.launch.replicas import adopted_since, dead_ranks, declare_dead, next_replica, register_adoption
from padd_ds.models.loading import decoder_layers
from padd_ds.teacher.clusters import ClusterMap
from padd_ds.teacher.sparse import SparseLogits, encode_sampled, encode_topk

MODES = {KIND_TOPK_LOGITS: "topk", KIND_SAMPLED_LOGITS: "sampled"}
KINDS = {v: k for k, v in MODES.items()}


def compress(logits: torch.Tensor, k: int, mode: str, seed: int) -> SparseLogits:
    """Logits [N, V] of the scored positions -> their sparse rows [1, N, k], where the logits
    are (only these rows then leave the device, `to_host`). Sampling is seeded by the request,
    so it is reproducible (per device type and per number of scored rows)."""
    logits = logits.unsqueeze(0)
    if mode == "topk":
        return encode_topk(logits, k)
    gen = torch.Generator(device=logits.device).manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
    return encode_sampled(logits, k, gen)


def real_positions(lengths: torch.Tensor, L: int) -> torch.Tensor:
    """[B, L] bool: the non-padding positions of right-padded rows with true `lengths` [B]."""
    return torch.arange(L).unsqueeze(0) < lengths.cpu().unsqueeze(1)


def scored_positions(lengths: torch.Tensor, scored_from: torch.Tensor | None, L: int) -> torch.Tensor:
    """[B, L] bool: the real positions from each row's `scored_from` [B] on (None: all), the ones
    whose logits the request's consumer reads (a rollout's KD: its response positions)."""
    real = real_positions(lengths, L)
    return real if scored_from is None else real & (torch.arange(L).unsqueeze(0) >= scored_from.cpu().unsqueeze(1))


def to_host(tensors: list[torch.Tensor | None]) -> tuple[list[torch.Tensor | None], int]:
    """The tensors on the host and the bytes that crossed from the device, counted from the
    tensors themselves (on a CPU teacher: the bytes that would cross)."""
    return [None if t is None else t.cpu() for t in tensors], sum(t.numel() * t.element_size()
                                                                  for t in tensors if t is not None)


def spread(rows: SparseLogits, keep: torch.Tensor) -> SparseLogits:
    """Sparse rows [1, N, k] of the `keep` [B, L] positions -> the wire form [B, L, k], on the host.

    A position not scored (padding, or before the row's scored_from) carries the uniform distribution over tokens 0..k-1
    (values 0, lse log k, sampled weights 1/k): every consumer masks it out, some by
    multiplying by 0, so it must be a finite, valid distribution."""
    B, L, k = *keep.shape, rows.k
    values = torch.zeros((B, L, k), dtype=torch.float32)
    indices = torch.arange(k, dtype=torch.int32).expand(B, L, k).contiguous()
    lse = torch.full((B, L), math.log(k), dtype=torch.float32)
    weights = None if rows.weights is None else torch.full((B, L, k), 1.0 / k, dtype=torch.float32)
    out = SparseLogits(values, indices, lse, weights)
    for full, part in zip(out.tensors(), rows.tensors()):
        full[keep] = part[0]
    return out


@dataclass
class TeacherOutput:
    logits: SparseLogits
    cluster_acts: torch.Tensor | None = None  # [B, L, n_layers, N] mean SwiGLU activation per cluster
    hidden: torch.Tensor | None = None        # [B, L, H] final hidden states
    cluster_gate: torch.Tensor | None = None  # [B, L, n_layers, N] mean gate pre-activation per cluster

    def tensors(self) -> list[torch.Tensor]:
        return self.logits.tensors() + [t for t in (self.cluster_acts, self.hidden, self.cluster_gate)
                                        if t is not None]

    def to(self, device: str | torch.device) -> TeacherOutput:
        """On `device` (outputs arrive on the host, as the bridge carries them)."""
        move = (lambda t: None if t is None else t.to(device))
        return TeacherOutput(self.logits.to(device), move(self.cluster_acts), move(self.hidden),
                             move(self.cluster_gate))


def forward_outputs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, outputs: int,
                    cluster_map: ClusterMap | None, vocab_limit: int | None = None,
                    keep: torch.Tensor | None = None):
    """One teacher forward -> (logits, cluster activations, final hidden, cluster gate), all on
    the model's device; the last three are None unless requested.

    The logits are [N, V] fp32 for the N positions of `keep` [B, L] (default: the attended
    positions of `mask`), in row-major order: the LM head, the upcast and the compression run
    on those rows only (`head_only_on`). No KV cache is allocated: a scoring pass is one forward.

    `vocab_limit` (the student's vocab_size) drops the teacher's logit columns past it: when
    the tables differ only by padding (Qwen2.5 152064 rows vs Qwen3 151936, checked by
    config._check_padded_vocab) those rows are ids the student does not have, and an untrained
    padding row can land in the top-k. The target is then the teacher's distribution
    renormalised over the shared rows.

    Cluster activations are read at the input of each clustered layer's `down_proj`: that is
    the SwiGLU intermediate act(gate x) * (up x), one value per neuron, in every HF
    Llama/Qwen/Mistral-style MLP. The cluster gate is the output of `gate_proj` (before the
    activation) averaged over each cluster: the logit a router initialised at the cluster
    centroids (mean gate rows) gives this token - the Stage I router-fit target."""
    acts: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    keep = mask.bool() if keep is None else keep.to(mask.device)
    hooks = []
    if outputs & (OUT_CLUSTER_ACTS | OUT_CLUSTER_GATE):
        if cluster_map is None:
            raise BridgeError("cluster activations were requested but this teacher has no cluster map "
                              "(Stage I clustering has not run on the teacher ranks)")
        layers = decoder_layers(model)
        for i, li in enumerate(cluster_map.layers):
            mlp = layers[li].mlp
            if outputs & OUT_CLUSTER_ACTS:
                hooks.append(mlp.down_proj.register_forward_pre_hook(
                    lambda m, a, i=i: acts.__setitem__(i, a[0].detach())))
            if outputs & OUT_CLUSTER_GATE:
                hooks.append(mlp.gate_proj.register_forward_hook(
                    lambda m, a, o, i=i: gates.__setitem__(i, o.detach())))
    hooks.append(head_only_on(model, keep))
    try:
        out = model(input_ids=ids, attention_mask=mask, use_cache=False,
                    output_hidden_states=bool(outputs & OUT_HIDDEN))
    finally:
        for h in hooks:
            h.remove()

    def pooled(values: dict[int, torch.Tensor]) -> torch.Tensor:
        pool = cluster_map.pooling().to(values[0].device)
        return torch.stack([values[i].float() @ pool[i] for i in range(len(cluster_map.layers))], dim=2)

    cluster = pooled(acts) if outputs & OUT_CLUSTER_ACTS else None
    gate = pooled(gates) if outputs & OUT_CLUSTER_GATE else None
    hidden = out.hidden_states[-1].float() if outputs & OUT_HIDDEN else None
    logits = out.logits
    if vocab_limit is not None and logits.shape[-1] > vocab_limit:
        logits = logits[..., :vocab_limit]
    return logits.float(), cluster, hidden, gate


def head_only_on(model: torch.nn.Module, keep: torch.Tensor):
    """Make the model's LM head (its output embeddings, tied or not) see only the `keep` [B, L]
    rows of the final hidden states, [N, H]; returns the hook handle.

    A pre-hook rather than calling the decoder and the head ourselves: the model's own forward
    still runs end to end (a ZeRO-3 engine's gathers and hooks see the usual module order, and
    whatever a model applies after its head, e.g. a logit scale, still applies, per row).
    transformers' `logits_to_keep` keeps the same columns in every row, so it cannot drop
    right padding that differs per row."""
    head = getattr(model, "module", model).get_output_embeddings()

    def rows(module, args):
        h = args[0]
        if h.shape[:2] != keep.shape:
            raise RuntimeError(f"the LM head got hidden states {tuple(h.shape)}, expected [B, L] = "
                               f"{tuple(keep.shape)}: this model does not apply its head to the final hidden states")
        return (h[keep], *args[1:])
    return head.register_forward_pre_hook(rows)


class TeacherModel:
    """A loaded HF causal LM that turns token batches into sparse logits (and, on request,
    Stage I cluster activations and final hidden states)."""

    def __init__(self, model: torch.nn.Module, cluster_map: ClusterMap | None = None,
                 vocab_limit: int | None = None, pack: int = 1):
        self.model = model.eval()
        self.pack = pack  # requests one forward may score (service.serve packs what has arrived)
        self.device = next(model.parameters()).device
        self.cluster_map = cluster_map
        self.vocab_limit = vocab_limit  # the student's vocab_size (see forward_outputs)
        self.host_bytes = 0  # copied from the device to the host by `score`, all requests

    @torch.no_grad()
    def score(self, ids: torch.Tensor, lengths: torch.Tensor, k: int, mode: str = "topk",
              seed: int = 0, outputs: int = OUT_LOGITS, scored_from: torch.Tensor | None = None) -> TeacherOutput:
        """Right-padded ids [B, L] with true `lengths` [B] -> the requested outputs at every position
        (logits scored at the real positions from `scored_from` [B] on only: see `spread` for the others)."""
        return self.score_many([(ids, lengths, seed, scored_from)], k, mode, outputs)[0]

    @torch.no_grad()
    def score_many(self, requests: list[tuple], k: int, mode: str = "topk", outputs: int = OUT_LOGITS) -> list[TeacherOutput]:
        """Requests (ids [B, L], lengths [B], seed, scored_from [B] or None) in one forward: their
        rows stacked, right-padded to the longest; each request's logits compressed with its own
        seed, as `score` would."""
        L = max(r[0].shape[1] for r in requests)
        ids = torch.cat([torch.nn.functional.pad(r[0], (0, L - r[0].shape[1])) for r in requests])
        lengths = torch.cat([r[1] for r in requests])
        keep = torch.cat([scored_positions(r[1], r[3], L) for r in requests])
        mask = real_positions(lengths, L).long().to(self.device)
        logits, cluster, hidden, gate = forward_outputs(self.model, ids.to(self.device), mask, outputs,
                                                        self.cluster_map, self.vocab_limit, keep=keep)
        outs, row, pos = [], 0, 0
        for r_ids, r_lengths, seed, start in requests:
            b, l = r_ids.shape
            mine = keep[row:row + b, :l]
            n = int(keep[row:row + b].sum())
            part = [None if t is None else t[row:row + b, :l] for t in (cluster, hidden, gate)]
            (*sparse, c, h, g), n_bytes = to_host(compress(logits[pos:pos + n], k, mode, seed).tensors() + part)
            self.host_bytes += n_bytes
            outs.append(TeacherOutput(spread(SparseLogits.from_tensors(sparse), mine), c, h, g))
            row, pos = row + b, pos + n
        return outs


@dataclass
class ServeStats:
    requests: int = 0
    rounds: int = 0  # forwards: a sharded teacher packs several requests into one
    tokens: int = 0
    busy_s: float = 0.0
    idle_s: float = 0.0


@dataclass
class _Gone:
    rank: int
    error: BridgeError


class RequestInbox:
    """Request headers from any student, in arrival order, received by a thread of their own.

    A teacher cannot take requests round-robin from a fixed list: a replica that adopts the
    students of a lost one would block on its own student's next request while that student
    waits in an all-reduce for the adopted one. Gloo's receive-from-any cannot be interrupted
    (a timed-out gloo wait closes the whole bridge), and it does not fail when a sender dies,
    so one thread waits there, one thread per student waits for its connection to close, and
    the serve loop waits on their queue with a timeout."""

    def __init__(self, bridge: Bridge, timeout_s: float):
        self.bridge, self.timeout_s = bridge, timeout_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._held: deque = deque()  # taken from the queue by `more`, not yet handed out
        self._watched: set[int] = set()
        threading.Thread(target=self._receive, name="padd-requests", daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                self._queue.put(self.bridge.recv_header_any(TAG_REQUEST, FOREVER_S))
            except BaseException as e:  # noqa: BLE001 - handed to the serve loop, which raises it
                self._queue.put(e)
                return

    def watch(self, students: list[int]) -> None:
        """Report each of `students` whose connection closes (once per student)."""
        for s in students:
            if s not in self._watched:
                self._watched.add(s)
                threading.Thread(target=lambda s=s: self._queue.put(_Gone(s, self.bridge.wait_gone(s))),
                                 name=f"padd-watch-{s}", daemon=True).start()

    def next(self, waiting: list[int]) -> Header:
        """The next request header; `waiting`: the students that may still send (one of them
        lost ends the wait at once; a student that left after its STOP is no news)."""
        self.watch(waiting)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                item = self._held.popleft() if self._held else \
                    self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BridgeError(f"teacher: no request from student rank(s) {waiting} "
                                  f"within {self.timeout_s:.0f}s") from None
            if isinstance(item, _Gone):
                if item.rank in waiting:
                    raise BridgeError(f"teacher: student rank {item.rank} lost while this teacher waits "
                                      f"for its requests: {item.error}") from item.error
                continue
            if isinstance(item, BaseException):
                raise BridgeError(f"teacher: receiving requests failed: {item}") from item
            return item


    def more(self, like: Header, limit: int) -> list[Header]:
        """Up to `limit` requests that have already arrived and can share a forward with `like`
        (same kind, k and outputs), in arrival order; the first that cannot, and all after it,
        keep their place."""
        out: list[Header] = []
        while len(out) < limit:
            if not self._held:
                try:
                    self._held.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            item = self._held[0]
            if not (isinstance(item, Header) and (item.kind, item.arg, item.outputs) == (like.kind, like.arg, like.outputs)):
                break
            out.append(self._held.popleft())
        return out


class Clients:
    """The students a teacher answers until each sends STOP: its own, and those that moved to it
    when their replica was lost (they register in the store before sending, launch/replicas.py)."""

    def __init__(self, bridge: Bridge, own: list[int], name: str):
        self.bridge, self.name = bridge, name
        self.all, self.stopped = list(own), set()
        self._adoptions_read = 0

    def waiting(self) -> list[int]:
        return [s for s in self.all if s not in self.stopped]

    def expecting(self) -> bool:
        """Someone may still send; the store is read only when everyone known has stopped."""
        if not self.waiting():
            try:
                self._read_adoptions()
            except Exception:  # noqa: BLE001 - the store's host (student rank 0) has left: nobody can register now
                return False
        return bool(self.waiting())

    def heard(self, s: int) -> None:
        if s not in self.all:
            self._read_adoptions()
        if s not in self.all:  # registration comes first; so this is no student of ours
            raise BridgeError(f"{self.name}: request from rank {s}, which is not a student of this teacher")

    def stop(self, s: int) -> None:
        self.heard(s)
        self.stopped.add(s)

    def _read_adoptions(self) -> None:
        new = adopted_since(self.bridge.store, self.bridge.rank, self._adoptions_read)
        self._adoptions_read += len(new)
        for s in new:
            if s not in self.all:
                self.all.append(s)
                print(f"[{self.name}] now also serving student rank {s} (its teacher replica was lost)", flush=True)


def serve(bridge: Bridge, teacher: TeacherModel, students: list[int], idle_timeout_s: float,
          name: str = "teacher") -> ServeStats:
    """Answer scoring requests from `students` (global ranks), and from any student that moves
    here when its replica is lost, until each of them has sent STOP. Requests are answered in
    arrival order; each student gets its replies in the order it asked. A student waited for
    whose connection closes ends the teacher at once."""
    stats = ServeStats()
    inbox, clients = RequestInbox(bridge, idle_timeout_s), Clients(bridge, students, name)
    in_flight: deque = deque()  # replies posted but not yet taken by their student
    while clients.expecting():
        t0 = time.perf_counter()
        h = inbox.next(clients.waiting())
        stats.idle_s += time.perf_counter() - t0
        if h.kind == KIND_STOP:
            clients.stop(h.src)
            continue
        clients.heard(h.src)
        # A sharded teacher scores several requests in one forward, one per rank (teacher/sharded.py)
        pack = [h] + inbox.more(h, getattr(teacher, "pack", 1) - 1)
        for other in pack[1:]:
            clients.heard(other.src)
        t0 = time.perf_counter()
        in_flight.extend(answer(bridge, teacher, pack, stats))
        while len(in_flight) > 4 * len(clients.all):  # bound memory; old replies are long taken
            in_flight.popleft().wait(idle_timeout_s)
        stats.busy_s += time.perf_counter() - t0
    while in_flight:
        in_flight.popleft().wait(idle_timeout_s)
    return stats


def answer(bridge: Bridge, teacher, headers: list[Header], stats: ServeStats) -> list:
    """Score requests that share kind, k and outputs (each payload follows its header on tag 0)
    in one forward when the teacher packs them, and post each reply to its student."""
    inputs = [_request_payload(bridge, h) for h in headers]
    h0 = headers[0]
    batch = [(ids, lengths, h.request_id, start) for (ids, lengths, start), h in zip(inputs, headers)]
    if len(batch) > 1:
        outs = teacher.score_many(batch, h0.arg, MODES[h0.kind], outputs=h0.outputs)
    else:
        ids, lengths, seed, start = batch[0]
        outs = [teacher.score(ids, lengths, h0.arg, MODES[h0.kind], seed=seed, outputs=h0.outputs, scored_from=start)]
    stats.rounds += 1
    sends = []
    for h, (_, lengths, _), out in zip(headers, inputs, outs):
        per_cluster = out.cluster_acts if out.cluster_acts is not None else out.cluster_gate
        reply = Header(h.kind, h.request_id, h.step, h.batch, h.seqlen, h.arg, input_crc=h.input_crc,
                       outputs=h.outputs,
                       n_layers=per_cluster.shape[2] if per_cluster is not None else 0,
                       n_clusters=per_cluster.shape[3] if per_cluster is not None else 0,
                       hidden=out.hidden.shape[-1] if out.hidden is not None else 0)
        stats.requests += 1
        stats.tokens += int(lengths.sum())
        sends.append(bridge.send_message(reply, out.tensors(), h.src))
    return sends


def _request_payload(bridge: Bridge, h: Header) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A request's token ids, lengths and first scored positions, checked against the header's checksum."""
    s = h.src
    if h.kind not in MODES:
        raise BridgeError(f"teacher: unknown request kind {h.kind} from rank {s} (request {h.request_id})")
    ids, lengths, scored_from = bridge.recv_payload(
        h, [((h.batch, h.seqlen), torch.int64), ((h.batch,), torch.int64), ((h.batch,), torch.int64)], s)
    if crc32(ids) != h.input_crc:
        raise BridgeError(f"teacher: token-id checksum mismatch in request {h.request_id} "
                          f"from rank {s}; refusing to score corrupted input")
    return ids, lengths, scored_from


def describe(request_id: int) -> str:
    """Request ids carry the student rank in their high bits; spell both out in errors."""
    return f"request {request_id} (student {request_id >> 40}, #{request_id & ((1 << 40) - 1)})"


@dataclass
class _Pending:
    request_id: int
    step: int
    input_crc: int
    ids: torch.Tensor      # kept to re-send the request when its replica is lost
    lengths: torch.Tensor
    scored_from: torch.Tensor  # [B] first position each row's logits are read at
    outputs: int
    send: object = None  # PostedSend of the request


@dataclass
class ClientStats:
    wait_s: float = 0.0
    requests: int = 0
    bytes_received: int = 0
    history: list = field(default_factory=list)


class RemoteTeacher:
    """Student-side client of a teacher rank over the bridge (FIFO, `prefetch` in flight).

    `replicas`: the global ranks of every teacher replica (default: only `teacher_rank`).
    When this student's replica is lost (its connection closed), the client declares it dead
    in the launch's store, moves to the next live replica in order and re-sends what was in
    flight with the same request ids (so sampled logits draw the same seeds); only when no
    replica is left does it fail, naming the teacher. A sharded teacher is one replica."""

    def __init__(self, bridge: Bridge, teacher_rank: int, top_k: int, timeout_s: float, student_rank: int,
                 mode: str = "topk", replicas: list[int] | None = None):
        self.bridge, self.teacher_rank, self.top_k, self.timeout_s = bridge, teacher_rank, top_k, timeout_s
        self.kind = KINDS[mode]
        self.mode = mode
        self.replicas = list(replicas) if replicas else [teacher_rank]
        self.pending: deque[_Pending] = deque()
        self._abandoned: list = []  # sends to a lost replica: their tensors stay alive, never waited on
        # Request ids are unique across students: student rank in the high bits.
        self._next_id = student_rank << 40
        self.stats = ClientStats()

    def submit(self, step: int, ids: torch.Tensor, lengths: torch.Tensor, outputs: int = OUT_LOGITS,
               scored_from: torch.Tensor | None = None) -> int:
        """Ask for the teacher's outputs on `ids`; logits only at each row's positions from
        `scored_from` [B] on (None: every real position)."""
        ids = ids.to(torch.int64).contiguous()
        rid, self._next_id = self._next_id, self._next_id + 1
        start = torch.zeros(ids.shape[0], dtype=torch.int64) if scored_from is None else scored_from.to(torch.int64)
        p = _Pending(rid, step, crc32(ids), ids, lengths.to(torch.int64).contiguous(), start.cpu().contiguous(),
                     outputs | OUT_LOGITS)
        self.pending.append(p)
        try:
            self._post(p)
        except PeerGone as e:
            self._fail_over(e, f"sending {describe(rid)} (step {step})")  # re-sends p too
        except BridgeError as e:
            raise BridgeError(f"teacher rank {self.teacher_rank} unreachable when sending {describe(rid)} "
                              f"(step {step}): {e}") from e
        return rid

    def _post(self, p: _Pending) -> None:
        h = Header(self.kind, p.request_id, p.step, p.ids.shape[0], p.ids.shape[1], self.top_k,
                   input_crc=p.input_crc, outputs=p.outputs)
        p.send = self.bridge.send_message(h, [p.ids, p.lengths, p.scored_from], self.teacher_rank,
                                          header_tag=TAG_REQUEST)

    def result(self, request_id: int) -> TeacherOutput:
        if not self.pending or self.pending[0].request_id != request_id:
            raise BridgeError(f"student: request {request_id} is not the oldest in flight "
                              f"(pending: {[p.request_id for p in self.pending]})")
        p = self.pending[0]
        t0 = time.perf_counter()
        while True:
            try:
                out = self._receive(p)
                break
            except PeerGone as e:  # another replica takes over; ask it again
                self._fail_over(e, f"waiting for {describe(request_id)} (step {p.step})")
            except BridgeError as e:  # whichever step failed, say which teacher and which request
                raise BridgeError(f"teacher rank {self.teacher_rank} did not answer {describe(request_id)} "
                                  f"(step {p.step}) within {self.timeout_s:.0f}s: {e}") from e
        self.pending.popleft()
        self.stats.wait_s += time.perf_counter() - t0
        self.stats.requests += 1
        return out

    def _post_verdict(self, verdict: str) -> None:
        """Before this student leaves: its peers fail on its absence and report this, not a heartbeat."""
        try:
            post_verdict_to(self.bridge.store, f"{verdict} (seen by rank {self.bridge.rank} (student))")
        except Exception:  # noqa: BLE001 - the store is gone: each rank diagnoses on its own
            pass

    def _fail_over(self, error: PeerGone, what: str) -> None:
        """This student's replica is gone: declare it dead, move to the next live one and re-send
        everything in flight there; raises when no replica is left."""
        store = self.bridge.store
        while True:
            lost = self.teacher_rank
            dead = dead_ranks(store, self.replicas) | {lost}
            nxt = next_replica(self.replicas, lost, dead)
            if nxt is None:
                lost_all = f" (teacher ranks {sorted(dead)} lost)" if len(self.replicas) > 1 else ""
                self._post_verdict(f"no teacher replica is left{lost_all}" if lost_all
                                   else f"lost rank {lost} (teacher): its connections closed")
                raise BridgeError(f"teacher rank {lost} lost while {what}, and no teacher replica is left"
                                  f"{lost_all}: {error}") from error
            declare_dead(store, lost)
            register_adoption(store, nxt, self.bridge.rank)  # before sending: it must expect our STOP
            alive = len(self.replicas) - len(dead)
            print(f"[failover] student rank {self.bridge.rank}: teacher rank {lost} lost while {what} ({error}); "
                  f"its requests go to teacher rank {nxt}: {alive} of {len(self.replicas)} teacher replicas "
                  f"left, teacher throughput {alive}/{len(self.replicas)}", flush=True)
            self._abandoned.extend(p.send for p in self.pending)
            self.teacher_rank = nxt
            try:
                for p in self.pending:  # same request ids: sampled logits draw the same seeds
                    self._post(p)
                return
            except PeerGone as e:
                error = e

    def replicas_alive(self) -> int:
        """Teacher replicas not declared dead (read from the launch's store)."""
        return len(self.replicas) - len(dead_ranks(self.bridge.store, self.replicas))

    def health(self) -> dict:
        """Metrics of the teacher side for a log row: with replicas, how many are alive."""
        return {"teacher/replicas_alive": self.replicas_alive()} if len(self.replicas) > 1 else {}

    def _receive(self, p: _Pending) -> TeacherOutput:
        h = self.bridge.recv_header(self.teacher_rank, self.timeout_s, p.request_id)
        if h.request_id != p.request_id or h.input_crc != p.input_crc:
            raise BridgeError(f"teacher rank {self.teacher_rank} answered request {h.request_id} "
                              f"(input crc {h.input_crc:#x}) but request {p.request_id} "
                              f"(input crc {p.input_crc:#x}) was expected")
        B, L = p.ids.shape
        specs = SparseLogits.specs(B, L, h.arg, sampled=h.kind == KIND_SAMPLED_LOGITS)
        n_logit = len(specs)
        if h.outputs & OUT_CLUSTER_ACTS:
            specs.append(((B, L, h.n_layers, h.n_clusters), torch.float32))
        if h.outputs & OUT_HIDDEN:
            specs.append(((B, L, h.hidden), torch.float32))
        if h.outputs & OUT_CLUSTER_GATE:
            specs.append(((B, L, h.n_layers, h.n_clusters), torch.float32))
        tensors = self.bridge.recv_payload(h, specs, self.teacher_rank)
        p.send.wait(self.timeout_s)  # answered, so our request was fully received
        self.stats.bytes_received += sum(t.numel() * t.element_size() for t in tensors)
        extra = iter(tensors[n_logit:])
        return TeacherOutput(SparseLogits.from_tensors(tensors[:n_logit]),
                             next(extra) if h.outputs & OUT_CLUSTER_ACTS else None,
                             next(extra) if h.outputs & OUT_HIDDEN else None,
                             next(extra) if h.outputs & OUT_CLUSTER_GATE else None)

    def close(self) -> None:
        """Tell the teacher this student is done (after draining what is in flight). A replica
        lost after answering everything needs no STOP: it is declared dead and skipped."""
        while self.pending:
            self.result(self.pending[0].request_id)
        try:
            self.bridge.send_message(Header(KIND_STOP, -1), [], self.teacher_rank,
                                     header_tag=TAG_REQUEST).wait(self.timeout_s)
        except PeerGone as e:
            if len(self.replicas) > 1:
                declare_dead(self.bridge.store, self.teacher_rank)
                print(f"[failover] student rank {self.bridge.rank}: teacher rank {self.teacher_rank} lost after "
                      f"answering all requests ({e}); nothing left to ask it", flush=True)
                return
            raise BridgeError(f"teacher rank {self.teacher_rank} unreachable when sending STOP: {e}") from e
        except BridgeError as e:
            raise BridgeError(f"teacher rank {self.teacher_rank} unreachable when sending STOP: {e}") from e


class LocalTeacher:
    """Colocated teacher: same interface, computed in this process on `result()`."""

    def health(self) -> dict:
        return {}

    def __init__(self, teacher: TeacherModel, top_k: int, mode: str = "topk"):
        self.teacher, self.top_k, self.mode = teacher, top_k, mode
        self.pending: deque[tuple[int, torch.Tensor, torch.Tensor, int]] = deque()
        self._next_id = 0
        self.stats = ClientStats()

    def submit(self, step: int, ids: torch.Tensor, lengths: torch.Tensor, outputs: int = OUT_LOGITS,
               scored_from: torch.Tensor | None = None) -> int:
        rid, self._next_id = self._next_id, self._next_id + 1
        self.pending.append((rid, ids.to(torch.int64), lengths.to(torch.int64), outputs | OUT_LOGITS, scored_from))
        return rid

    def result(self, request_id: int) -> TeacherOutput:
        rid, ids, lengths, outputs, scored_from = self.pending.popleft()
        if rid != request_id:
            raise RuntimeError(f"local teacher: request {request_id} is not the oldest ({rid})")
        t0 = time.perf_counter()
        out = self.teacher.score(ids, lengths, self.top_k, self.mode, seed=rid, outputs=outputs,
                                 scored_from=scored_from)
        self.stats.wait_s += time.perf_counter() - t0
        self.stats.requests += 1
        return out

    def close(self) -> None:
        self.pending.clear()
