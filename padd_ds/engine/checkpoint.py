"""Checkpoints that a killed job can never leave half-written, verified on resume, and exact resume,
also on another number of student ranks.

    save(engine, ckpt_dir, step, state, keep_last=2, layout)   # every student rank calls it
    found = latest_valid(ckpt_dir)               # newest complete, intact checkpoint, or None
    plan = plan_resume(ckpt_dir, launch_layout)  # that, checked against this launch (before the engine)
    src = universal(plan.found) if plan.reshaped else plan.found
    state = load(engine, src, seed)              # this rank's resume state

DeepSpeed writes each rank's shards into `<dir>/.tmp-step_N`; after a barrier the student
ranks hash the files (sha256, each rank its share: `hash_share`), the main rank writes
`padd_complete.json` there (step, the run's layout: student ranks, expert-parallel size, ZeRO
stage, precision, experts, global batch; and every file with its size and checksum), renames the
directory to `step_N` (atomic on POSIX), then replaces `latest`. On resume a directory
without the marker, with a file missing or resized (checked first, no hashing), or with a
file whose checksum differs, is skipped with a warning naming it, the file, and the
checkpoint used instead. A marker of an older padd-ds without checksums is still accepted
on its sizes alone, with a note. Only the newest `keep_last` complete checkpoints are kept.

A launch with another number of student ranks or expert-parallel size (engine/layout.py says
what can change) resumes through DeepSpeed's universal checkpoint: the main rank converts the
checkpoint once with `deepspeed.checkpoint.ds_to_universal` (ZeRO-3 + AutoEP supported) into
`<dir>/universal/step_N` (a temporary name, then renamed; reused by later restarts while the
source is unchanged), and every rank loads it with DeepSpeed's `checkpoint.load_universal`.

`latest_valid`, `plan_resume`, `universal` and `mark_complete` are collective over the students' world when one exists
(each rank hashes its share, rank 0 lists and decides from what all ranks report, so every
rank gets the same answer); without a process group they run alone.

`state` holds what DeepSpeed does not: the step (= the data position, see BatchPlan), every
rank's RNG states (python, numpy, torch and, on a GPU, CUDA's: rollouts are sampled), and the
trainer's own objects (Stage IV bias and advantage EMAs, the router snapshot for drift). It is
gathered from all ranks into the main rank's DeepSpeed client state, so each rank gets its own
RNG back. On another number of student ranks the saved streams belong to other ranks' shares of
the data, so every rank starts a fresh stream seeded from (run.seed, step, rank): reproducible,
but rollouts are other samples than an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from padd_ds.config import ConfigError
from padd_ds.engine.layout import MARKER, Layout, read_layout, resume_problem
from padd_ds.launch.device import on_gpu

CHUNK = 8 << 20  # bytes read at a time while hashing: shards are GBs, memory stays flat
UNIVERSAL = "universal"  # <ckpt_dir>/universal/step_N: step_N converted for another layout
_CKPT_NAME = re.compile(r"(\.tmp-)?step_(\d+)")


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


# --------------------------------------------------------------------------------------
# Collectives over the students' world (alone when there is no process group)
# --------------------------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        torch.distributed.barrier()


def _from_main(obj):
    """Rank 0's `obj` on every rank."""
    if _rank_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _from_all(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    world = _rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------
# Files, checksums, the completion marker
# --------------------------------------------------------------------------------------


def file_sizes(d: Path) -> dict[str, int]:
    """Every file under `d` but the marker (path relative to `d`) with its size."""
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file() and p.name != MARKER}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """The files `rank` hashes: largest first, dealt round-robin, so every rank reads about
    as many bytes (plain name order would give one rank all the optimizer shards)."""
    return sorted(sizes, key=lambda k: (-sizes[k], k))[rank::world]


def _checksums(d: Path, sizes: dict[str, int]) -> dict[str, str | None]:
    """sha256 of every file in `sizes` (None: unreadable); collective, each rank hashes its share."""
    rank, world = _rank_world()
    mine = {}
    for name in hash_share(sizes, rank, world):
        try:
            mine[name] = sha256(d / name)
        except OSError:  # vanished or unreadable on this rank's view of the file system
            mine[name] = None
    return {k: v for part in _from_all(mine) for k, v in part.items()}


def mark_complete(d: Path, step: int, layout: Layout | None = None) -> None:
    """Write `d`'s completion marker: the layout, every file's size and sha256. Collective; rank 0 lists and writes."""
    rank = _rank_world()[0]
    sizes = _from_main(file_sizes(d) if rank == 0 else None)
    sums = _checksums(d, sizes)
    if rank == 0:
        files = {k: {"size": sizes[k], "sha256": sums[k]} for k in sizes}
        marker = {"step": step, "layout": layout and layout.to_dict(), "files": files}
        (d / MARKER).write_text(json.dumps(marker, indent=1))


# --------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------


