"""The teacher <-> student channel.

Teacher ranks never join the student's DeepSpeed world (AutoEP sizes itself from the
default process group), so both sides talk over a separate gloo group built on its own
TCPStore. It is not registered with torch.distributed; we call its send/recv directly.

Every message is a fixed-size int64 header followed by a known list of payload tensors.
The header carries the request id and a CRC32 of the request's token ids; responses echo
both and add a CRC32 of their own payload, so a mixed-up or corrupted reply is an error,
never silently used. Every wait has a timeout and names the peer rank and request id.

A peer whose process is gone surfaces as `PeerGone` and leaves the pairs between the other
ranks working, so students can move to another teacher replica (launch/replicas.py). A gloo
wait that times out, though, closes every pair of the caller's bridge: a teacher therefore
takes request headers (their own tag, from any student) in a thread that never times out,
watches each student's connection in another (`wait_gone`), and waits on those threads with
a timeout (teacher/service.py, RequestInbox).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

MAGIC = 0x50414444  # "PADD"
HEADER_LEN = 15
# Header fields (int64): magic, kind, request_id, step, batch, seqlen, arg, input_crc, payload_crc,
# n_payload, outputs (bitmask of OUT_*), the shapes of the optional outputs: n_layers,
# n_clusters (cluster activations) and hidden (final hidden states), and src (the sender's rank).
KIND_STOP = 0
KIND_TOPK_LOGITS = 1
KIND_RESULT = 2  # a JSON blob (e.g. the teacher's own evaluation) as uint8
KIND_SAMPLED_LOGITS = 3

OUT_LOGITS = 1          # sparse logits (always sent with a scoring request)
OUT_CLUSTER_ACTS = 2    # per-cluster mean FFN activation for the teacher's clustered layers
OUT_HIDDEN = 4          # final hidden states
OUT_CLUSTER_GATE = 8    # per-cluster mean gate pre-activation (the centroid router's logits, Stage I)

# Bridge tags of the messages that run beside the scoring requests (tag 0).
TAG_RESULT = 1  # the teacher's own held-out evaluation, collected by the main student at the end
TAG_STAGE1 = 2  # Stage I: the layer map / clusters (students -> teacher) and its records back
# The headers of scoring requests and STOPs (students -> teacher; their payloads follow on tag 0). A
# tag of their own, so a teacher can take them from any student (one that lost its replica included).
TAG_REQUEST = 3
# Never sent on: a receive posted here fails only when the peer's connection closes (`wait_gone`).
TAG_PROBE = 4
# A wait that must never time out: gloo's timeout would close every pair of the bridge.
FOREVER_S = 10 * 365 * 86400.0


class BridgeError(RuntimeError):
    """A failure on the teacher <-> student channel (timeout, dead peer, bad data)."""


class PeerGone(BridgeError):
    """The peer's connection closed: its process is gone (or its bridge broke). Unlike a
    timeout, this leaves the other pairs of the bridge usable."""


# How gloo reports a closed connection; "Application timeout caused pair closure" is our own
# timeout having closed every pair, not a peer that left.
_GONE = re.compile(r"closed by peer|reset by peer|connection (closed|reset)|broken pipe", re.I)


def crc32(*tensors: torch.Tensor) -> int:
    """CRC32 over the raw bytes of CPU tensors: cheap integrity and identity check."""
    c = 0
    for t in tensors:
        c = zlib.crc32(t.detach().contiguous().cpu().numpy().tobytes(), c)
    return c


@dataclass
class Header:
    kind: int
    request_id: int
    step: int = 0
    batch: int = 0
    seqlen: int = 0
    arg: int = 0
    input_crc: int = 0
    payload_crc: int = 0
    n_payload: int = 0
    outputs: int = 1
    n_layers: int = 0
    n_clusters: int = 0
    hidden: int = 0
    src: int = -1  # set by `send_message`: who sent it (a request may come from any student)

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([MAGIC, self.kind, self.request_id, self.step, self.batch, self.seqlen,
                             self.arg, self.input_crc, self.payload_crc, self.n_payload, self.outputs,
                             self.n_layers, self.n_clusters, self.hidden, self.src], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, peer: int) -> "Header":
        v = t.tolist()
        if v[0] != MAGIC:
            raise BridgeError(f"bridge: garbage header from rank {peer} (magic {v[0]:#x}); "
                              "is another program using the bridge port?")
        return cls(*v[1:])


class Bridge:
    """Point-to-point messaging between all ranks of the launch.

    Ranks are global launch ranks. Rank 0 hosts the store. `timeout_s` bounds every
    single wait; a peer that dies surfaces as a gloo error, reported with its rank.
    """

    def __init__(self, addr: str, port: int, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        td = timedelta(seconds=timeout_s)
        try:
            self.store = dist.TCPStore(addr, port, world_size, rank == 0, timeout=td,
                                       wait_for_workers=False, use_libuv=True)
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, td)
        except Exception as e:  # noqa: BLE001 - re-raise with where it happened
            raise BridgeError(f"bridge: rank {rank} could not connect to {addr}:{port} "
                              f"within {timeout_s:.0f}s ({type(e).__name__}: {e}). Check that every rank "
                              "was started and that topology.bridge_port is free.") from e

    # -- raw tensors -----------------------------------------------------------------------
    def _wait(self, work, what: str, peer: int, request_id: int, timeout_s: float | None):
        t = self.timeout_s if timeout_s is None else timeout_s
        try:
            ok = work.wait(timedelta(seconds=t))
        except Exception as e:  # noqa: BLE001
            raise _failed(e, f"bridge: {what} rank {peer} failed for request {request_id}",
                          f"peer dead or not answering within {t:.0f}s") from e
        if ok is False:
            raise BridgeError(f"bridge: {what} rank {peer} timed out after {t:.0f}s for request {request_id}")

    def _post(self, op, tensor: torch.Tensor, peer: int, tag: int, what: str, request_id: int):
        """Post a send/recv; gloo may fail right here when the peer is already gone."""
        try:
            return op([tensor], peer, tag)
        except Exception as e:  # noqa: BLE001
            raise _failed(e, f"bridge: {what} rank {peer} failed for request {request_id}", "peer dead?") from e

    def send_tensors(self, tensors: list[torch.Tensor], dst: int, request_id: int = -1, tag: int = 0) -> None:
        for t in tensors:
            work = self._post(self.pg.send, t.contiguous(), dst, tag, "sending to", request_id)
            self._wait(work, "sending to", dst, request_id, None)

    def recv_tensor(self, shape, dtype, src: int, request_id: int = -1,
                    timeout_s: float | None = None, tag: int = 0) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        work = self._post(self.pg.recv, t, src, tag, "receiving from", request_id)
        self._wait(work, "receiving from", src, request_id, timeout_s)
        return t

    # -- framed messages -------------------------------------------------------------------
    def send_message(self, header: Header, payload: list[torch.Tensor], dst: int, tag: int = 0,
                     header_tag: int | None = None) -> "PostedSend":
        """Post a framed message and return without waiting for the receiver; `header_tag`:
        the header's own tag when it differs from the payload's (requests: TAG_REQUEST).

        Gloo completes a send only once the peer posts the matching recv; waiting here
        would deadlock a student that prefetches against a teacher that is replying. Call
        `.wait()` on the result later (it keeps the tensors alive until then)."""
        header.n_payload, header.src = len(payload), self.rank
        if payload and header.payload_crc == 0:
            header.payload_crc = crc32(*payload)
        tensors = [header.to_tensor(), *[t.contiguous() for t in payload]]
        tags = [tag if header_tag is None else header_tag] + [tag] * len(payload)
        works = [self._post(self.pg.send, t, dst, g, "sending to", header.request_id) for t, g in zip(tensors, tags)]
        return PostedSend(self, works, tensors, dst, header.request_id)

    def recv_header(self, src: int, timeout_s: float | None = None, request_id: int = -1, tag: int = 0) -> Header:
        t = self.recv_tensor((HEADER_LEN,), torch.int64, src, request_id, timeout_s, tag)
        return Header.from_tensor(t, src)

    def recv_header_any(self, tag: int, timeout_s: float) -> Header:
        """The next header on `tag` from whichever rank sends one (its `src` says who).
        Gloo's wait cannot be interrupted and a timed-out one closes every pair of the bridge,
        so callers wait here from a thread of their own, with a timeout they never reach."""
        t = torch.empty((HEADER_LEN,), dtype=torch.int64)
        try:
            work = self.pg.recv_anysource([t], tag)
        except Exception as e:  # noqa: BLE001
            raise _failed(e, "bridge: receiving from any rank failed", "bridge broken?") from e
        self._wait(work, "receiving from", -1, -1, timeout_s)
        return Header.from_tensor(t, -1)

    def wait_gone(self, peer: int) -> BridgeError:
        """Block until `peer`'s connection closes, and return the error that said so: gloo
        fails a pending receive at once when its pair closes, and TAG_PROBE is never sent on.
        A rank that may wait on a receive from any source calls this from a thread per peer."""
        t = torch.empty((0,), dtype=torch.int64)
        try:
            self._wait(self._post(self.pg.recv, t, peer, TAG_PROBE, "watching", -1), "watching", peer, -1, FOREVER_S)
        except BridgeError as e:
            return e
        return BridgeError(f"bridge: rank {peer} sent on the probe tag {TAG_PROBE}, which is never sent on")

    def recv_payload(self, header: Header, specs: list[tuple[tuple[int, ...], torch.dtype]],
                     src: int, check_crc: bool = True, tag: int = 0) -> list[torch.Tensor]:
        if header.n_payload != len(specs):
            raise BridgeError(f"bridge: request {header.request_id} from rank {src} has "
                              f"{header.n_payload} payload tensors, expected {len(specs)}")
        out = [self.recv_tensor(s, d, src, header.request_id, tag=tag) for s, d in specs]
        if check_crc and out and crc32(*out) != header.payload_crc:
            raise BridgeError(f"bridge: payload checksum mismatch for request {header.request_id} "
                              f"from rank {src}: data corrupted in transit; refusing to use it")
        return out

    # -- small JSON blobs on a side tag ---------------------------------------------------------
    def post_json(self, obj, dst: int, tag: int) -> "PostedSend":
        """Post a JSON blob (the receiver may read it much later); `.wait()` before exiting."""
        import json
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        return self.send_message(Header(KIND_RESULT, 0, arg=data.numel()), [data], dst, tag)

    def recv_json(self, src: int, tag: int, timeout_s: float | None = None):
        import json
        h = self.recv_header(src, timeout_s, tag=tag)
        if h.kind != KIND_RESULT:
            raise BridgeError(f"bridge: expected a result message from rank {src}, got kind {h.kind}")
        (data,) = self.recv_payload(h, [((h.arg,), torch.uint8)], src, tag=tag)
        return json.loads(bytes(data.tolist()).decode())

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _failed(error: Exception, what: str, hint: str) -> BridgeError:
    """The error to raise for a failed gloo call: PeerGone when the peer's connection closed."""
    first = str(error).splitlines()[0] if str(error) else ""
    gone = bool(_GONE.search(first))
    first = first.split(" This is typically caused")[0] if gone else first  # gloo's boilerplate after the fact
    return (PeerGone if gone else BridgeError)(f"{what} ({type(error).__name__}: {first}); "
                                                f"{'peer gone' if gone else hint}")


class PostedSend:
    """Sends in flight; holds their tensors so they stay valid until gloo is done."""

    def __init__(self, bridge: Bridge, works, tensors, dst: int, request_id: int):
        self.bridge, self.works, self.tensors, self.dst, self.request_id = bridge, works, tensors, dst, request_id

    def wait(self, timeout_s: float | None = None) -> None:
        for w in self.works:
            self.bridge._wait(w, "sending to", self.dst, self.request_id, timeout_s)
        self.works, self.tensors = [], []
