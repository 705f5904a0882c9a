"""A teacher rank's whole run, as an outline:

    load the teacher -> evaluate it on the held-out set (reference row of the table)
    -> Stage I: cluster its FFN neurons for the students' layers -> serve the students until STOP

Replicas (`teacher.parallel: replicas`) each serve their own block of students, and the
students of a lost replica too (teacher/service.py); a sharded teacher (`zero3`) runs every
step on all teacher ranks, and its first rank talks to the students. Students never see teacher weights, only what `serve` streams.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as tdist
from transformers import AutoConfig

from padd_ds.config import PaddConfig
from padd_ds.eval.heldout import heldout_accuracy
from padd_ds.launch.bridge import TAG_RESULT, TAG_STAGE1
from padd_ds.launch.device import rank_device
from padd_ds.launch.world import World
from padd_ds.models.files import model_paths
from padd_ds.models.loading import load_causal_lm, load_partitioned_causal_lm, load_tokenizer, resolve_dtype
from padd_ds.teacher.clusters import ClusterMap, cluster_teacher
from padd_ds.teacher.service import TeacherModel, serve
from padd_ds.teacher.sharded import ShardedTeacher, zero3_config


def run_teacher(cfg: PaddConfig, world: World) -> None:
    teacher_path, student_path, tok_path = model_paths(cfg)
    tok = load_tokenizer(tok_path, cfg.models.trust_remote_code)
    sharded = world.teacher_parallel == "zero3"
    teacher = load_teacher(cfg, teacher_path, sharded, student_vocab_size(cfg, student_path))
    model = teacher.model
    posted = evaluate_reference(cfg, world, model, tok, sharded)
    if cfg.stage1.enabled:
        teacher.cluster_map = stage1_clusters(cfg, world, model, sharded)
    if world.is_teacher_leader:
        stats = serve(world.bridge, teacher, world.my_students(), cfg.topology.timeout_s,
                      f"teacher {world.roles.teacher_rank}")
        if sharded:
            teacher.stop()
        print(f"[teacher {world.roles.teacher_rank}] served {stats.requests} requests, {stats.tokens} tokens "
              f"in {stats.rounds} forwards; busy {stats.busy_s:.1f}s idle {stats.idle_s:.1f}s", flush=True)
    else:
        rounds, mine = teacher.member_loop()
        print(f"[teacher {world.roles.teacher_rank}] scored {mine} requests in {rounds} rounds with the leader",
              flush=True)
    if posted is not None:
        posted.wait()


def load_teacher(cfg: PaddConfig, path: str, sharded: bool, vocab_limit: int | None):
    """A replica whole on the rank's device, or a ZeRO-3 teacher loaded straight into its
    partitions (no rank, and no host, ever holds the whole of it)."""
    if sharded:
        bf16 = resolve_dtype(cfg.models.dtype, rank_device()) == torch.bfloat16
        model = load_partitioned_causal_lm(path, zero3_config(bf16), cfg.models.dtype, cfg.models.trust_remote_code)
        return ShardedTeacher(model, bf16=bf16, vocab_limit=vocab_limit)
    return TeacherModel(load_causal_lm(path, cfg.models.dtype, cfg.models.trust_remote_code), vocab_limit=vocab_limit,
                        pack=cfg.teacher.pack_requests)


def student_vocab_size(cfg: PaddConfig, student_path: str | None) -> int | None:
    """The student's vocab_size, read from its config without loading weights; None for a
    student decompressed from the teacher (same table). The teacher drops logit columns past
    it (teacher/service.py, forward_outputs)."""
    if student_path is None:
        return None
    conf = AutoConfig.from_pretrained(student_path, trust_remote_code=cfg.models.trust_remote_code)
    return getattr(conf.get_text_config(), "vocab_size", None)


def evaluate_reference(cfg: PaddConfig, world: World, model, tok, sharded: bool):
    """The teacher's held-out accuracy (eval.teacher_reference), computed while the students
    build their engine: by the first replica, or by every rank of a sharded teacher, each on
    its share of the problems, in step. It travels on its own bridge tag; the main student
    collects it at the end. Returns the posted send to wait on, or None."""
    if not cfg.eval.teacher_evaluated or not (world.roles.teacher_rank == 0 or sharded):
        return None
    t0 = time.perf_counter()
    share = (world.roles.teacher_rank, world.roles.num_teacher) if sharded else (0, 1)
    ev = heldout_accuracy(model, tok, cfg, synced=sharded, share=share)
    ev["seconds"] = time.perf_counter() - t0
    if world.roles.teacher_rank != 0:
        return None
    return world.bridge.post_json({"teacher_eval": ev}, dst=0, tag=TAG_RESULT)


def stage1_clusters(cfg: PaddConfig, world: World, model, sharded: bool) -> ClusterMap:
    """The teacher's neuron clusters for the student's layers. The first student of this
    teacher sends the layer map and, for a decompressed student, the clusters it was built
    from; otherwise the teacher clusters its own FFNs (all ranks of a sharded teacher take
    part: gathering a layer's weights is collective). The records go back to that student."""
    setup = None
    if world.is_teacher_leader:
        setup = world.bridge.recv_json(src=world.my_students()[0], tag=TAG_STAGE1, timeout_s=cfg.topology.timeout_s)
    if sharded:
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
                               dst=world.my_students()[0], tag=TAG_STAGE1).wait(cfg.topology.timeout_s)
    return cmap
