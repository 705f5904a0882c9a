"""A teacher ZeRO-3-partitioned over the teacher ranks (`teacher.parallel: zero3`).

The teacher ranks form their own torch.distributed world (never the students'). The leader
(teacher rank 0) talks to the students over the bridge. For each batch it broadcasts the
token ids to the group. Every rank scores a contiguous slice of rows; ZeRO-3 gathers each
layer's weights just in time, so no rank ever holds the whole model. The leader then
gathers the top-k slices. Members run `member_loop()` until the leader's `stop()`.
"""

from __future__ import annotations

import math

import torch

from padd_ds.launch.comm import broadcast_, gather
from padd_ds.launch.device import rank_device
from padd_ds.teacher.service import TeacherOutput, compress, forward_outputs
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
        # Every rank must run the forward (ZeRO-3 gathers are collective); a rank without
        # rows scores row 0 and throws the result away.
        rows = slice(lo, hi) if hi > lo else slice(0, 1)
        mask = (torch.arange(L).unsqueeze(0) < lengths[rows].unsqueeze(1)).long()
        dev = rank_device()
        logits, cluster, hidden, gate = forward_outputs(self.engine, ids[rows].to(dev), mask.to(dev), outputs,
                                                        self.cluster_map, self.vocab_limit)
        sl = compress(logits, k, mode, seed * 1009 + self.rank)  # each slice its own draws
        mine = sl.tensors() + [t for t in (cluster, hidden, gate) if t is not None]
        n_mine = hi - lo
        parts = []
        for t in mine:
            pad = torch.zeros((chunk, *t.shape[1:]), dtype=t.dtype)
            pad[:n_mine] = t[:n_mine]
            parts.append(gather(pad, dst=0))
        if self.rank != 0:
            return None
        full = [torch.cat(p, 0)[:B].contiguous() for p in parts]
        n_logit = len(sl.tensors())
        extra = iter(full[n_logit:])
        return TeacherOutput(SparseLogits.from_tensors(full[:n_logit]),
                             next(extra) if cluster is not None else None,
                             next(extra) if hidden is not None else None,
                             next(extra) if gate is not None else None)


def partition_on_device(model: torch.nn.Module, ds: dict) -> None:
    """Partition a teacher read on the host over the teacher ranks, one parameter at a time
    onto the rank's device (`deepspeed.initialize` would first move the whole model to one
    device: 145 GB for a 72B teacher); buffers, which ZeRO-3 does not partition, follow."""
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path=ds)
    for b in model.buffers():
        b.data = b.data.to(rank_device())
