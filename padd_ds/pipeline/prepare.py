"""Everything a student rank needs before training: the student (pre-trained, or decompressed
from the teacher), the teacher client, Stage I's exchange with the teacher, the reference
evaluation, the checkpoint to resume from (checked against this launch's layout before the
engine is built), the DeepSpeed engine, the data parts, the logger and, on restart, the resume
state."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import deepspeed.comm as dist

from padd_ds.config import PaddConfig
from padd_ds.engine.ds_config import read_deepspeed_config
from padd_ds.engine.layout import Layout, launch_layout, resumed_grad_accum
from padd_ds.recipe import dump_yaml, to_dict
from padd_ds.data.batch import usable_problems
from padd_ds.data.math import load_train_problems
from padd_ds.data.splits import split_pool
from padd_ds.engine import checkpoint as ckpt
from padd_ds.engine.build import apply_learning_rates, initialize_engine
from padd_ds.eval.heldout import heldout_accuracy
from padd_ds.launch.device import on_gpu
from padd_ds.launch.world import World
from padd_ds.models.arch import moe_shape
from padd_ds.models.decompress import PROVENANCE_FILE, decompress, save_decompressed
from padd_ds.models.files import model_paths
from padd_ds.models.loading import load_causal_lm, load_tokenizer
from padd_ds.pipeline.records import ResumeState, RunContext, checkpoint_dir
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
    tok = load_tokenizer(tok_path, cfg.models.trust_remote_code)
    student_path, provenance = student_checkpoint(cfg, world, teacher_path, tok, run_dir)
    # On the rank's device: deepspeed.initialize would move it there whole before partitioning.
    student = load_causal_lm(student_path, cfg.models.dtype, cfg.models.trust_remote_code)
    resume, layout = choose_resume(cfg, world, run_dir, student)  # may set train.grad_accum: before config.yaml
    if world.is_main:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    teacher = connect_teacher(cfg, world, teacher_path, student.config.get_text_config().vocab_size)
    collect = (send_stage1_setup(cfg, world, student.config, teacher_path, teacher, provenance)
               if cfg.stage1.enabled else None)
    num_students = max(1, world.roles.num_student)
    # Every student rank holds the whole student here: each answers its share of the problems
    # (on the main rank alone a paper-scale suite takes hours, past the others' timeout).
    before = heldout_accuracy(student, tok, cfg, share=(world.roles.student_rank or 0, num_students)) \
        if cfg.eval.references else None
    engine, ds_config = initialize_engine(cfg, student, num_students,
                                          load_universal=resume is not None and resume.reshaped)
    if world.is_main:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    pool = load_train_problems(cfg.data.source, cfg.data.question_field, cfg.data.answer_field)
    pool = usable_problems(tok, pool, cfg.data.max_prompt_tokens, cfg.data.long_prompts,  # long prompts, no solution
                           source=f"data.source={cfg.data.source}", log=world.is_main)
    parts = split_pool(pool, cfg.data.split_fractions, cfg.run.seed)
    logger = MetricsLogger(run_dir, to_dict(cfg), enabled=world.is_main, project=cfg.logging.wandb_project,
                           mode=cfg.logging.wandb_mode, run_name=cfg.run.name, jsonl=cfg.logging.jsonl)
    ctx = RunContext(cfg, world, tok, engine, teacher, parts, pool, logger, run_dir, provenance, layout, resume)
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


def choose_resume(cfg: PaddConfig, world: World, run_dir: Path, student) -> tuple[ckpt.Resume | None, Layout]:
    """The verified checkpoint to continue from (train.resume=auto) checked against this launch's
    layout, and that layout. Collective over the student ranks. On another number of student
    ranks, train.mode=distill keeps the checkpoint's global batch: train.grad_accum is re-derived
    (engine/layout.py); a layout that cannot continue raises ConfigError here, before any load."""
    ds, students = read_deepspeed_config(cfg), max(1, world.roles.num_student)
    shape = moe_shape(student.config)
    layout = launch_layout(cfg, ds, students, shape and shape[0], on_gpu())
    resume = ckpt.plan_resume(checkpoint_dir(run_dir), layout, cfg) if cfg.train.resume == "auto" else None
    if resume is None or resume.layout is None or cfg.train.mode != "distill":
        return resume, layout
    ga = resumed_grad_accum(resume.layout, layout)
    if ga != cfg.train.grad_accum:
        if world.is_main:
            print(f"[resume] {resume.found} was trained on {resume.layout.shape()}, this launch has {layout.shape()}: "
                  f"train.grad_accum {cfg.train.grad_accum} -> {ga} keeps its global batch of "
                  f"{resume.layout.global_batch} problems per step", flush=True)
        cfg.train.grad_accum = ga
        layout = launch_layout(cfg, ds, students, shape and shape[0], on_gpu())
    return resume, layout


def resume_state(ctx: RunContext) -> ResumeState | None:
    """The state of the checkpoint `prepare` chose, loaded into the engine (through a universal
    checkpoint when the layout changed); None when starting fresh. Stage I is then already in the weights."""
    plan = ctx.resume
    if plan is None:
        return None
    src = ckpt.universal(plan.found) if plan.reshaped else plan.found
    state = ResumeState.from_checkpoint(ckpt.load(ctx.engine, src, ctx.cfg.run.seed))
    changed = apply_learning_rates(ctx.engine, ctx.cfg)
    if ctx.world.is_main:
        how = f", resharded from {plan.layout.shape()} to {ctx.layout.shape()}" if plan.reshaped else ""
        print(f"[resume] continuing from {plan.found} (step {state.step}){how}", flush=True)
        for was, now in sorted(set(changed)):
            print(f"[resume] learning rate {was:g} -> {now:g} (the config's: train.lr, train.router_lr_scale)", flush=True)
    return state
