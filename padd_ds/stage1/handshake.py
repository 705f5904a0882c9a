"""Stage I's exchange with the teacher, on the student side.

The first student of each teacher tells it which teacher layer each student layer learns
from (floor(l L_T / L_S)) and, for a decompressed student, the clusters the experts were built
from; the teacher answers with its clustering records (teacher/rank.py, `stage1_clusters`).
A colocated teacher gets its cluster map directly.

    collect = send_stage1_setup(cfg, world, student.config, teacher_path, teacher, provenance)
    ...                                   # build the engine meanwhile
    records = collect()                   # the teacher's records (None on the other students)
"""

from __future__ import annotations

from typing import Callable

from transformers import AutoConfig

from padd_ds.config import PaddConfig
from padd_ds.launch.bridge import TAG_STAGE1
from padd_ds.launch.roles import students_of_teacher
from padd_ds.launch.world import World
from padd_ds.models.arch import moe_shape
from padd_ds.teacher.clusters import cluster_map_from_provenance, cluster_teacher, layer_map


def stage1_setup(cfg: PaddConfig, student_cfg, teacher_path: str, provenance: dict | None) -> dict:
    """The message: layer map, cluster count and (decompressed student) the neuron assignment."""
    if provenance is not None:
        cmap = cluster_map_from_provenance(provenance)
        return {"layers": cmap.layers, "num_clusters": cmap.num_clusters, "assignment": cmap.assignment.tolist()}
    t_layers = AutoConfig.from_pretrained(teacher_path, trust_remote_code=cfg.models.trust_remote_code).num_hidden_layers
    return {"layers": layer_map(student_cfg.num_hidden_layers, t_layers),
            "num_clusters": moe_shape(student_cfg)[0], "assignment": None}


def send_stage1_setup(cfg: PaddConfig, world: World, student_cfg, teacher_path: str, teacher,
                      provenance: dict | None) -> Callable[[], list[dict] | None]:
    """Send the setup to this rank's teacher (or set it on a colocated one); returns a callable
    that collects the teacher's clustering records (None on students that did not send)."""
    setup = stage1_setup(cfg, student_cfg, teacher_path, provenance)
    if world.roles.role == "colocated":
        return _colocated(cfg, teacher, setup, provenance)
    r = world.roles
    first = (list(range(r.num_student)) if world.teacher_parallel == "zero3"
             else students_of_teacher(world.my_teacher() - r.num_student, r.num_student, r.num_teacher))[0]
    if world.env.rank != first:
        return lambda: None
    work = world.bridge.post_json(setup, dst=world.my_teacher(), tag=TAG_STAGE1)

    def collect():
        reply = world.bridge.recv_json(src=world.my_teacher(), tag=TAG_STAGE1, timeout_s=cfg.topology.timeout_s)
        work.wait(cfg.topology.timeout_s)
        return reply["records"]
    return collect


def _colocated(cfg: PaddConfig, teacher, setup: dict, provenance: dict | None) -> Callable[[], list[dict]]:
    if provenance is not None:
        cmap = cluster_map_from_provenance(provenance)
        teacher.teacher.cluster_map = cmap
        records = [{"student_layer": l, "teacher_layer": t, "source": "decompression"} for l, t in enumerate(cmap.layers)]
        return lambda: records
    cmap, records = cluster_teacher(teacher.teacher.model, setup["layers"], setup["num_clusters"],
                                    cfg.stage1.cluster_input, cfg.run.seed)
    teacher.teacher.cluster_map = cmap
    return lambda: records
