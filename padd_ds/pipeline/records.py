"""The typed records that pass between the phases of a student rank's run.

    RunContext    what every phase shares: config, world, engine, teacher client, data parts,
                  logger, run directory (built once by `prepare`)
    ResumeState   what a checkpoint gives back to a training loop
    LoopResult    a training loop's history, and the step a preemption stopped it at
    ExportReport  the native checkpoint and how faithfully it reproduces the engine
    RunResult     the run's outcome: results.json
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from padd_ds.config import PaddConfig
from padd_ds.data.batch import TokenBatch, encode_examples
from padd_ds.engine import checkpoint as ckpt
from padd_ds.engine.layout import Layout
from padd_ds.launch import signals
from padd_ds.launch.world import World
from padd_ds.report.metrics import MetricsLogger


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


@dataclass
class RunContext:
    cfg: PaddConfig
    world: World
    tok: Any                          # the shared tokenizer
    engine: Any                       # DeepSpeed engine (ZeRO-3 + AutoEP) around the student
    teacher: Any                      # LocalTeacher (colocated) or RemoteTeacher (over the bridge)
    parts: dict[str, list[dict]]      # D_A clustering, D_B warmup, D_C training, D_D held out
    pool: list[dict]                  # every usable training problem (probe batch of the export check)
    logger: MetricsLogger
    run_dir: Path
    provenance: dict | None = None    # how a decompressed student was built (None: pre-trained)
    layout: Layout | None = None      # this launch's shape, recorded in every checkpoint's marker
    resume: ckpt.Resume | None = None  # the checkpoint to continue from (None: a fresh start)

    @property
    def rank(self) -> int:
        return self.world.roles.student_rank or 0

    @property
    def num_students(self) -> int:
        return max(1, self.world.roles.num_student)

    @property
    def ckpt_dir(self) -> Path:
        return checkpoint_dir(self.run_dir)

    def encode(self, problems: list[dict]) -> TokenBatch:
        """Reference solutions as teacher-forced batches (prompt + solution, loss on the solution)."""
        d = self.cfg.data
        return encode_examples(self.tok, problems, d.max_prompt_tokens, d.max_response_tokens)

    def save_if_due(self, step: int, state: dict) -> bool:
        """Checkpoint every train.save_every steps, after the last one, and when preempted.
        Returns True when the run must stop here (preempted before its last step)."""
        t = self.cfg.train
        stop = signals.agreed() and step < t.steps
        if stop or step == t.steps or (t.save_every and step % t.save_every == 0):
            ckpt.save(self.engine, self.ckpt_dir, step, state, t.keep_last, self.layout)
        return stop


@dataclass
class ResumeState:
    step: int = 0
    history: list[dict] = field(default_factory=list)
    nonfinite: dict | None = None                   # engine/guard.py streak counters
    balance: dict | None = None                     # Stage IV bias and advantage EMAs
    router_snapshot: list[torch.Tensor] | None = None  # routers of the last step: the drift reference

    @classmethod
    def from_checkpoint(cls, state: dict | None) -> "ResumeState | None":
        if state is None:
            return None
        return cls(state["step"], list(state.get("history", [])), state.get("nonfinite"), state.get("balance"),
                   state.get("router_snapshot"))


@dataclass
class LoopResult:
    history: list[dict]
    stopped_at: int | None = None     # the step a preemption stopped the loop after


@dataclass
class ExportReport:
    max_abs_logit_diff: float         # exported HF model vs the engine on a probe batch
    routing_fidelity: float           # share of held-out (token, layer) routes equal to the engine's
    bias_folded: bool                 # a Stage IV bias was folded into router weights (no slot)
    bias_exact: bool                  # the bias went into a selection-bias slot (DeepSeek-V3)
    exact_routing: dict | None        # a folded export with its exact routing restored
    checkpoint: str                   # the DeepSpeed checkpoint the export was taken from
    export: str                       # the native transformers checkpoint


@dataclass
class RunResult:
    """results.json (same keys and order as always)."""

    teacher: dict | None
    student_before: dict | None
    student_after: dict | None
    history: list[dict]
    teacher_wait_s: float
    export_max_abs_logit_diff: float
    export_routing_fidelity: float
    export_bias_folded: bool
    export_bias_exact: bool
    export_exact_routing: dict | None
    stage1: dict | None
    checkpoint: str
    export: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
