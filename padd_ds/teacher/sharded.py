"""A teacher ZeRO-3-partitioned over the teacher ranks (`teacher.parallel: zero3`).

The teacher ranks form their own torch.distributed world (never the students'). The leader
(teacher rank 0) talks to the students over the bridge. For each batch it broadcasts the
token ids to the group. Every rank scores a contiguous slice of rows; ZeRO-3 gathers each
layer's weights just in time, so no rank ever holds the whole model. The leader then
gathers the top-k slices. A rank whose slice is empty (fewer rows than ranks) still joins
each forward on a single token (see `_forward`). Members run `member_loop()` until the leader's `stop()`.
"""

from __future__ import annotations

import math

import torch

from padd_ds.launch.comm import broadcast_, gather
from padd_ds.launch.device import rank_device
from padd_ds.launch.bridge import OUT_CLUSTER_ACTS, OUT_CLUSTER_GATE, OUT_HIDDEN
from padd_ds.teacher.service import TeacherOutput, compress, forward_outputs, real_positions, spread, to_host
from padd_ds.teacher.sparse import SparseLogits

_STOP = 0
_MODES = {1: "topk", 2: "sampled"}


class ShardedTeacher:
    def __init__(self, model: torch.nn.Module, bf16: bool = False, cluster_map=None, vocab_limit: int | None = None):
        import deepspeed
        import deepspeed.comm as dist

        ds = {"train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "bf16": {"enabled": bf16}}
        partition_on_device(model, ds)
        self.engine = deepspeed.initialize(model=model, config=ds)[0]
        self.engine.eval()
        self.model = self.engine.module
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.cluster_map = cluster_map
        self.vocab_limit = vocab_limit  # the student's vocab_size (service.forward_outputs)
        self.host_bytes = 0  # this rank's device-to-host copies (service.TeacherModel.host_bytes)

    # -- leader -----------------------------------------------------------------------------
    def score(self, ids: torch.Tensor, lengths: torch.Tensor, k: int, mode: str = "topk",
              seed: int = 0, outputs: int = 1):
        if self.rank != 0:
            raise RuntimeError("only teacher rank 0 takes requests; the others run member_loop()")

        code = {v: c for c, v in _MODES.items()}[mode]
        broadcast_(torch.tensor([code, ids.shape[0], ids.shape[1], k, seed, outputs], dtype=torch.int64), 0)
        broadcast_(ids.contiguous(), 0)
        broadcast_(lengths.contiguous(), 0)
        return self._score(ids, lengths, k, mode, seed, outputs)

    def stop(self) -> None:
        if self.rank == 0:
            broadcast_(torch.tensor([_STOP, 0, 0, 0, 0, 0], dtype=torch.int64), 0)

    # -- every rank -------------------------------------------------------------------------
    def member_loop(self) -> int:
        """Score the leader's batches until it stops; returns how many were scored."""
        n = 0
        while True:
            head = torch.empty(6, dtype=torch.int64)
            broadcast_(head, 0)
            kind, b, l, k, seed, outputs = head.tolist()
            if kind == _STOP:
                return n
            ids = torch.empty((b, l), dtype=torch.int64)
            lengths = torch.empty((b,), dtype=torch.int64)
            broadcast_(ids, 0)
            broadcast_(lengths, 0)
            self._score(ids, lengths, k, _MODES[kind], seed, outputs)
            n += 1

    @torch.no_grad()
    def _score(self, ids: torch.Tensor, lengths: torch.Tensor, k: int, mode: str, seed: int, outputs: int):
        B, L = ids.shape
        chunk = math.ceil(B / self.size)
        lo, hi = min(self.rank * chunk, B), min((self.rank + 1) * chunk, B)
        mine = self._forward(ids[lo:hi], lengths[lo:hi], k, mode, seed, outputs)
        parts = []
        for t in mine:  # every rank sends [chunk, L, ...]: a rank without rows sends zeros
            pad = torch.zeros((chunk, L, *t.shape[2:]), dtype=t.dtype)
            pad[:hi - lo] = t[:hi - lo]
            parts.append(gather(pad, dst=0))
        if self.rank != 0:
            return None
        full = [torch.cat(p, 0)[:B].contiguous() for p in parts]
        n_logit = len(SparseLogits.specs(B, L, k, mode == "sampled"))
        extra = iter(full[n_logit:])
        return TeacherOutput(SparseLogits.from_tensors(full[:n_logit]),
                             next(extra) if outputs & OUT_CLUSTER_ACTS else None,
                             next(extra) if outputs & OUT_HIDDEN else None,
                             next(extra) if outputs & OUT_CLUSTER_GATE else None)

    def _forward(self, ids: torch.Tensor, lengths: torch.Tensor, k: int, mode: str, seed: int,
                 outputs: int) -> list[torch.Tensor]:
        """This rank's rows -> its wire tensors on the host ([rows, L, ...]; see _score).

        A rank without rows still runs the forward, since ZeRO-3's parameter gathers are
        collective, but on one token, with its head on zero rows and nothing compressed:
        transformers cannot run a batch of zero rows (attention reshapes [0, L, -1, d])."""
        dev, dummy = rank_device(), ids.shape[0] == 0
        if dummy:
            ids, keep = torch.zeros((1, 1), dtype=torch.int64), torch.zeros((1, 1), dtype=torch.bool)
            mask = torch.ones((1, 1), dtype=torch.int64)
        else:
            keep = real_positions(lengths, ids.shape[1])
            mask = keep.long()
        logits, *extras = forward_outputs(self.engine, ids.to(dev), mask.to(dev), outputs,
                                          self.cluster_map, self.vocab_limit, keep=keep)
        # each slice its own draws; only the scored rows leave the device
        sparse = [] if dummy else compress(logits, k, mode, seed * 1009 + self.rank).tensors()
        host, n_bytes = to_host(sparse + [t for t in extras if t is not None])
        self.host_bytes += n_bytes
        sparse, extras = host[:len(sparse)], host[len(sparse):]
        if dummy:  # zero rows of each wire tensor
            return [torch.zeros(shape, dtype=dt) for shape, dt in SparseLogits.specs(0, 1, k, mode == "sampled")] \
                + [t[:0] for t in extras]
        return spread(SparseLogits.from_tensors(sparse), keep).tensors() + extras


def partition_on_device(model: torch.nn.Module, ds: dict) -> None:
    """Partition a teacher read on the host over the teacher ranks, one parameter at a time
    onto the rank's device (`deepspeed.initialize` would first move the whole model to one
    device: 145 GB for a 72B teacher); buffers, which ZeRO-3 does not partition, follow."""
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path=ds)
    for b in model.buffers():
        b.data = b.data.to(rank_device())
