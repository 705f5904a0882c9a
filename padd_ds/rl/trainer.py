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
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from padd_ds.config import ConfigError, PaddConfig, dump_yaml, resolve_model_path, to_dict
from padd_ds.data.batch import TokenBatch, encode_examples
from padd_ds.data.math import load_heldout_problems, load_train_problems
from padd_ds.data.splits import split_pool
from padd_ds.eval.evaluate import evaluate_problems
from padd_ds.launch.world import World
from padd_ds.models.export import export_engine
from padd_ds.models.loading import load_causal_lm, load_tokenizer
from padd_ds.report.metrics import MetricsLogger
from padd_ds.teacher.feed import BatchPlan, TeacherFeed
from padd_ds.teacher.service import ClusterMap, LocalTeacher, RemoteTeacher, TeacherModel, serve
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
    tok = resolve_model_path(cfg.models.tokenizer, field_name="models.tokenizer") if cfg.models.tokenizer else teacher
    return teacher, student, tok


def check_supported(cfg: PaddConfig) -> None:
    """Refuse, before any process group exists, what this trainer cannot run yet: the PADD
    Stages II-IV (train.mode=padd, issue #5)."""
    if cfg.train.mode != "distill":
        raise ConfigError(f"train.mode={cfg.train.mode!r} is not built yet; use train.mode=distill "
                          "(online KD, after Stage I when stage1.enabled)")
    if cfg.models.student is None and cfg.stage1.router_init == "keep":
        raise ConfigError("stage1.router_init=keep needs a pre-trained student; a decompressed one "
                          "(models.student=null) starts from the centroids or a random router")
    if cfg.models.student is not None and cfg.stage1.enabled and cfg.stage1.router_init == "centroids" \
            and cfg.stage1.projection == "none":
        raise ConfigError("stage1.projection=none cannot place teacher centroids in a pre-trained student's "
                          "hidden space; use stage1.projection=lstsq (or router_init=keep/random)")


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


