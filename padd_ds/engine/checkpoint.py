"""Checkpoints that a killed job can never leave half-written, and exact resume.

    save(engine, ckpt_dir, step, state, keep_last=2)   # every student rank calls it
    found = latest_valid(ckpt_dir)                     # newest complete checkpoint, or None
    state = load(engine, ckpt_dir, found)              # this rank's resume state

DeepSpeed writes each rank's shards into `<dir>/.tmp-step_N`; after a barrier the main rank
writes `padd_complete.json` there (step, and every file with its size), renames the
directory to `step_N` (atomic on POSIX), then replaces `latest`. A directory without the
marker, or whose files no longer match it, is skipped on resume with a warning naming it
and the checkpoint used instead. Only the newest `keep_last` complete checkpoints are kept.

`state` holds what DeepSpeed does not: the step (= the data position, see BatchPlan), every
rank's RNG states (python, numpy, torch and, on a GPU, CUDA's: rollouts are sampled), and the
trainer's own objects (Stage IV bias and advantage EMAs, the router snapshot for drift). It is
gathered from all ranks into the main rank's DeepSpeed client state, so each rank gets its own
RNG back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from padd_ds.launch.device import on_gpu

MARKER = "padd_complete.json"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if on_gpu():  # rollouts sample on the rank's GPU, from its own generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"])


def _files(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file() and p.name != MARKER}


def save(engine, ckpt_dir: str | os.PathLike, step: int, state: dict, keep_last: int) -> Path:
    import deepspeed.comm as dist

    ckpt_dir = Path(ckpt_dir)
    rank = dist.get_rank()
    per_rank = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(per_rank, _rng_state())  # the students' world
    tmp_tag, tag = f".tmp-step_{step}", f"step_{step}"
    if rank == 0 and (ckpt_dir / tmp_tag).exists():
        shutil.rmtree(ckpt_dir / tmp_tag)  # a leftover of a save that was killed
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False,
                           client_state={"padd": {"step": step, "rng": per_rank, **state}})
    dist.barrier()
    final = ckpt_dir / tag
    if rank == 0:
        tmp = ckpt_dir / tmp_tag
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": _files(tmp)}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = ckpt_dir / ".latest.tmp"
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, ckpt_dir / "latest")
        complete = sorted((d for d in ckpt_dir.glob("step_*") if (d / MARKER).exists()),
                          key=lambda d: int(d.name.split("_")[1]))
        for old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _valid(d: Path) -> tuple[bool, str]:
    m = d / MARKER
    if not m.exists():
        return False, "no completion marker (the save was interrupted)"
    try:
        want = json.loads(m.read_text())["files"]
    except (ValueError, KeyError) as e:
        return False, f"unreadable marker ({e})"
    have = _files(d)
    if have != want:
        missing = sorted(set(want) - set(have))
        changed = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        return False, f"files differ from the marker (missing {missing[:3]}, resized {changed[:3]})"
    return True, ""


def latest_valid(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint; newer broken ones are reported on stderr and skipped."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    cands = sorted((d for d in ckpt_dir.iterdir() if d.is_dir() and (d.name.startswith("step_")
                                                                     or d.name.startswith(".tmp-step_"))),
                   key=lambda d: int(d.name.rsplit("_", 1)[1]), reverse=True)
    skipped = []
    for d in cands:
        ok, why = _valid(d) if d.name.startswith("step_") else (False, "never completed")
        if ok:
            for bad, reason in skipped:
                print(f"warning: checkpoint {bad} is unusable ({reason}); resuming from {d} instead",
                      file=sys.stderr, flush=True)
            return d
        skipped.append((d, why))
    for bad, reason in skipped:
        print(f"warning: checkpoint {bad} is unusable ({reason}); no complete checkpoint left, starting fresh",
              file=sys.stderr, flush=True)
    return None


def load(engine, found: Path) -> dict:
    """Load model/optimizer/scheduler from `found` and this rank's RNG; returns the trainer state."""
    import deepspeed.comm as dist

    path, client = engine.load_checkpoint(str(found.parent), tag=found.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {found}")
    state = client["padd"]
    _set_rng_state(state["rng"][dist.get_rank()])
    return state
