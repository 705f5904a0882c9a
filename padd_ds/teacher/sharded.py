"""A teacher ZeRO-3-partitioned over the teacher ranks (`teacher.parallel: zero3`).

The teacher ranks form their own torch.distributed world (never the students'). The leader
(teacher rank 0) talks to the students over the bridge. Each round it broadcasts up to one
request per rank (service.serve packs the requests that have arrived); rank j scores request
j whole, so an answer never depends on what shared its round (a replica gives the same one),
and with one-sequence requests (the paper recipes' micro-batch of 1) every rank is busy
instead of one. ZeRO-3 gathers each layer's weights just in time, so no rank ever holds the
whole model. The leader then gathers the answers. A rank without a request still joins each
forward on a single token (see `_forward`). Members run `member_loop()` until the leader's `stop()`.
"""

from __future__ import annotations

import torch

from padd_ds.launch.comm import broadcast_, gather
from padd_ds.launch.device import rank_device
from padd_ds.launch.bridge import OUT_CLUSTER_ACTS, OUT_CLUSTER_GATE, OUT_HIDDEN
from padd_ds.teacher.service import (TeacherOutput, compress, forward_outputs, real_positions, scored_positions, spread,
                                     to_host)
from padd_ds.teacher.sparse import SparseLogits

_STOP = 0
_MODES = {1: "topk", 2: "sampled"}


def zero3_config(bf16: bool) -> dict:
    """The teacher group's DeepSpeed config: ZeRO-3 inference, every parameter partitioned."""
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": bf16}}


