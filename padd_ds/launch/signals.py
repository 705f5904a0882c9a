"""Preemption: SIGUSR1 (SLURM's warning before a time limit or preemption, see
slurm/launch.sh) or SIGTERM makes every student rank finish its current step, write a
checkpoint and exit 0; the requeued job resumes from it (train.resume=auto).

`install()` runs first thing in train.py, so a signal during model loading is remembered
rather than killing the process. A signal may reach the ranks at different moments (or
only some of them), so the decision is collective: after each optimiser step every student
rank contributes its flag to one all-reduce (MAX) in `agreed()`, and all of them stop after
the same step. Teacher ranks only remember the signal: they keep serving until their
students, checkpoint written, say STOP.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_received: list[int] = []


def _handler(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
    if signum == signal.SIGTERM and signal.SIGTERM in _received:
        # A second SIGTERM (a launcher tearing the job down, or SLURM's KillWait) ends the
        # process at once: graceful once, never unkillable.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
    _received.append(signum)


def install() -> None:
    for s in SIGNALS:
        signal.signal(s, _handler)


def received() -> bool:
    return bool(_received)


def agreed() -> bool:
    """True on every student rank once any of them got the signal (collective)."""
    # Imported here: train.py installs the handlers before torch loads (a signal during the
    # imports is then remembered, not fatal).
    import deepspeed.comm as dist
    import torch

    from padd_ds.launch.comm import all_reduce_

    flag = torch.tensor([1 if _received else 0], dtype=torch.int64)
    all_reduce_(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
