"""What a checkpoint was trained on, and whether another launch can continue it.

    old = newest_layout(ckpt_dir)                  # (checkpoint, Layout) from the newest marker, or None
    new = launch_layout(cfg, ds_json, students, experts, on_gpu=True)
    problem = resume_problem(old[1], new, old[0])  # None, or one line: both shapes and the fix
    ga = resumed_grad_accum(old[1], new)           # distill: the accumulation that keeps the global batch

The completion marker of every checkpoint records its `Layout`. A launch with another number
of student ranks or expert-parallel size resumes through DeepSpeed's universal checkpoint
(engine/checkpoint.py), keeping the run's global batch: in train.mode=distill the optimiser
step is `students x train.micro_batch_size x grad_accum` problems, so the accumulation is
re-derived for the new rank count; in train.mode=padd it is `stage3.prompts_per_step`
prompts whatever the rank count. What cannot be kept (another model, ZeRO stage or
precision; a global batch the new ranks cannot split) is refused before anything loads.
No torch imports: validate.py checks this before any process group exists.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from padd_ds.config import PaddConfig, rollout_layout_problem
from padd_ds.models.arch import expert_parallel_size, uses_bf16

MARKER = "padd_complete.json"


def _ranks(n: int) -> str:
    return f"{n} student rank{'s' if n != 1 else ''}"


@dataclass(frozen=True)
class Layout:
    students: int                  # student ranks (the DeepSpeed data-parallel world)
    ep: int                        # expert-parallel size
    zero_stage: int | None         # None: not known here
    dtype: str | None              # "bfloat16" / "float32"; None: not known here (no device yet)
    experts: int | None            # routed experts per MoE layer; None: not known here (hub student)
    mode: str                      # train.mode
    micro_batch_size: int          # sequences per rank per micro-step
    global_batch: int              # per optimiser step: problems (distill) or prompts (padd)
    router_lr_scale: float | None = None  # train.router_lr_scale; None: written before it existed (1)

    def shape(self) -> str:
        return f"{_ranks(self.students)} x expert-parallel size {self.ep}"

    def reshaped(self, other: "Layout") -> bool:
        """Another partitioning of the same state: the checkpoint goes through a universal one."""
        return (self.students, self.ep) != (other.students, other.ep)

    def router_group(self) -> bool:
        """Whether its optimizer keeps the routers in a group of their own (engine/build.py)."""
        return (self.router_lr_scale or 1) != 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Layout":
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


def _dtype(ds: Mapping[str, Any], models_dtype: str, on_gpu: bool | None) -> str | None:
    """The engine's precision: the JSON's bf16.enabled, else models.dtype on this device."""
    enabled = (ds.get("bf16") or {}).get("enabled", "auto")
    if enabled == "auto":
        enabled = None if on_gpu is None else uses_bf16(models_dtype, on_gpu)
    return None if enabled is None else ("bfloat16" if enabled else "float32")


def launch_layout(cfg: PaddConfig, ds: Mapping[str, Any], students: int, experts: int | None,
                  on_gpu: bool | None) -> Layout:
    """This launch's layout from the recipe and the user's DeepSpeed JSON (`on_gpu` None: no device known)."""
    t = cfg.train
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    batch = cfg.stage3.prompts_per_step if t.mode == "padd" else students * t.micro_batch_size * t.grad_accum
    return Layout(students, expert_parallel_size(ds, cfg.deepspeed.expert_parallel_size),
                  stage if isinstance(stage, int) else None, _dtype(ds, cfg.models.dtype, on_gpu), experts,
                  t.mode, t.micro_batch_size, batch, t.router_lr_scale)


def resumed_grad_accum(old: Layout, new: Layout) -> int:
    """train.mode=distill: micro-steps per optimiser step that keep `old`'s global batch on `new`'s ranks."""
    return old.global_batch // (new.students * new.micro_batch_size)


def _batch_problem(old: Layout, new: Layout, cfg: PaddConfig | None) -> str | None:
    """The global batch `old` trained with, split over `new`'s ranks."""
    g, per_step = old.global_batch, new.students * new.micro_batch_size
    if old.mode != new.mode:
        return None  # another training loop: nothing of the old data position carries over
    if new.mode == "padd":
        if new.global_batch != g:
            return (f"stage3.prompts_per_step={new.global_batch} differs from the checkpoint's {g}, which moves the "
                    f"data position; set stage3.prompts_per_step={g}")
        return None if cfg is None else rollout_layout_problem(cfg, new.students)
    if g % per_step:
        fix = (f"set train.micro_batch_size to a divisor of {g // new.students}" if g % new.students == 0 else
               f"launch a number of student ranks that divides {g}")
        return (f"its global batch of {g} problems per step is not a multiple of {_ranks(new.students)} x "
                f"train.micro_batch_size={new.micro_batch_size}; {fix}")
    return None