def save(engine, ckpt_dir: str | os.PathLike, step: int, state: dict, keep_last: int,
         layout: Layout | None = None) -> Path:
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
    mark_complete(ckpt_dir / tmp_tag, step, layout)
    final = ckpt_dir / tag
    if rank == 0:
        _publish(ckpt_dir, tmp_tag, tag)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return final


def _publish(ckpt_dir: Path, tmp_tag: str, tag: str) -> None:
    """Rename the marked directory to its final name, then point `latest` at it (both atomic)."""
    final = ckpt_dir / tag
    if final.exists():
        shutil.rmtree(final)
    os.replace(ckpt_dir / tmp_tag, final)
    latest_tmp = ckpt_dir / ".latest.tmp"
    latest_tmp.write_text(tag)
    os.replace(latest_tmp, ckpt_dir / "latest")


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    complete = sorted((d for d in ckpt_dir.glob("step_*") if (d / MARKER).exists() and _step_of(d) is not None),
                      key=_step_of)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    uni = ckpt_dir / UNIVERSAL
    for conv in uni.iterdir() if uni.is_dir() else []:
        if conv.is_dir() and not (ckpt_dir / conv.name).is_dir():  # its source was pruned, or a killed conversion
            shutil.rmtree(conv, ignore_errors=True)


