"""A student rank's whole run, as an outline of phases:

    prepare   student (pre-trained or decompressed), teacher client, engine, data, logger
    resume    the newest complete checkpoint, if any
    Stage I   clusters, router init, warmup (skipped on resume: already in the weights)
    train     online KD (train.mode=distill) or Stages II-IV (train.mode=padd) on D_C
    export    native transformers checkpoint, checked against the engine
    evaluate  teacher, student before and after on the held-out set (each student rank its share)
    report    results.json, the accuracy table, figures and report.md (main rank)
"""

from __future__ import annotations

import json
import sys

import deepspeed.comm as dist

from padd_ds.eval.heldout import heldout_accuracy
from padd_ds.launch.bridge import TAG_RESULT, PeerGone
from padd_ds.launch.replicas import dead_ranks, declare_dead
from padd_ds.pipeline.distill import train_distill
from padd_ds.pipeline.padd import train_padd
from padd_ds.pipeline.prepare import Prepared, prepare, resume_state
from padd_ds.pipeline.records import LoopResult, ResumeState, RunContext, RunResult
from padd_ds.pipeline.summary import print_stage1, print_table
from padd_ds.pipeline.verify import VerifiedExport, export_and_verify
from padd_ds.report.report import write_run_report
from padd_ds.stage1.student import Stage1


def run_student(cfg, world) -> RunResult | None:
    prep = prepare(cfg, world)
    ctx = prep.ctx
    state = resume_state(ctx)
    stage1 = stage_one(ctx, state, prep)
    loop = train_distill if cfg.train.mode == "distill" else train_padd
    trained = loop(ctx, state)
    ctx.teacher.close()
    if trained.stopped_at is not None:  # preempted: the checkpoint is written; no export or evaluation
        return preempted(ctx, trained.stopped_at)
    # Every student rank evaluates its share of the held-out problems with its own exported
    # copy (on the main rank alone a paper-scale suite takes hours, past the others' timeout).
    verified = export_and_verify(ctx, lambda model: heldout_accuracy(model, ctx.tok, cfg,
                                                                     share=(ctx.rank, ctx.num_students)))
    result = evaluate(ctx, prep, trained, verified, stage1) if world.is_main else None
    if result is not None:
        report(ctx, result)
    ctx.logger.close()
    dist.barrier()
    return result


def stage_one(ctx: RunContext, state: ResumeState | None, prep: Prepared) -> dict | None:
    """Stage I on a fresh start; on resume its report from the first run."""
    records = prep.collect_clusters() if prep.collect_clusters is not None else None  # the teacher always replies
    if not ctx.cfg.stage1.enabled:
        return None
    path = ctx.run_dir / "stage1" / "report.json"
    if state is not None:
        return json.loads(path.read_text()) if path.exists() else None
    out = Stage1(ctx.cfg, ctx.engine, ctx.teacher, ctx.encode, ctx.parts, ctx.logger.log).run(ctx.provenance is not None)
    out["clusters"] = records
    if ctx.world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print_stage1(out)
    return out


def preempted(ctx: RunContext, step: int) -> dict:
    if ctx.world.is_main:
        if ctx.world.roles.role != "colocated" and ctx.cfg.eval.teacher_evaluated:  # take the teacher's posted evaluation so it can exit
            posted_teacher_eval(ctx)
        print(f"[preempted] signal received; checkpoint at step {step} written to {ctx.ckpt_dir}; "
              "restart with train.resume=auto to continue", flush=True)
    ctx.logger.close()
    dist.barrier()
    return {"preempted_at": step}


def evaluate(ctx: RunContext, prep: Prepared, trained: LoopResult, verified: VerifiedExport,
             stage1: dict | None) -> RunResult:
    """Main rank: the exported student's accuracy (and its exact routing's, when asked; both
    measured by export_and_verify while each copy is loaded) and the teacher's reference
    accuracy, with the export's checks, as results.json."""
    ex = verified.report
    return RunResult(teacher_reference(ctx), prep.student_before, verified.student_after, trained.history,
                     ctx.teacher.stats.wait_s,
                     ex.max_abs_logit_diff, ex.routing_fidelity, ex.bias_folded, ex.bias_exact, ex.exact_routing,
                     stage1, ex.checkpoint, ex.export)


def teacher_reference(ctx: RunContext) -> dict | None:
    """The teacher's held-out accuracy: evaluated here when colocated, else what the teacher posted."""
    if not ctx.cfg.eval.teacher_evaluated:
        return None
    if ctx.world.roles.role == "colocated":
        return heldout_accuracy(ctx.teacher.teacher.model, ctx.tok, ctx.cfg)
    posted = posted_teacher_eval(ctx)
    return posted and posted["teacher_eval"]


def posted_teacher_eval(ctx: RunContext) -> dict | None:
    """What teacher rank 0 posted at its start; None, with a warning, when that replica was
    lost and the others served on (the reference row is then missing, the run is not)."""
    w = ctx.world
    src, store = w.roles.num_student, w.bridge.store
    try:
        if src not in dead_ranks(store, [src]):
            return w.bridge.recv_json(src=src, tag=TAG_RESULT, timeout_s=ctx.cfg.topology.timeout_s)
        why = "it was declared dead"
    except PeerGone as e:
        if len(w.teacher_replicas()) < 2:
            raise
        declare_dead(store, src)
        why = str(e)
    print(f"warning: teacher rank {src} (replica 0, which evaluates the teacher) was lost ({why}); the teacher's "
          "held-out evaluation is missing (null in results.json); the other replicas served the training",
          file=sys.stderr, flush=True)
    return None


def report(ctx: RunContext, result: RunResult) -> None:
    out = result.to_json()
    (ctx.run_dir / "results.json").write_text(json.dumps(out, indent=2))
    exact = result.export_exact_routing
    ctx.logger.summary({key: r["accuracy"] for key, r in (
        ("eval/teacher_acc", result.teacher), ("eval/student_before_acc", result.student_before),
        ("eval/student_after_acc", result.student_after),
        ("eval/student_after_exact_routing_acc", exact and exact["student_after"])) if r is not None})
    print_table(out)
    print(f"report: {write_run_report(ctx.run_dir, ctx.logger)}", flush=True)