class ShardedTeacher:
    def __init__(self, model: torch.nn.Module, bf16: bool = False, cluster_map=None, vocab_limit: int | None = None):
        """`model`: loaded partitioned (models/loading.load_partitioned_causal_lm with
        `zero3_config(bf16)`), or whole on the host, then partitioned here."""
        import deepspeed
        import deepspeed.comm as dist

        ds = zero3_config(bf16)
        if not all(hasattr(p, "ds_id") for p in model.parameters()):
            partition_on_device(model, ds)
        self.engine = deepspeed.initialize(model=model, config=ds)[0]
        self.engine.eval()
        self.model = self.engine.module
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.cluster_map = cluster_map
        self.vocab_limit = vocab_limit  # the student's vocab_size (service.forward_outputs)
        self.host_bytes = 0  # this rank's device-to-host copies (service.TeacherModel.host_bytes)

    # -- leader -----------------------------------------------------------------------------
    @property
    def pack(self) -> int:
        """How many requests one forward scores: one per rank (service.serve packs them)."""
        return self.size

    def score(self, ids: torch.Tensor, lengths: torch.Tensor, k: int, mode: str = "topk",
              seed: int = 0, outputs: int = 1, scored_from: torch.Tensor | None = None) -> TeacherOutput:
        return self.score_many([(ids, lengths, seed, scored_from)], k, mode, outputs)[0]

    def score_many(self, requests: list[tuple], k: int, mode: str = "topk", outputs: int = 1) -> list[TeacherOutput]:
        """Requests (ids [B, L], lengths [B], seed[, scored_from [B] or None]), at most one per
        rank, scored in one round: request j wholly on rank j, so each answer is the one a
        replica gives it, whatever else shares the round."""
        if self.rank != 0:
            raise RuntimeError("only teacher rank 0 takes requests; the others run member_loop()")
        if not 0 < len(requests) <= self.size:
            raise ValueError(f"a round scores 1 to {self.size} requests (one per teacher rank), got {len(requests)}")
        code = {v: c for c, v in _MODES.items()}[mode]
        requests = [(ids, lengths, seed, _starts(ids, rest)) for ids, lengths, seed, *rest in requests]
        broadcast_(torch.tensor([code, len(requests), k, outputs], dtype=torch.int64), 0)
        broadcast_(torch.tensor([[ids.shape[0], ids.shape[1], seed] for ids, _, seed, _ in requests],
                                dtype=torch.int64), 0)
        for ids, lengths, _, start in requests:
            broadcast_(ids.contiguous(), 0)
            broadcast_(lengths.contiguous(), 0)
            broadcast_(start.contiguous(), 0)
        return self._round(requests, k, mode, outputs)

    def stop(self) -> None:
        if self.rank == 0:
            broadcast_(torch.tensor([_STOP, 0, 0, 0], dtype=torch.int64), 0)

    # -- every rank -------------------------------------------------------------------------
    def member_loop(self) -> tuple[int, int]:
        """Score the leader's rounds until it stops; returns (rounds, requests this rank scored)."""
        rounds = mine = 0
        while True:
            head = torch.empty(4, dtype=torch.int64)
            broadcast_(head, 0)
            kind, n, k, outputs = head.tolist()
            if kind == _STOP:
                return rounds, mine
            shapes = torch.empty((n, 3), dtype=torch.int64)
            broadcast_(shapes, 0)
            requests = []
            for b, l, seed in shapes.tolist():
                ids, lengths = torch.empty((b, l), dtype=torch.int64), torch.empty((b,), dtype=torch.int64)
                start = torch.empty((b,), dtype=torch.int64)
                for t in (ids, lengths, start):
                    broadcast_(t, 0)
                requests.append((ids, lengths, seed, start))
            self._round(requests, k, _MODES[kind], outputs)
            rounds, mine = rounds + 1, mine + (self.rank < n)

    @torch.no_grad()
    def _round(self, requests: list, k: int, mode: str, outputs: int) -> list[TeacherOutput] | None:
        """Rank j scores request j (a rank past the last one joins on a dummy token: ZeRO-3's
        gathers are collective); the leader gathers every answer, padded to the round's largest."""
        if self.rank < len(requests):
            ids, lengths, seed, start = requests[self.rank]
        else:
            ids, lengths, seed, start = (torch.zeros((0, 1), dtype=torch.int64), torch.zeros((0,), dtype=torch.int64), 0,
                                         torch.zeros((0,), dtype=torch.int64))
        mine = self._forward(ids, lengths, start, k, mode, seed, outputs)
        B = max(r[0].shape[0] for r in requests)
        L = max(r[0].shape[1] for r in requests)
        parts = []
        for t in mine:  # every rank sends [B, L, ...] (zeros past its own rows and columns)
            pad = torch.zeros((B, L, *t.shape[2:]), dtype=t.dtype)
            pad[:t.shape[0], :t.shape[1]] = t
            parts.append(gather(pad, dst=0))
        if self.rank != 0:
            return None
        n_logit = len(SparseLogits.specs(B, L, k, mode == "sampled"))
        out = []
        for j, (ids, *_) in enumerate(requests):
            b, l = ids.shape
            full = [p[j][:b, :l].contiguous() for p in parts]
            extra = iter(full[n_logit:])
            out.append(TeacherOutput(SparseLogits.from_tensors(full[:n_logit]),
                                     next(extra) if outputs & OUT_CLUSTER_ACTS else None,
                                     next(extra) if outputs & OUT_HIDDEN else None,
                                     next(extra) if outputs & OUT_CLUSTER_GATE else None))
        return out

    def _forward(self, ids: torch.Tensor, lengths: torch.Tensor, start: torch.Tensor, k: int, mode: str, seed: int,
                 outputs: int) -> list[torch.Tensor]:
        """This rank's request -> its wire tensors on the host ([B, L, ...]; see _round).

        A rank without a request still runs the forward, since ZeRO-3's parameter gathers are
        collective, but on one token, with its head on zero rows and nothing compressed:
        transformers cannot run a batch of zero rows (attention reshapes [0, L, -1, d])."""
        dev, dummy = rank_device(), ids.shape[0] == 0
        if dummy:
            ids, keep = torch.zeros((1, 1), dtype=torch.int64), torch.zeros((1, 1), dtype=torch.bool)
            mask = torch.ones((1, 1), dtype=torch.int64)
        else:
            keep = scored_positions(lengths, start, ids.shape[1])
            mask = real_positions(lengths, ids.shape[1]).long()
        logits, *extras = forward_outputs(self.engine, ids.to(dev), mask.to(dev), outputs,
                                          self.cluster_map, self.vocab_limit, keep=keep)
        # the request's own seed, as a replica draws it; only the scored rows leave the device
        sparse = [] if dummy else compress(logits, k, mode, seed).tensors()
        host, n_bytes = to_host(sparse + [t for t in extras if t is not None])
        self.host_bytes += n_bytes
        sparse, extras = host[:len(sparse)], host[len(sparse):]
        if dummy:  # zero rows of each wire tensor
            return [torch.zeros(shape, dtype=dt) for shape, dt in SparseLogits.specs(0, 1, k, mode == "sampled")] \
                + [t[:0] for t in extras]
        return spread(SparseLogits.from_tensors(sparse), keep).tensors() + extras


def _starts(ids: torch.Tensor, rest: list) -> torch.Tensor:
    """A request's scored_from [B] (every real position when it gives none)."""
    start = rest[0] if rest else None
    return torch.zeros(ids.shape[0], dtype=torch.int64) if start is None else start.to(torch.int64).cpu()


def partition_on_device(model: torch.nn.Module, ds: dict) -> None:
    """Partition a teacher read on the host over the teacher ranks, one parameter at a time
    onto the rank's device (`deepspeed.initialize` would first move the whole model to one
    device: 145 GB for a 72B teacher); buffers, which ZeRO-3 does not partition, follow."""
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path=ds)
    for b in model.buffers():
        b.data = b.data.to(rank_device())