def latest_saved(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names (the one this run wrote last), without verifying it."""
    latest = Path(ckpt_dir) / "latest"
    return Path(ckpt_dir) / latest.read_text().strip() if latest.is_file() else None


# --------------------------------------------------------------------------------------
# Choose and verify on resume
# --------------------------------------------------------------------------------------


def _step_of(d: Path) -> int | None:
    m = _CKPT_NAME.fullmatch(d.name)
    return int(m.group(2)) if m else None


def _candidates(ckpt_dir: Path) -> list[Path]:
    """Finished and unfinished checkpoint directories, newest step first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((d for d in ckpt_dir.iterdir() if d.is_dir() and _step_of(d) is not None),
                  key=lambda d: (_step_of(d), not d.name.startswith(".")), reverse=True)


def _read_marker(d: Path) -> tuple[dict | None, str]:
    """The marker's files as {name: {"size", "sha256" (None in an old marker)}}, or None and why."""
    m = d / MARKER
    if not m.exists():
        return None, "no completion marker (the save was interrupted)"
    try:
        files = json.loads(m.read_text())["files"]
        return {k: v if isinstance(v, dict) else {"size": v, "sha256": None} for k, v in files.items()}, ""
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"unreadable marker ({e})"


def _size_check(d: Path) -> tuple[str | None, dict]:
    """Why `d` is unusable without reading its data (marker, names, sizes), or None; and its marker."""
    if d.name.startswith("."):
        return "never completed", {}
    want, why = _read_marker(d)
    if want is None:
        return why, {}
    have = file_sizes(d)
    missing = sorted(set(want) - set(have))
    resized = sorted(k for k in set(want) & set(have) if want[k]["size"] != have[k])
    extra = sorted(set(have) - set(want))
    if missing or resized or extra:
        return (f"files differ from the marker (missing {missing[:3]}, resized {resized[:3]}, "
                f"unexpected {extra[:3]})"), {}
    return None, want


def _checksum_problem(d: Path, want: dict) -> str | None:
    """The files whose sha256 differs from the marker's (collective: each rank hashes its share)."""
    got = _checksums(d, {k: v["size"] for k, v in want.items()})
    bad = sorted(k for k in want if got[k] != want[k]["sha256"])
    return f"checksum mismatch in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}" if bad else None


def _verify(d: Path) -> str | None:
    """Why `d` cannot be resumed from, or None. Collective; rank 0's size check decides for all."""
    why, want = _from_main(_size_check(d) if _rank_world()[0] == 0 else None)
    if why is not None:
        return why
    if any(v["sha256"] is None for v in want.values()):
        _say(f"note: checkpoint {d} has no checksums (written by an older padd-ds): checked its file sizes only")
        return None
    return _checksum_problem(d, want)


def _say(line: str) -> None:
    if _rank_world()[0] == 0:
        print(line, file=sys.stderr, flush=True)


def latest_valid(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete, intact checkpoint; newer broken ones are reported on stderr and
    skipped. Collective over the students' world: every rank gets the same answer."""
    skipped = []
    for d in _from_main(_candidates(Path(ckpt_dir)) if _rank_world()[0] == 0 else None):
        why = _verify(d)
        if why is None:
            for bad, reason in skipped:
                _say(f"warning: checkpoint {bad} is unusable ({reason}); resuming from {d} instead")
            return d
        skipped.append((d, why))
    for bad, reason in skipped:
        _say(f"warning: checkpoint {bad} is unusable ({reason}); no complete checkpoint left, starting fresh")
    return None


# --------------------------------------------------------------------------------------
# Resume, on this layout or another
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    found: Path              # the verified checkpoint
    layout: Layout | None    # what it was trained on (None: a marker from before layouts were recorded)
    reshaped: bool           # other student ranks or expert-parallel size: loaded through a universal checkpoint


def plan_resume(ckpt_dir: str | os.PathLike, launch: Layout, cfg=None) -> Resume | None:
    """The verified checkpoint to resume from, and whether it needs resharding for `launch`.
    Collective. Raises ConfigError (one line, both shapes) before anything loads when `launch`
    cannot continue it; `cfg` adds the rollout-layout rule of train.mode=padd."""
    found = latest_valid(ckpt_dir)
    if found is None:
        return None
    old = _from_main(read_layout(found) if _rank_world()[0] == 0 else None)
    if old is None:
        _check_legacy(found, launch)
        return Resume(found, None, False)
    problem = resume_problem(old, launch, found, cfg)
    if problem is not None:
        raise ConfigError(problem)
    return Resume(found, old, old.reshaped(launch))


def _check_legacy(found: Path, launch: Layout) -> None:
    """A checkpoint of a padd-ds that did not record layouts resumes on its own number of ranks only."""
    saved = len(list(found.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")))
    if saved and saved != launch.students:
        raise ConfigError(f"train.resume=auto: checkpoint {found} was written on {saved} student ranks by a padd-ds "
                          f"that did not record its layout, this launch has {launch.students}: resume it on {saved} "
                          "student ranks (its next checkpoint records the layout and can move), or set "
                          "train.resume=never")


def _converted(out: Path, source: str) -> bool:
    """`out` is a finished conversion of the checkpoint whose marker hashes to `source`."""
    try:
        m = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("source") == source and m.get("sizes") == file_sizes(out)


def _convert(found: Path, out: Path, source: str) -> None:
    """DeepSpeed's ds_to_universal, into a temporary name renamed to `out` when complete."""
    tmp = out.parent / f".tmp-{found.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion that was killed
    t0 = time.perf_counter()
    # Its own process: the converter forks workers, which a rank with live collectives must not.
    p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(found),
                        "--output_folder", str(tmp)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        last = ([line for line in (p.stdout + p.stderr).splitlines() if line.strip()] or ["no output"])[-1]
        raise RuntimeError(f"converting checkpoint {found} to a universal checkpoint failed "
                           f"(deepspeed.checkpoint.ds_to_universal exit {p.returncode}): {last}")
    (out.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer at the temporary name
    (tmp / MARKER).write_text(json.dumps({"source": source, "sizes": file_sizes(tmp)}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"[resume] converted {found} to a universal checkpoint {out} in {time.perf_counter() - t0:.1f}s", flush=True)


def universal(found: Path, poll_s: float = 1.0) -> Path:
    """`found` as a DeepSpeed universal checkpoint, `<dir>/universal/step_N`. Collective: the main
    rank converts it unless a finished conversion of this very checkpoint exists; the others wait
    for it on the file system (a conversion of a large checkpoint can outlast the process group's
    timeout, so no collective waits for it)."""
    out = found.parent / UNIVERSAL / found.name
    failed = out.parent / f".failed-{found.name}"
    source = sha256(found / MARKER)  # the marker holds every file's checksum: it names this exact checkpoint
    main = _rank_world()[0] == 0
    if main:
        out.parent.mkdir(exist_ok=True)
        failed.unlink(missing_ok=True)
    _barrier()
    if main and not _converted(out, source):
        try:
            _convert(found, out, source)
        except Exception as e:
            failed.write_text(str(e))  # the waiting ranks stop with the same error
            raise
    while not _converted(out, source):
        if failed.exists():
            raise RuntimeError(failed.read_text())
        time.sleep(poll_s)
    _barrier()
    return out


def _restore_rng(saved: list, seed: int, step: int) -> None:
    """This rank's RNG states; on another student world size a fresh stream from (seed, step, rank)."""
    rank, world = _rank_world()
    if len(saved) == world:
        _set_rng_state(saved[rank])
        return
    # The saved streams drew other ranks' shares of the data: none belongs to this rank now.
    s = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _own_step_counters(engine) -> None:
    """Give every optimizer state its own `step` tensor. DeepSpeed 0.19.8's ZeRO-3 universal load
    (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3) assigns one tensor object to the
    state of every sub-group (here: dense and expert parameters); torch's Adam/AdamW and
    DeepSpeed's FusedAdam increment it in place per sub-group, so it would advance once per
    sub-group per step and every later update would use a wrong bias correction."""
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load(engine, src: Path, seed: int = 0) -> dict:
    """Load model/optimizer/scheduler from checkpoint `src` (the engine must have been built with
    checkpoint.load_universal for a universal one) and this rank's RNG; returns the trainer state."""
    path, client = engine.load_checkpoint(str(src.parent), tag=src.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {src}")
    if engine.load_universal_checkpoint():
        _own_step_counters(engine)
    state = client["padd"]
    _restore_rng(state["rng"], seed, state["step"])
    return state