def _model_problem(old: Layout, new: Layout) -> str | None:
    """What a universal checkpoint cannot change: the model, the ZeRO stage, the precision."""
    if None not in (old.experts, new.experts) and old.experts != new.experts:
        return (f"its student has {old.experts} experts per layer, this launch's {new.experts}: another model; "
                "point run.output_dir elsewhere or set train.resume=never")
    if None not in (old.zero_stage, new.zero_stage) and old.zero_stage != new.zero_stage:
        return (f"it was written under ZeRO stage {old.zero_stage}, this launch uses stage {new.zero_stage}; set "
                f"zero_optimization.stage={old.zero_stage} in deepspeed.config")
    if None not in (old.dtype, new.dtype) and old.dtype != new.dtype:
        return (f"it was trained in {old.dtype}, this launch in {new.dtype}; set models.dtype={old.dtype} "
                "(or bf16.enabled in deepspeed.config)")
    if old.router_group() != new.router_group():
        fix = "any value other than 1" if old.router_group() else "1"
        return (f"its optimizer was built with train.router_lr_scale={old.router_lr_scale or 1:g}, this launch's is "
                f"{new.router_lr_scale or 1:g}: the routers' own optimizer group cannot be added or removed in a "
                f"resume; set train.router_lr_scale to {fix} (the config's rates then apply)")
    if old.reshaped(new) and new.experts is not None and new.experts % new.ep:
        return (f"{new.experts} experts do not divide over expert-parallel size {new.ep}; set "
                "deepspeed.expert_parallel_size to a divisor")
    if old.reshaped(new) and new.students % new.ep:
        return (f"{_ranks(new.students)} do not form expert-parallel groups of {new.ep}; set "
                "deepspeed.expert_parallel_size to a divisor of the student ranks")
    return None


def resume_problem(old: Layout, new: Layout, where: str | Path, cfg: PaddConfig | None = None) -> str | None:
    """Why the checkpoint at `where` (trained on `old`) cannot continue on `new`, in one line
    naming both shapes and the fix; None when it can. `cfg` adds the rollout layout (padd)."""
    problem = _model_problem(old, new) or _batch_problem(old, new, cfg)
    if problem is None:
        return None
    return (f"train.resume=auto: checkpoint {where} was trained on {old.shape()}, this launch has {new.shape()}: "
            f"{problem}")


_STEP = re.compile(r"step_(\d+)")


def read_layout(d: Path) -> Layout | None:
    """The layout in `d`'s marker; None when it has none (written before layouts were recorded)."""
    try:
        layout = json.loads((d / MARKER).read_text()).get("layout")
    except (OSError, ValueError, AttributeError):
        return None
    return Layout.from_dict(layout) if isinstance(layout, dict) else None


def newest_layout(ckpt_dir: Path) -> tuple[Path, Layout] | None:
    """The newest checkpoint with a marker (the one a resume will most likely use; its checksums
    are verified later, on the ranks) and its layout; None without one, or when that marker
    records no layout (an older padd-ds: the ranks check it before loading)."""
    if not ckpt_dir.is_dir():
        return None
    dirs = sorted((d for d in ckpt_dir.iterdir() if d.is_dir() and _STEP.fullmatch(d.name) and (d / MARKER).is_file()),
                  key=lambda d: int(d.name.split("_")[1]), reverse=True)
    layout = read_layout(dirs[0]) if dirs else None
    return None if layout is None else (dirs[0], layout)
