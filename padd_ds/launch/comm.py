"""Collectives on host (CPU) tensors under any backend.

Counters, flags, token ids and Stage I statistics live on the CPU. gloo reduces them where
they are; NCCL only takes GPU tensors. These helpers stage a tensor through the backend's
device when it lives elsewhere (the rank's device under NCCL, the host under gloo) and copy
the result back in place, so the same call is right under gloo on a laptop and NCCL on a
cluster, for host and device tensors alike.
"""

from __future__ import annotations

import torch

from padd_ds.launch.device import rank_device


def comm_device() -> torch.device:
    """Where collectives run: the rank's device under NCCL, the host under gloo (which
    reduces host tensors)."""
    import torch.distributed as tdist

    return rank_device() if tdist.get_backend() == "nccl" else torch.device("cpu")


def _staged(t: torch.Tensor, op) -> None:
    dev = comm_device()
    if t.device == dev:
        op(t)
        return
    tmp = t.to(dev)
    op(tmp)
    t.copy_(tmp.to(t.device))


def all_reduce_(t: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """In-place all-reduce (SUM by default) of `t` wherever it lives; returns `t`."""
    import deepspeed.comm as dist

    op = dist.ReduceOp.SUM if op is None else op
    _staged(t, lambda x: dist.all_reduce(x, op=op, group=group))
    return t


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    """In-place broadcast of `t` from rank `src`; returns `t`."""
    import deepspeed.comm as dist

    _staged(t, lambda x: dist.broadcast(x, src))
    return t


def gather(t: torch.Tensor, dst: int) -> list[torch.Tensor] | None:
    """Every rank's `t` (same shape and dtype) on rank `dst`, as host tensors; None elsewhere."""
    import deepspeed.comm as dist

    dev = comm_device()
    x = t.to(dev)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())] if dist.get_rank() == dst else None
    dist.gather(x, out, dst=dst)
    return None if out is None else [o.to(t.device) for o in out]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of floats over all ranks (float64)."""
    return all_reduce_(torch.tensor(values, dtype=torch.float64)).tolist()


def all_max(values: list[float]) -> list[float]:
    """Element-wise maximum of a list of floats over all ranks (float64)."""
    import deepspeed.comm as dist

    return all_reduce_(torch.tensor(values, dtype=torch.float64), op=dist.ReduceOp.MAX).tolist()