def run_teacher(cfg: PaddConfig, world: World) -> None:
    teacher_path, _, tok_path = model_paths(cfg)
    tok = load_tokenizer(tok_path, cfg.models.trust_remote_code)
    model = load_causal_lm(teacher_path, cfg.models.dtype, cfg.models.trust_remote_code)
    sharded = world.teacher_parallel == "zero3"
    if sharded:
        from padd_ds.teacher.sharded import ShardedTeacher

        teacher = ShardedTeacher(model, bf16=next(model.parameters()).dtype == torch.bfloat16)
        model = teacher.model
    else:
        teacher = TeacherModel(model)
    result_work = None
    if world.roles.teacher_rank == 0 or sharded:
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
    from padd_ds.stage1.targets import cluster_teacher

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
    import deepspeed.comm as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


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
    if world.is_main:
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

    from padd_ds.stage1.targets import cluster_map_from_provenance, cluster_teacher, layer_map
    from padd_ds.models.loading import moe_shape

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

    from padd_ds.models.engine import initialize_engine

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
        teacher = LocalTeacher(TeacherModel(tmodel), cfg.teacher.logits_top_k, cfg.teacher.logits_mode)
    else:
        teacher = RemoteTeacher(world.bridge, world.my_teacher(), cfg.teacher.logits_top_k,
                                cfg.teacher.request_timeout_s, rank, cfg.teacher.logits_mode)
    collect_clusters = (send_stage1_setup(cfg, world, student.config, teacher_path, teacher, provenance)
                        if cfg.stage1.enabled else None)

    before = _evaluate(student, tok, cfg) if world.is_main else None
    engine, ds_config = initialize_engine(cfg, student, num_students)
    if world.is_main:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    pool = load_train_problems(cfg.data.source, cfg.data.question_field, cfg.data.answer_field)
    parts = split_pool(pool, cfg.data.split_fractions, cfg.run.seed)

    def encode(problems: list[dict]) -> TokenBatch:
        return encode_examples(tok, problems, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens)

    logger = MetricsLogger(run_dir, to_dict(cfg), enabled=world.is_main, project=cfg.logging.wandb_project,
                           mode=cfg.logging.wandb_mode, run_name=cfg.run.name, jsonl=cfg.logging.jsonl)

    stage1 = None
    if cfg.stage1.enabled:
        from padd_ds.stage1.student import Stage1

        records = collect_clusters()
        stage1 = Stage1(cfg, engine, teacher, encode, parts, rank, num_students, logger.log).run(provenance is not None)
        stage1["clusters"] = records
        if world.is_main:
            (run_dir / "stage1").mkdir(parents=True, exist_ok=True)
            (run_dir / "stage1" / "report.json").write_text(json.dumps(stage1, indent=2))
            print_stage1(stage1)

    # Main phase on D_C: online KD (Stages II-IV replace this loss in train.mode=padd).
    plan = BatchPlan(len(parts["C"]), cfg.train.micro_batch_size, num_students, cfg.train.grad_accum, cfg.run.seed)
    feed = TeacherFeed(teacher, encode, parts["C"], plan, rank, cfg.train.steps, cfg.teacher.prefetch)
    history: list[dict] = []
    progress = _progress(cfg, world, cfg.train.steps)
    engine.train()
    new_window = lambda: {"kd": 0.0, "lm": 0.0, "count": 0.0, "tokens": 0, "wait": feed.wait_s,  # noqa: E731
                          "t0": time.perf_counter()}
    window = new_window()
    for i, (step, micro, batch, out) in enumerate(feed):
        denom = global_token_count(batch) / num_students
        logits = engine(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
        kd = sparse_kd_loss(logits, out.logits, batch.loss_mask, cfg.train.kd_temperature, denom=denom)
        lm = lm_loss(logits, batch, denom=denom)
        loss = cfg.stage2.kd_weight * kd + cfg.train.lm_weight * lm
        engine.backward(loss)
        engine.step()

        window["kd"] += kd.item() * denom        # back to sums, for exact global means
        window["lm"] += lm.item() * denom
        window["count"] += float(batch.loss_mask.sum())
        window["tokens"] += int(batch.lengths.sum())
        last = i == len(feed) - 1
        if micro == cfg.train.grad_accum - 1 and ((step + 1) % cfg.train.log_every == 0 or last):
            dt = time.perf_counter() - window["t0"]
            kd_s, lm_s, count, wait_s, tokens = _all_sum([window["kd"], window["lm"], window["count"],
                                                          feed.wait_s - window["wait"], window["tokens"]])
            row = {"train/kd_loss": kd_s / count, "train/lm_loss": lm_s / count,
                   "teacher/wait_fraction": wait_s / num_students / dt, "train/tokens_per_s": tokens / dt,
                   "train/lr": engine.get_lr()[0]}
            history.append({"step": step + 1, **row})
            logger.log(row, step + 1)
            if progress is not None:
                progress.update(step + 1, row)
            window = new_window()
    if progress is not None:
        progress.close()
    teacher.close()

    ckpt_dir = run_dir / "checkpoints"
    engine.save_checkpoint(str(ckpt_dir), tag=f"step_{cfg.train.steps}",
                           client_state={"step": cfg.train.steps, "rng": torch.get_rng_state()})
    export_dir = run_dir / "hf"
    export_engine(engine, export_dir, tokenizer=tok,
                  metadata={"source": "padd-ds", "mode": cfg.train.mode, "steps": cfg.train.steps,
                            "teacher": cfg.models.teacher, "student": cfg.models.student})
    probe, engine_logits = probe_logits(engine, tok, cfg, pool)

    result = None
    if world.is_main:
        after_model = load_causal_lm(str(export_dir), "float32")
        export_diff = max_logit_diff(after_model, probe, engine_logits)  # export fidelity
        after = _evaluate(after_model, tok, cfg)
        if roles.role == "colocated":
            teacher_eval = _evaluate(teacher.teacher.model, tok, cfg)
        else:
            teacher_eval = world.bridge.recv_json(src=roles.num_student, tag=RESULT_TAG,
                                                  timeout_s=cfg.topology.timeout_s)["teacher_eval"]
        result = {"teacher": teacher_eval, "student_before": before, "student_after": after,
                  "history": history, "teacher_wait_s": teacher.stats.wait_s,
                  "export_max_abs_logit_diff": export_diff, "stage1": stage1,
                  "checkpoint": str(ckpt_dir), "export": str(export_dir)}
        (run_dir / "results.json").write_text(json.dumps(result, indent=2))
        logger.summary({"eval/teacher_acc": teacher_eval["accuracy"],
                        "eval/student_before_acc": before["accuracy"],
                        "eval/student_after_acc": after["accuracy"]})
        print_table(result)
    logger.close()
    dist.barrier()
    return result


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
        t.add_row(name, f"{r['accuracy']:.3f}", str(r["n"]))
    Console().print(t)
    h = result["history"]
    if h:
        print(f"KD loss: {h[0]['train/kd_loss']:.4f} (step {h[0]['step']}) -> "
              f"{h[-1]['train/kd_loss']:.4f} (step {h[-1]['step']}); export max |logit diff| "
              f"{result['export_max_abs_logit_diff']:.2e}", flush=True)


class _Progress:
    def __init__(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[info]}"))
        self.task = self.p.add_task("train", total=total, info="")
        self.p.start()

    def update(self, step: int, row: dict) -> None:
        self.p.update(self.task, completed=step,
                      info=f"kd {row['train/kd_loss']:.3f} lm {row['train/lm_loss']:.3f} "
                           f"wait {row['teacher/wait_fraction']:.2f}")

    def close(self) -> None:
        self.p.stop()


def _progress(cfg: PaddConfig, world: World, total: int):
    return _Progress(total) if (world.is_main and cfg.logging.progress) else None

