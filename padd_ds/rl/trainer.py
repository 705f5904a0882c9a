"""The training loop, read top to bottom.

    teacher rank(s):  load teacher -> evaluate itself -> serve top-k logits until STOP
    student ranks:    load student -> evaluate (before) -> DeepSpeed engine (ZeRO-3 + AutoEP)
                      -> for each step: take the teacher's logits for this batch (requested
                         one step ahead), KD + LM loss, backward, step
                      -> DeepSpeed checkpoint -> HF export -> evaluate (after) -> table

`train.mode=distill` is this online-KD skeleton; the PADD stages plug into the same path.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from padd_ds.config import PaddConfig
from padd_ds.models.files import resolve_model_path
from padd_ds.recipe import dump_yaml, to_dict
from padd_ds.data.batch import TokenBatch, encode_examples, usable_problems
from padd_ds.data.math import load_heldout_problems, load_train_problems
from padd_ds.data.splits import split_pool
from padd_ds.eval.evaluate import evaluate_problems
from padd_ds.launch.comm import all_reduce_
from padd_ds.launch.world import World
from padd_ds.models.export import (EXACT_ROUTING_FILE, engine_routes, export_engine, fold_router_bias, has_bias_slot,
                                   load_exact_routing, routing_fidelity)
from padd_ds.models.loading import load_causal_lm, load_tokenizer
from padd_ds.report.metrics import MetricsLogger
from padd_ds.engine import checkpoint as ckpt
from padd_ds.engine.guard import NonFiniteGuard
from padd_ds.teacher.feed import BatchPlan, TeacherFeed
from padd_ds.teacher.clusters import ClusterMap
from padd_ds.teacher.service import LocalTeacher, RemoteTeacher, TeacherModel, serve
from padd_ds.teacher.sparse import sparse_kd_loss

RESULT_TAG = 1  # bridge tag of the teacher's evaluation result (separate from requests)
STAGE1_TAG = 2  # bridge tag of the Stage I cluster setup (students -> teacher) and its records


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_paths(cfg: PaddConfig) -> tuple[str, str | None, str]:
    """(teacher, student or None when it is decompressed from the teacher, tokenizer)."""
    teacher = resolve_model_path(cfg.models.teacher, field_name="models.teacher")
    student = (resolve_model_path(cfg.models.student, field_name="models.student")
               if cfg.models.student is not None else None)
    tok = (resolve_model_path(cfg.models.tokenizer, field_name="models.tokenizer", need_config=False)
           if cfg.models.tokenizer else teacher)  # a tokenizer-only directory has no config.json
    return teacher, student, tok


def run(cfg: PaddConfig, world: World) -> dict | None:
    seed_everything(cfg.run.seed)
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, world.env.local_size)))
    if world.is_teacher:
        run_teacher(cfg, world)
        return None
    return run_student(cfg, world)


# ----------------------------------------------------------------------------------------
# Teacher ranks
# ----------------------------------------------------------------------------------------

def _evaluate(model, tok, cfg: PaddConfig, synced: bool = False) -> dict:
    problems = load_heldout_problems(cfg.data.source, limit=cfg.eval.num_problems)
    res = evaluate_problems(model, tok, problems, max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size, synced_gpus=synced)
    return {"accuracy": res["accuracy"], "n": res["n"], "per_level": res.get("per_level", {})}


def student_vocab_size(cfg: PaddConfig, student_path: str | None) -> int | None:
    """The student's vocab_size, read from its config without loading weights; None for a
    student decompressed from the teacher (same table). The teacher drops logit columns past
    it (teacher/service.py, forward_outputs)."""
    if student_path is None:
        return None
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(student_path, trust_remote_code=cfg.models.trust_remote_code)
    return getattr(conf.get_text_config(), "vocab_size", None)


def run_teacher(cfg: PaddConfig, world: World) -> None:
    teacher_path, student_path, tok_path = model_paths(cfg)
    tok = load_tokenizer(tok_path, cfg.models.trust_remote_code)
    model = load_causal_lm(teacher_path, cfg.models.dtype, cfg.models.trust_remote_code)
    vocab = student_vocab_size(cfg, student_path)
    sharded = world.teacher_parallel == "zero3"
    if sharded:
        from padd_ds.teacher.sharded import ShardedTeacher

        teacher = ShardedTeacher(model, bf16=next(model.parameters()).dtype == torch.bfloat16, vocab_limit=vocab)
        model = teacher.model
    else:
        teacher = TeacherModel(model, vocab_limit=vocab)
    result_work = None
    if cfg.eval.references and (world.roles.teacher_rank == 0 or sharded):
        # Evaluate first, while the students build their engine (a sharded teacher generates
        # on all its ranks in step). The result travels on its own bridge tag and the main
        # student collects it at the end.
        t0 = time.perf_counter()
        ev = _evaluate(model, tok, cfg, synced=sharded)
        ev["seconds"] = time.perf_counter() - t0
        if world.roles.teacher_rank == 0:
            result_work = world.bridge.post_json({"teacher_eval": ev}, dst=0, tag=RESULT_TAG)
    if cfg.stage1.enabled:
        teacher.cluster_map = teacher_stage1_setup(cfg, world, model, sharded)
    if world.is_teacher_leader:
        stats = serve(world.bridge, teacher, world.my_students(), cfg.topology.timeout_s)
        if sharded:
            teacher.stop()
        print(f"[teacher {world.roles.teacher_rank}] served {stats.requests} requests, {stats.tokens} tokens; "
              f"busy {stats.busy_s:.1f}s idle {stats.idle_s:.1f}s", flush=True)
    else:
        n = teacher.member_loop()
        print(f"[teacher {world.roles.teacher_rank}] scored {n} shards for the leader", flush=True)
    if result_work is not None:
        result_work.wait()


def teacher_stage1_setup(cfg: PaddConfig, world: World, model, sharded: bool) -> ClusterMap:
    """The teacher's neuron clusters for the student's layers. The first student of this
    teacher sends the layer map and, for a decompressed student, the clusters it was built
    from; otherwise the teacher clusters its own FFNs (all ranks of a sharded teacher take
    part: gathering a layer's weights is collective). The records go back to that student."""
    from padd_ds.teacher.clusters import cluster_teacher

    setup = None
    if world.is_teacher_leader:
        setup = world.bridge.recv_json(src=world.my_students()[0], tag=STAGE1_TAG, timeout_s=cfg.topology.timeout_s)
    if sharded:
        import torch.distributed as tdist

        box = [setup]
        tdist.broadcast_object_list(box, src=0)
        setup = box[0]
    t0 = time.perf_counter()
    if setup["assignment"] is not None:
        cmap = ClusterMap(setup["layers"], torch.tensor(setup["assignment"], dtype=torch.int64), setup["num_clusters"])
        records = [{"student_layer": l, "teacher_layer": t, "source": "decompression"}
                   for l, t in enumerate(setup["layers"])]
    else:
        cmap, records = cluster_teacher(model, setup["layers"], setup["num_clusters"], cfg.stage1.cluster_input,
                                        cfg.run.seed)
    if world.is_teacher_leader:
        world.bridge.post_json({"records": records, "seconds": time.perf_counter() - t0},
                               dst=world.my_students()[0], tag=STAGE1_TAG).wait(cfg.topology.timeout_s)
    return cmap


# ----------------------------------------------------------------------------------------
# Student ranks
# ----------------------------------------------------------------------------------------

def lm_loss(logits: torch.Tensor, batch: TokenBatch, denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the response tokens (position t predicts token t+1), summed / `denom`."""
    m = batch.loss_mask[:, :-1]
    targets = batch.ids[:, 1:][m]
    total = F.cross_entropy(logits[:, :-1][m].float(), targets, reduction="sum")
    return total / (m.sum().clamp(min=1) if denom is None else denom)


def _all_sum(values: list[float]) -> list[float]:
    from padd_ds.launch.comm import all_sum

    return all_sum(values)


def global_token_count(batch: TokenBatch) -> float:
    """Loss positions in this micro-step summed over all student ranks.

    Each rank divides its loss sum by this count times the number of ranks; DeepSpeed then
    averages gradients over ranks, so the update equals a single process seeing the whole
    global batch (a per-rank mean would overweight ranks with short sequences)."""
    return _all_sum([float(batch.loss_mask.sum())])[0]


@torch.no_grad()
def probe_logits(engine, tok, cfg: PaddConfig, problems: list[dict]) -> tuple[TokenBatch, torch.Tensor]:
    """Engine logits on a fixed batch (every student rank runs it; AutoEP needs them all)."""
    batch = encode_examples(tok, problems[:4], cfg.data.max_prompt_tokens, cfg.data.max_response_tokens)
    engine.eval()
    logits = engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits.float()
    engine.train()
    return batch, logits


def max_logit_diff(model, batch: TokenBatch, reference: torch.Tensor) -> float:
    """Largest |logit| difference over the non-padded positions of `batch`."""
    with torch.no_grad():
        logits = model(input_ids=batch.ids, attention_mask=batch.attention_mask).logits.float()
    valid = batch.attention_mask.bool()
    return (logits[valid] - reference[valid]).abs().max().item()


def prepare_student(cfg: PaddConfig, world: World, teacher_path: str, tok, run_dir: Path) -> tuple[str, dict | None]:
    """The student checkpoint to train: the recipe's pre-trained MoE, or (models.student=null)
    one decompressed from the teacher by the main student rank into run_dir/stage1/student
    (the other ranks wait for it). Returns (path, decompression provenance or None)."""
    import deepspeed.comm as dist

    from padd_ds.models.decompress import PROVENANCE_FILE, decompress, save_decompressed

    _, student_path, _ = model_paths(cfg)
    if student_path is not None:
        return student_path, None
    out = run_dir / "stage1" / "student"
    if world.is_main and not (out / PROVENANCE_FILE).exists():  # a resumed run reuses its student
        s1 = cfg.stage1
        dense = load_causal_lm(teacher_path, cfg.models.dtype, cfg.models.trust_remote_code)
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


def send_stage1_setup(cfg: PaddConfig, world: World, student_cfg, teacher_path: str, teacher,
                      provenance: dict | None):
    """Tell the teacher which of its layers each student layer learns from (floor(l L_T / L_S))
    and, for a decompressed student, its clusters. Colocated: set the map directly. Returns
    a callable that collects the teacher's clustering records (None if this rank does not)."""
    from transformers import AutoConfig

    from padd_ds.teacher.clusters import cluster_map_from_provenance, cluster_teacher, layer_map
    from padd_ds.models.arch import moe_shape

    if provenance is not None:
        cmap = cluster_map_from_provenance(provenance)
        setup = {"layers": cmap.layers, "num_clusters": cmap.num_clusters, "assignment": cmap.assignment.tolist()}
    else:
        t_layers = AutoConfig.from_pretrained(teacher_path, trust_remote_code=cfg.models.trust_remote_code).num_hidden_layers
        setup = {"layers": layer_map(student_cfg.num_hidden_layers, t_layers),
                 "num_clusters": moe_shape(student_cfg)[0], "assignment": None}
    if world.roles.role == "colocated":
        if setup["assignment"] is not None:
            teacher.teacher.cluster_map = cmap
            return lambda: [{"student_layer": l, "teacher_layer": t, "source": "decompression"}
                            for l, t in enumerate(cmap.layers)]
        cmap2, records = cluster_teacher(teacher.teacher.model, setup["layers"], setup["num_clusters"],
                                         cfg.stage1.cluster_input, cfg.run.seed)
        teacher.teacher.cluster_map = cmap2
        return lambda: records
    me = world.env.rank
    from padd_ds.launch.roles import students_of_teacher

    r = world.roles
    first = (list(range(r.num_student)) if world.teacher_parallel == "zero3"
             else students_of_teacher(world.my_teacher() - r.num_student, r.num_student, r.num_teacher))[0]
    if me != first:
        return lambda: None
    work = world.bridge.post_json(setup, dst=world.my_teacher(), tag=STAGE1_TAG)

    def collect():
        reply = world.bridge.recv_json(src=world.my_teacher(), tag=STAGE1_TAG, timeout_s=cfg.topology.timeout_s)
        work.wait(cfg.topology.timeout_s)
        return reply["records"]
    return collect


def run_student(cfg: PaddConfig, world: World) -> dict | None:
    import deepspeed.comm as dist

    from padd_ds.engine.build import initialize_engine

    from padd_ds.launch import signals as preempt  # installed by train.py before anything else

    roles = world.roles
    rank, num_students = roles.student_rank or 0, max(1, roles.num_student)
    teacher_path, _, tok_path = model_paths(cfg)
    run_dir = Path(cfg.run.output_dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    tok = load_tokenizer(tok_path, cfg.models.trust_remote_code)
    student_path, provenance = prepare_student(cfg, world, teacher_path, tok, run_dir)
    student = load_causal_lm(student_path, cfg.models.dtype, cfg.models.trust_remote_code)

    if roles.role == "colocated":
        tmodel = load_causal_lm(teacher_path, cfg.models.dtype, cfg.models.trust_remote_code)
        teacher = LocalTeacher(TeacherModel(tmodel, vocab_limit=student.config.get_text_config().vocab_size),
                               cfg.teacher.logits_top_k, cfg.teacher.logits_mode)
    else:
        teacher = RemoteTeacher(world.bridge, world.my_teacher(), cfg.teacher.logits_top_k,
                                cfg.teacher.request_timeout_s, rank, cfg.teacher.logits_mode)
    collect_clusters = (send_stage1_setup(cfg, world, student.config, teacher_path, teacher, provenance)
                        if cfg.stage1.enabled else None)

    before = _evaluate(student, tok, cfg) if world.is_main and cfg.eval.references else None
    engine, ds_config = initialize_engine(cfg, student, num_students)
    if world.is_main:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    pool = load_train_problems(cfg.data.source, cfg.data.question_field, cfg.data.answer_field)
    pool = usable_problems(tok, pool, cfg.data.max_prompt_tokens, cfg.data.long_prompts,  # long prompts, no solution
                           source=f"data.source={cfg.data.source}", log=world.is_main)
    parts = split_pool(pool, cfg.data.split_fractions, cfg.run.seed)

    def encode(problems: list[dict]) -> TokenBatch:
        return encode_examples(tok, problems, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens)

    logger = MetricsLogger(run_dir, to_dict(cfg), enabled=world.is_main, project=cfg.logging.wandb_project,
                           mode=cfg.logging.wandb_mode, run_name=cfg.run.name, jsonl=cfg.logging.jsonl)

    # Resume: the newest complete checkpoint wins; Stage I is then already in its weights.
    ckpt_dir = run_dir / "checkpoints"
    found = ckpt.latest_valid(ckpt_dir) if cfg.train.resume == "auto" else None
    state = ckpt.load(engine, found) if found is not None else None
    records = collect_clusters() if collect_clusters is not None else None  # the teacher always replies
    stage1 = None
    if cfg.stage1.enabled and state is None:
        from padd_ds.stage1.student import Stage1

        stage1 = Stage1(cfg, engine, teacher, encode, parts, rank, num_students, logger.log).run(provenance is not None)
        stage1["clusters"] = records
        if world.is_main:
            (run_dir / "stage1").mkdir(parents=True, exist_ok=True)
            (run_dir / "stage1" / "report.json").write_text(json.dumps(stage1, indent=2))
            print_stage1(stage1)
    elif cfg.stage1.enabled and (run_dir / "stage1" / "report.json").exists():
        stage1 = json.loads((run_dir / "stage1" / "report.json").read_text())
    if state is not None and world.is_main:
        print(f"[resume] continuing from {found} (step {state['step']})", flush=True)

    # Main phase on D_C: online KD (train.mode=distill) or Stages II-IV (train.mode=padd).
    loop = train_distill if cfg.train.mode == "distill" else train_padd
    history, stopped = loop(cfg, world, engine, teacher, tok, encode, parts["C"], logger, ckpt_dir, state, preempt)
    teacher.close()
    if stopped is not None:  # preempted: the checkpoint is written; no export or evaluation
        if world.is_main and roles.role != "colocated" and cfg.eval.references:  # take the teacher's posted evaluation so it can exit
            world.bridge.recv_json(src=roles.num_student, tag=RESULT_TAG, timeout_s=cfg.topology.timeout_s)
        if world.is_main:
            print(f"[preempted] signal received; checkpoint at step {stopped} written to {ckpt_dir}; "
                  "restart with train.resume=auto to continue", flush=True)
        logger.close()
        dist.barrier()
        return {"preempted_at": stopped}

    # Export. A Stage IV bias has no slot in Qwen3-MoE/Mixtral routers: fold it into the router
    # weights (fitted on held-out D_D tokens) and measure how often the exported model still
    # picks the engine's experts.
    held = BatchPlan(len(parts["D"]), cfg.train.micro_batch_size, num_students, 1, cfg.run.seed + 29)
    held_batches = [encode([parts["D"][j] for j in held.indices(i, 0, rank)])
                    for i in range(min(8, held.batches_per_epoch))]
    fit_batches, fidelity_batches = held_batches[0::2], held_batches[1::2]  # fidelity on tokens the fold never saw
    exact_bias = has_bias_slot(engine.module)  # DeepSeek-V3: the bias has a slot, no fold needed
    folded = None if exact_bias else fold_router_bias(engine, fit_batches)[0]
    engine_choices = engine_routes(engine, fidelity_batches)
    export_dir = run_dir / "hf"
    export_engine(engine, export_dir, tokenizer=tok, router_weights=folded,
                  metadata={"source": "padd-ds", "mode": cfg.train.mode, "steps": cfg.train.steps,
                            "teacher": cfg.models.teacher, "student": cfg.models.student,
                            "router_bias": "added to e_score_correction_bias (exact)" if exact_bias else
                                           "folded into the router weights (softmax regression, see "
                                           "padd_ds/models/export.py); exact routing: load_exact_routing with "
                                           f"{EXACT_ROUTING_FILE}" if folded is not None else "zero"})
    probe, engine_logits = probe_logits(engine, tok, cfg, pool)
    ckpt_dir = ckpt.latest_valid(ckpt_dir) or ckpt_dir

    result = None
    if world.is_main:
        after_model = load_causal_lm(str(export_dir), "float32")
        export_diff = max_logit_diff(after_model, probe, engine_logits)  # export fidelity
        fidelity = routing_fidelity(after_model, fidelity_batches, engine_choices)
        after = _evaluate(after_model, tok, cfg)
        exact = None  # a folded export: check (and optionally evaluate) its exact routing
        if folded is not None:
            exact_model = load_exact_routing(load_causal_lm(str(export_dir), "float32"), export_dir)
            exact = {"max_abs_logit_diff": max_logit_diff(exact_model, probe, engine_logits),
                     "routing_fidelity": routing_fidelity(exact_model, fidelity_batches, engine_choices),
                     "student_after": _evaluate(exact_model, tok, cfg) if cfg.eval.exact_routing else None}
            del exact_model
        if not cfg.eval.references:
            teacher_eval = None
        elif roles.role == "colocated":
            teacher_eval = _evaluate(teacher.teacher.model, tok, cfg)
        else:
            teacher_eval = world.bridge.recv_json(src=roles.num_student, tag=RESULT_TAG,
                                                  timeout_s=cfg.topology.timeout_s)["teacher_eval"]
        result = {"teacher": teacher_eval, "student_before": before, "student_after": after,
                  "history": history, "teacher_wait_s": teacher.stats.wait_s,
                  "export_max_abs_logit_diff": export_diff, "export_routing_fidelity": fidelity,
                  "export_bias_folded": folded is not None, "export_bias_exact": exact_bias,
                  "export_exact_routing": exact, "stage1": stage1,
                  "checkpoint": str(ckpt_dir), "export": str(export_dir)}
        (run_dir / "results.json").write_text(json.dumps(result, indent=2))
        logger.summary({key: r["accuracy"] for key, r in (("eval/teacher_acc", teacher_eval),
                        ("eval/student_before_acc", before), ("eval/student_after_acc", after),
                        ("eval/student_after_exact_routing_acc", exact and exact["student_after"])) if r is not None})
        print_table(result)
        from padd_ds.report.report import write_run_report

        print(f"report: {write_run_report(run_dir, logger)}", flush=True)
    logger.close()
    dist.barrier()
    return result


def train_distill(cfg: PaddConfig, world: World, engine, teacher, tok, encode, problems: list[dict], logger,
                  ckpt_dir: Path, state: dict | None, preempt) -> tuple[list[dict], int | None]:
    """Online KD on D_C: the teacher's logits for each batch, requested `prefetch` ahead.
    Returns (history, the step it stopped at when preempted, else None)."""
    rank, num_students = world.roles.student_rank or 0, max(1, world.roles.num_student)
    start = state["step"] if state else 0
    history: list[dict] = list(state.get("history", [])) if state else []
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)  # NaN/inf loss on any rank: skip the step everywhere
    guard.load_state_dict(state and state.get("nonfinite"))
    plan = BatchPlan(len(problems), cfg.train.micro_batch_size, num_students, cfg.train.grad_accum, cfg.run.seed)
    feed = TeacherFeed(teacher, encode, problems, plan, rank, cfg.train.steps, cfg.teacher.prefetch, start_step=start)
    progress = _progress(cfg, world, cfg.train.steps)
    engine.train()
    new_window = lambda: {"kd": 0.0, "lm": 0.0, "count": 0.0, "tokens": 0, "wait": feed.wait_s,  # noqa: E731
                          "t0": time.perf_counter()}
    window, stopped = new_window(), None
    for step, micro, batch, out in feed:
        denom = global_token_count(batch) / num_students
        logits = engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
        kd = sparse_kd_loss(logits, out.logits, batch.loss_mask, cfg.train.kd_temperature, denom=denom)
        lm = lm_loss(logits, batch, denom=denom)
        loss = cfg.stage2.kd_weight * kd + cfg.train.lm_weight * lm
        guard.backward_step(engine, loss, step)

        window["kd"] += kd.item() * denom        # back to sums, for exact global means
        window["lm"] += lm.item() * denom
        window["count"] += float(batch.loss_mask.sum())
        window["tokens"] += int(batch.lengths.sum())
        if micro != cfg.train.grad_accum - 1:
            continue
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            dt = time.perf_counter() - window["t0"]
            kd_s, lm_s, count, wait_s, tokens = _all_sum([window["kd"], window["lm"], window["count"],
                                                          feed.wait_s - window["wait"], window["tokens"]])
            row = {"train/kd_loss": kd_s / count, "train/lm_loss": lm_s / count,
                   "teacher/wait_fraction": wait_s / num_students / dt, "train/tokens_per_s": tokens / dt,
                   "train/lr": engine.get_lr()[0], "train/nonfinite_skipped": guard.skipped}
            history.append({"step": step + 1, **row})
            logger.log(row, step + 1)
            if progress is not None:
                progress.update(step + 1, row)
            window = new_window()
        if _maybe_save(cfg, engine, ckpt_dir, step + 1, {"history": history, "nonfinite": guard.state_dict()},
                       preempt):
            stopped = step + 1
            break
    if progress is not None:
        progress.close()
    return history, stopped


def train_padd(cfg: PaddConfig, world: World, engine, teacher, tok, encode, problems: list[dict], logger,
               ckpt_dir: Path, state: dict | None, preempt) -> tuple[list[dict], int | None]:
    """Stages II-IV on D_C, one optimiser step per batch of rollouts:

        rollouts (G per prompt, all ranks in step) -> rewards -> group advantages
        -> teacher scores the rollouts (in flight while the student runs its forward)
        -> Stage III policy loss with router drift vs the previous step's routers
           + Stage II advantage-tempered KD on the response tokens (+ optional aux balance loss)
        -> backward, step -> Stage IV: all-reduced expert loads and advantages -> router bias

    Ablations and baselines are config switches of this one loop: stage2.enabled=false
    (no teacher: MoE-GRPO), stage2.temperature_coupling=fixed (online KD + GRPO),
    stage3.enabled=false (plain GRPO ratio), stage3.policy=rspo|gspo, stage4.enabled=false.
    With one update per rollout batch (stage3.updates_per_batch=1) the sampling policy is the
    current one, so the ratio pi/pi_old is 1 at the update (more updates reuse the batch);
    the drift term compares against the routers of the previous step (the "previous routers" of the method), which is where routes jump."""
    import dataclasses


    from padd_ds.models.router import router_weights, routers, set_bias
    from padd_ds.models.export import has_bias_slot
    from padd_ds.rl.balance import BiasController, fold_bias_into_routers
    from padd_ds.rl.rewards import group_advantages, reward
    from padd_ds.rl.rollout import sample_rollouts
    from padd_ds.rl.step import update_on_rollouts

    s2, s3, s4 = cfg.stage2, cfg.stage3, cfg.stage4
    rank, num_students = world.roles.student_rank or 0, max(1, world.roles.num_student)
    G = s3.group_size
    plan = BatchPlan(len(problems), cfg.train.micro_batch_size // G, num_students, cfg.train.grad_accum, cfg.run.seed)
    mod = engine.module
    L, N = len(routers(mod)), routers(mod)[0].num_experts
    controller = BiasController(L, N, s4)
    slotless = s4.enabled and not has_bias_slot(mod)  # a slot exports the bias exactly: never fold there
    T, settle = cfg.train.steps, s4.settle_steps if slotless else 0
    policy_cfg = s3 if s3.enabled else dataclasses.replace(s3, policy="grpo")
    use_teacher = s2.enabled and s2.kd_weight > 0
    start, history, snap_prev = 0, [], None
    if state is not None:
        start, history, snap_prev = state["step"], list(state["history"]), state["router_snapshot"]
        controller.load_state_dict(state["balance"])
        set_bias(mod, controller.bias)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)  # NaN/inf loss on any rank: skip the step everywhere
    guard.load_state_dict(state and state.get("nonfinite"))
    progress = _progress(cfg, world, cfg.train.steps)
    window: dict[str, float] = {}
    routing_log = None
    if world.is_main:  # per-layer expert loads over training, for the report's heatmap
        from padd_ds.eval.routing import RoutingLog

        routing_log = RoutingLog(Path(cfg.run.output_dir) / "routing.json")

    def add(key: str, value: float) -> None:
        window[key] = window.get(key, 0.0) + float(value)

    t_window = time.perf_counter()
    for step in range(start, cfg.train.steps):
        snap_cur = router_weights(mod)   # the routers of this step: the drift reference of the next one
        prev = snap_prev if snap_prev is not None else snap_cur
        counts, adv_sum, adv_cnt = (torch.zeros(L, N, dtype=torch.float64) for _ in range(3))
        for micro in range(cfg.train.grad_accum):
            probs = [problems[i] for i in plan.indices(step, micro, rank)]
            t0 = time.perf_counter()
            ro = sample_rollouts(mod, tok, probs, G, s3.rollout_temperature, s3.rollout_top_p,
                                 cfg.data.max_response_tokens, cfg.data.max_prompt_tokens, synced=num_students > 1)
            add("gen_s", time.perf_counter() - t0)
            batch = ro.batch
            rid = teacher.submit(step, batch.ids, batch.lengths) if use_teacher else None
            scored = [reward(r, probs[i // G]["answer"], policy_cfg) for i, r in enumerate(ro.responses)]
            rewards = torch.tensor([x for x, _ in scored]).view(-1, G)
            adv, adv_stats = group_advantages(rewards)
            adv = adv.reshape(-1)

            fetch = None
            if use_teacher:
                def fetch(rid=rid):
                    w0 = teacher.stats.wait_s
                    out = teacher.result(rid)
                    add("wait_s", teacher.stats.wait_s - w0)
                    return out.logits
            res = update_on_rollouts(engine, batch, adv, prev, cfg, policy_cfg, num_students, fetch, guard, step)
            counts += res.counts
            adv_sum += res.adv_sum
            adv_cnt += res.adv_count
            for key, value in res.stats.items():
                add(key, value)
            add("drift_sum", res.drift.sum())
            add("drift_p95", torch.quantile(res.drift, 0.95) if res.drift.numel() else 0.0)
            add("drift_n", res.drift.numel())
            add("reward", rewards.sum())
            add("correct", sum(d["correct"] for _, d in scored))
            add("responses", len(ro.responses))
            add("zero_var_groups", adv_stats["zero_variance_groups"])
            add("groups", adv_stats["groups"])
            add("resp_tokens", ro.response_lengths.sum())
            add("tokens", batch.lengths.sum())
            add("micro", 1)

        for t in (counts, adv_sum, adv_cnt):
            all_reduce_(t)
        load = (counts / counts.sum(1, keepdim=True).clamp(min=1)).float()             # f_j per layer
        if s4.enabled and step < T - settle:  # settling: the bias stays 0 to the end
            controller.update(counts, adv_sum, adv_cnt)
            set_bias(mod, controller.bias)
        snap_prev = snap_cur
        # Folds: every stage4.fold_every steps, and once before the settle_steps. Never on the
        # last step: the export folds what is left, so its routing fidelity still measures a
        # fold against the engine as trained.
        if slotless and step + 1 < T and ((s4.fold_every and (step + 1) % s4.fold_every == 0)
                                          or (settle and step + 1 == T - settle)):
            kept = fold_bias_into_routers(engine, [batch], controller)
            if kept is not None:
                add("folds", 1)
                add("fold_kept", kept)
                # A fold re-expresses the routes, it is not a policy update: the next step's
                # drift is measured from the folded routers.
                snap_prev = router_weights(mod)
        add("steps", 1)
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            keys = sorted(window)
            tot = dict(zip(keys, _all_sum([window[k] for k in keys])))
            dt = time.perf_counter() - t_window
            nl = N * load                                                                  # 1 = perfectly even
            row = {"train/reward": tot["reward"] / tot["responses"], "train/accuracy": tot["correct"] / tot["responses"],
                   "train/policy_loss": tot["policy_loss"] / max(
                       tot["resp_tokens"] if s3.loss_agg == "token_mean" else tot["responses"], 1),
                   "train/clip_frac": tot["clip_frac"] / max(tot["resp_tokens"], 1),
                   "train/zero_variance_groups": tot["zero_var_groups"] / tot["groups"],
                   "train/response_tokens": tot["resp_tokens"] / tot["responses"],
                   "train/tokens_per_s": tot["tokens"] / dt, "train/generate_fraction": tot["gen_s"] / num_students / dt,
                   "routing/drift_mean": tot["drift_sum"] / max(tot["drift_n"], 1),
                   "routing/drift_p95": tot["drift_p95"] / tot["micro"],
                   "routing/load_cv": float((load.std(1, unbiased=False) / load.mean(1)).mean()),
                   "routing/load_max": float(nl.max()), "routing/load_min": float(nl.min()),
                   "routing/load_entropy": float(-(load * load.clamp(min=1e-12).log()).sum(1).mean() / math.log(N)),
                   "routing/bias_norm": float(controller.bias.norm()),
                   "train/lr": engine.get_lr()[0], "train/nonfinite_skipped": guard.skipped}
            if tot.get("folds"):  # Stage IV folds in this window: share of routes they kept
                row["routing/fold_kept"] = tot["fold_kept"] / tot["folds"]
            if use_teacher:
                row.update({"train/kd_loss": tot["kd_loss"] / max(tot["resp_tokens"], 1),
                            "train/kd_temperature": tot["kd_temperature"] / tot["responses"],
                            "teacher/wait_fraction": tot["wait_s"] / num_students / dt})
            history.append({"step": step + 1, **row})
            logger.log(row, step + 1)
            if routing_log is not None:
                routing_log.add_counts(step + 1, {l: counts[l].tolist() for l in range(L)}, drift=res.drift)
            if progress is not None:
                progress.update(step + 1, row)
            window, t_window = {}, time.perf_counter()
        if _maybe_save(cfg, engine, ckpt_dir, step + 1,
                       {"history": history, "balance": controller.state_dict(), "router_snapshot": snap_prev,
                        "nonfinite": guard.state_dict()}, preempt):
            if progress is not None:
                progress.close()
            return history, step + 1
    if progress is not None:
        progress.close()
    return history, None


def _maybe_save(cfg: PaddConfig, engine, ckpt_dir: Path, step: int, state: dict, preempt) -> bool:
    """Checkpoint every train.save_every steps, after the last one, and when preempted.
    Returns True when the run must stop here (preempted before its last step)."""
    stop = preempt.agreed() and step < cfg.train.steps
    if stop or step == cfg.train.steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
        ckpt.save(engine, ckpt_dir, step, state, cfg.train.keep_last)
    return stop


def print_stage1(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Stage I on D_D (router init: {report['router_init']})")
    for col in ("", "agreement top-1", "agreement top-k", "path KL", "KD loss"):
        t.add_column(col, justify="right")
    for name in ("before", "after_init", "after_warmup"):
        r = report[name]
        t.add_row(name.replace("_", " "), f"{r['agreement_top1']:.3f}", f"{r['agreement_topk']:.3f}",
                  f"{r['path_kl']:.3f}", f"{r['kd_loss']:.4f}")
    Console().print(t)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Held-out accuracy (greedy pass@1)")
    t.add_column("model")
    t.add_column("accuracy", justify="right")
    t.add_column("n", justify="right")
    for name, key in (("teacher", "teacher"), ("student (before)", "student_before"),
                      ("student (after)", "student_after")):
        r = result[key]
        if r is not None:  # eval.references=false: only the trained student
            t.add_row(name, f"{r['accuracy']:.3f}", str(r["n"]))
    Console().print(t)
    h = result["history"]
    for key in ("train/kd_loss", "train/reward"):
        if h and key in h[0]:
            print(f"{key}: {h[0][key]:.4f} (step {h[0]['step']}) -> {h[-1][key]:.4f} (step {h[-1]['step']})")
    print(f"export: max |logit diff| vs the engine {result['export_max_abs_logit_diff']:.2e}, routing fidelity "
          f"{result['export_routing_fidelity']:.4f}{' (Stage IV bias folded)' if result['export_bias_folded'] else ''}",
          flush=True)
    exact = result.get("export_exact_routing")
    if exact is not None:
        acc = exact["student_after"]
        print(f"export with load_exact_routing: max |logit diff| {exact['max_abs_logit_diff']:.2e}, routing fidelity "
              f"{exact['routing_fidelity']:.4f}" + (f", accuracy {acc['accuracy']:.3f}" if acc else ""), flush=True)


class _Progress:
    SHOWN = {"train/kd_loss": "kd", "train/lm_loss": "lm", "train/reward": "reward", "routing/drift_mean": "drift",
             "routing/load_cv": "load cv", "teacher/wait_fraction": "wait"}

    def __init__(self, total: int, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[info]}"))
        self.task = self.p.add_task("train", total=total, info="")
        self.p.start()

    def update(self, step: int, row: dict) -> None:
        self.p.update(self.task, completed=step,
                      info=" ".join(f"{short} {row[k]:.3f}" for k, short in self.SHOWN.items() if k in row))

    def close(self) -> None:
        self.p.stop()


def _progress(cfg: PaddConfig, world: World, total: int):
    return _Progress(total, cfg.train.mode) if (world.is_main and cfg.logging.progress) else None

