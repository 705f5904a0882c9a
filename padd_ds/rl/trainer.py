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
from padd_ds.eval.evaluate import evaluate_problems
from padd_ds.launch.world import World
from padd_ds.models.export import export_engine
from padd_ds.models.loading import load_causal_lm, load_tokenizer
from padd_ds.report.metrics import MetricsLogger
from padd_ds.teacher.service import LocalTeacher, RemoteTeacher, TeacherModel, serve
from padd_ds.teacher.sparse import sparse_kd_loss

RESULT_TAG = 1  # bridge tag of the teacher's evaluation result (separate from requests)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_paths(cfg: PaddConfig) -> tuple[str, str, str]:
    teacher = resolve_model_path(cfg.models.teacher, field_name="models.teacher")
    student = resolve_model_path(cfg.models.student, field_name="models.student")
    tok = resolve_model_path(cfg.models.tokenizer, field_name="models.tokenizer") if cfg.models.tokenizer else teacher
    return teacher, student, tok


def check_supported(cfg: PaddConfig) -> None:
    """Refuse, before any process group exists, what this trainer cannot run yet: the PADD
    stages (train.mode=padd, issue #5) and decompression (models.student=null, issue #3)."""
    if cfg.train.mode != "distill":
        raise ConfigError(f"train.mode={cfg.train.mode!r} is not built yet; use train.mode=distill")
    if cfg.models.student is None:
        raise ConfigError("models.student=null (decompress the teacher, Stage I) is not wired into training "
                          "yet; give a pre-trained MoE student")


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


# ----------------------------------------------------------------------------------------
# Student ranks
# ----------------------------------------------------------------------------------------

class BatchPlan:
    """Which problems each student rank sees at each (step, micro-step): a seeded permutation
    per epoch, cut into global batches, so the data position is a pure function of the step."""

    def __init__(self, n: int, per_rank: int, num_ranks: int, grad_accum: int, seed: int):
        self.n, self.per_rank, self.num_ranks, self.grad_accum, self.seed = n, per_rank, num_ranks, grad_accum, seed
        self.global_batch = per_rank * num_ranks
        if self.global_batch > n:
            raise ValueError(f"global batch {self.global_batch} exceeds the {n} training problems")
        self.batches_per_epoch = n // self.global_batch

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        b = step * self.grad_accum + micro
        epoch, pos = divmod(b, self.batches_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        start = pos * self.global_batch + rank * self.per_rank
        return perm[start:start + self.per_rank].tolist()


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


def run_student(cfg: PaddConfig, world: World) -> dict | None:
    import deepspeed.comm as dist

    from padd_ds.models.engine import initialize_engine

    roles = world.roles
    rank, num_students = roles.student_rank or 0, max(1, roles.num_student)
    teacher_path, student_path, tok_path = model_paths(cfg)
    run_dir = Path(cfg.run.output_dir)
    tok = load_tokenizer(tok_path, cfg.models.trust_remote_code)
    student = load_causal_lm(student_path, cfg.models.dtype, cfg.models.trust_remote_code)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    before = _evaluate(student, tok, cfg) if world.is_main else None
    engine, ds_config = initialize_engine(cfg, student, num_students)
    if world.is_main:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    if roles.role == "colocated":
        tmodel = load_causal_lm(teacher_path, cfg.models.dtype, cfg.models.trust_remote_code)
        teacher = LocalTeacher(TeacherModel(tmodel), cfg.teacher.logits_top_k, cfg.teacher.logits_mode)
    else:
        teacher = RemoteTeacher(world.bridge, world.my_teacher(), cfg.teacher.logits_top_k,
                                cfg.teacher.request_timeout_s, rank, cfg.teacher.logits_mode)

    problems = load_train_problems(cfg.data.source, cfg.data.question_field, cfg.data.answer_field)
    plan = BatchPlan(len(problems), cfg.train.micro_batch_size, num_students, cfg.train.grad_accum, cfg.run.seed)
    micro_steps = [(s, m) for s in range(cfg.train.steps) for m in range(cfg.train.grad_accum)]

    def make_batch(i: int) -> TokenBatch:
        s, m = micro_steps[i]
        return encode_examples(tok, [problems[j] for j in plan.indices(s, m, rank)],
                               cfg.data.max_prompt_tokens, cfg.data.max_response_tokens)

    logger = MetricsLogger(run_dir, to_dict(cfg), enabled=world.is_main, project=cfg.logging.wandb_project,
                           mode=cfg.logging.wandb_mode, run_name=cfg.run.name, jsonl=cfg.logging.jsonl)
    history: list[dict] = []
    inflight: dict[int, tuple[int, TokenBatch]] = {}

    def request(i: int) -> None:
        if i < len(micro_steps) and i not in inflight:
            b = make_batch(i)
            inflight[i] = (teacher.submit(micro_steps[i][0], b.ids, b.lengths), b)

    progress = _progress(cfg, world, cfg.train.steps)
    engine.train()
    new_window = lambda: {"kd": 0.0, "lm": 0.0, "count": 0.0, "tokens": 0, "wait": 0.0, "t0": time.perf_counter()}  # noqa: E731
    window = new_window()
    for i, (step, micro) in enumerate(micro_steps):
        # Keep `prefetch` requests in flight beyond this one: the teacher scores them while
        # we train on this one (prefetch 0: strictly request, wait, train).
        for j in range(i, i + 1 + cfg.teacher.prefetch):
            request(j)
        rid, batch = inflight.pop(i)
        wait0 = teacher.stats.wait_s
        targets = teacher.result(rid).logits
        window["wait"] += teacher.stats.wait_s - wait0

        denom = global_token_count(batch) / num_students
        out = engine(input_ids=batch.ids, attention_mask=batch.attention_mask)
        kd = sparse_kd_loss(out.logits, targets, batch.loss_mask, cfg.train.kd_temperature, denom=denom)
        lm = lm_loss(out.logits, batch, denom=denom)
        loss = cfg.stage2.kd_weight * kd + cfg.train.lm_weight * lm
        engine.backward(loss)
        engine.step()

        window["kd"] += kd.item() * denom        # back to sums, for exact global means
        window["lm"] += lm.item() * denom
        window["count"] += float(batch.loss_mask.sum())
        window["tokens"] += int(batch.lengths.sum())
        last = i == len(micro_steps) - 1
        if micro == cfg.train.grad_accum - 1 and ((step + 1) % cfg.train.log_every == 0 or last):
            dt = time.perf_counter() - window["t0"]
            kd_s, lm_s, count, wait_s, tokens = _all_sum([window["kd"], window["lm"], window["count"],
                                                          window["wait"], window["tokens"]])
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
    probe, engine_logits = probe_logits(engine, tok, cfg, problems)

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
                  "export_max_abs_logit_diff": export_diff,
                  "checkpoint": str(ckpt_dir), "export": str(export_dir)}
        (run_dir / "results.json").write_text(json.dumps(result, indent=2))
        logger.summary({"eval/teacher_acc": teacher_eval["accuracy"],
                        "eval/student_before_acc": before["accuracy"],
                        "eval/student_after_acc": after["accuracy"]})
        print_table(result)
    logger.close()
    dist.barrier()
    return result


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

