"""Everything a student rank needs before training: the student (pre-trained, or decompressed
from the teacher), the teacher client, Stage I's exchange with the teacher, the reference
evaluation, the DeepSpeed engine, the data parts, the logger and, on restart, the resume state."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import deepspeed.comm as dist

from padd_ds.config import PaddConfig
from padd_ds.recipe import dump_yaml, to_dict
from padd_ds.data.batch import usable_problems
from padd_ds.data.math import load_train_problems
from padd_ds.data.splits import split_pool
from padd_ds.engine import checkpoint as ckpt
from padd_ds.engine.build import initialize_engine
from padd_ds.eval.heldout import heldout_accuracy
from padd_ds.launch.world import World
from padd_ds.models.decompress import PROVENANCE_FILE, decompress, save_decompressed
from padd_ds.models.files import model_paths
from padd_ds.models.loading import load_causal_lm, load_tokenizer
from padd_ds.pipeline.records import ResumeState, RunContext
from padd_ds.report.metrics import MetricsLogger
from padd_ds.stage1.handshake import send_stage1_setup
from padd_ds.teacher.service import LocalTeacher, RemoteTeacher, TeacherModel


@dataclass
class Prepared:
    ctx: RunContext
    student_before: dict | None                          # the untrained student's held-out accuracy
    collect_clusters: Callable[[], list[dict] | None] | None  # Stage I: the teacher's clustering records


def prepare(cfg: PaddConfig, world: World) -> Prepared:
    teacher_path, _, tok_path = model_paths(cfg)
    run_dir = Path(cfg.run.output_dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    tok = load_tokenizer(tok_path, cfg.models.trust_remote_code)
    student_path, provenance = student_checkpoint(cfg, world, teacher_path, tok, run_dir)
    # On the rank's device: deepspeed.initialize would move it there whole before partitioning.
    student = load_causal_lm(student_path, cfg.models.dtype, cfg.models.trust_remote_code)
    teacher = connect_teacher(cfg, world, teacher_path, student.config.get_text_config().vocab_size)
    collect = (send_stage1_setup(cfg, world, student.config, teacher_path, teacher, provenance)
               if cfg.stage1.enabled else None)
    before = heldout_accuracy(student, tok, cfg) if world.is_main and cfg.eval.references else None
    num_students = max(1, world.roles.num_student)
    engine, ds_config = initialize_engine(cfg, student, num_students)
    if world.is_main:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    pool = load_train_problems(cfg.data.source, cfg.data.question_field, cfg.data.answer_field)
    pool = usable_problems(tok, pool, cfg.data.max_prompt_tokens, cfg.data.long_prompts,  # long prompts, no solution
                           source=f"data.source={cfg.data.source}", log=world.is_main)
    parts = split_pool(pool, cfg.data.split_fractions, cfg.run.seed)
    logger = MetricsLogger(run_dir, to_dict(cfg), enabled=world.is_main, project=cfg.logging.wandb_project,
                           mode=cfg.logging.wandb_mode, run_name=cfg.run.name, jsonl=cfg.logging.jsonl)
    ctx = RunContext(cfg, world, tok, engine, teacher, parts, pool, logger, run_dir, provenance)
    return Prepared(ctx, before, collect)


def student_checkpoint(cfg: PaddConfig, world: World, teacher_path: str, tok, run_dir: Path) -> tuple[str, dict | None]:
    """The student to train: the recipe's pre-trained MoE, or (models.student=null) one
    decompressed from the teacher by the main student rank into run_dir/stage1/student (the
    other ranks wait for it). Returns (path, decompression provenance or None)."""
    _, student_path, _ = model_paths(cfg)
    if student_path is not None:
        return student_path, None
    out = run_dir / "stage1" / "student"
    if world.is_main and not (out / PROVENANCE_FILE).exists():  # a resumed run reuses its student
        s1 = cfg.stage1
        # On the host: decompression reads weights there and runs no forward.
        dense = load_causal_lm(teacher_path, cfg.models.dtype, cfg.models.trust_remote_code, device="cpu")
        t0 = time.perf_counter()
        # Experts scaled by N: the warmup's uniform router (1/N each) is then exactly the teacher.
        moe, prov = decompress(dense, s1.decompress_experts, s1.decompress_top_k, s1.cluster_input, cfg.run.seed,
                               router_init="zeros" if s1.router_init == "random" else "centroids",
                               expert_scale=float(s1.decompress_experts))
        save_decompressed(moe, prov, out, tok)
        print(f"[stage1] decompressed the teacher into {s1.decompress_experts} experts (top-{s1.decompress_top_k}) "
              f"in {time.perf_counter() - t0:.1f}s -> {out}", flush=True)
        del dense, moe
    dist.barrier()
    return str(out), json.loads((out / PROVENANCE_FILE).read_text())


def connect_teacher(cfg: PaddConfig, world: World, teacher_path: str, student_vocab: int):
    """The teacher client: a local model (colocated) or the bridge to this rank's teacher."""
    t = cfg.teacher
    if world.roles.role == "colocated":
        model = load_causal_lm(teacher_path, cfg.models.dtype, cfg.models.trust_remote_code)
        return LocalTeacher(TeacherModel(model, vocab_limit=student_vocab), t.logits_top_k, t.logits_mode)
    return RemoteTeacher(world.bridge, world.my_teacher(), t.logits_top_k, t.request_timeout_s,
                         world.roles.student_rank or 0, t.logits_mode, world.teacher_replicas())


def resume_state(ctx: RunContext) -> ResumeState | None:
    """The newest complete checkpoint's state (train.resume=auto), loaded into the engine; None
    when starting fresh. Stage I is then already in the weights."""
    found = ckpt.latest_valid(ctx.ckpt_dir) if ctx.cfg.train.resume == "auto" else None
    if found is None:
        return None
    state = ResumeState.from_checkpoint(ckpt.load(ctx.engine, found))
    if ctx.world.is_main:
        print(f"[resume] continuing from {found} (step {state.step})", flush=True)
    return state
