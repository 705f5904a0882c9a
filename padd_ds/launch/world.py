"""Bring up a process's place in the launch, and take it down cleanly.

One call, `setup_world(cfg)`, turns whatever launcher started us (deepspeed, torchrun,
mpirun, srun, or a plain `python`) into: our role (teacher / student / colocated), the
bridge to the other side, and - for students - a DeepSpeed world that holds only students
(AutoEP sizes itself from the default group). `finish()` ends every rank with a barrier over
the ranks not declared dead (launch/replicas.py) and `os._exit`, which avoids the rare
`terminate called without an active exception` abort at interpreter exit seen with gloo on
small machines.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass

from padd_ds.config import PaddConfig
from padd_ds.launch import signals
from padd_ds.launch.bridge import Bridge
from padd_ds.launch.device import check_ranks_fit_devices, on_gpu, use_local_device
from padd_ds.launch.liveness import HeartbeatTiming, Liveness, looks_like_peer_failure
from padd_ds.launch.replicas import live_barrier
from padd_ds.launch.roles import (LaunchEnv, Roles, apply_env, assign_roles, bridge_address, detect_launch,
                                  student_to_teacher, students_of_teacher, sub_world_env)


@dataclass
class World:
    env: LaunchEnv
    roles: Roles
    bridge: Bridge | None
    # replicas: each teacher rank serves its own block of students; zero3: the teacher ranks
    # hold one sharded teacher and the first of them serves every student.
    teacher_parallel: str = "replicas"
    # Heartbeats of every rank, to name the lost one when a collective fails (launch/liveness.py).
    liveness: Liveness | None = None

    @property
    def is_student(self) -> bool:
        return self.roles.role in ("student", "colocated")

    @property
    def is_teacher(self) -> bool:
        return self.roles.role == "teacher"

    @property
    def is_main(self) -> bool:
        """The student rank that logs, writes and prints (student rank 0)."""
        return self.is_student and (self.roles.student_rank or 0) == 0

    @property
    def is_teacher_leader(self) -> bool:
        """The teacher rank that talks to students (all of them, in a sharded teacher)."""
        return self.is_teacher and (self.teacher_parallel == "replicas" or self.roles.teacher_rank == 0)

    def my_teacher(self) -> int:
        r = self.roles
        if self.teacher_parallel == "zero3":
            return r.num_student  # global rank of teacher rank 0
        return student_to_teacher(r.student_rank, r.num_student, r.num_teacher)

    def teacher_replicas(self) -> list[int]:
        """Global ranks of the teachers that answer students: every replica, or a sharded
        teacher's first rank (one replica: nothing to fail over to)."""
        r = self.roles
        return [r.num_student] if self.teacher_parallel == "zero3" else list(range(r.num_student, r.world_size))

    def my_students(self) -> list[int]:
        r = self.roles
        if self.teacher_parallel == "zero3":
            return list(range(r.num_student)) if r.teacher_rank == 0 else []
        return students_of_teacher(r.teacher_rank, r.num_student, r.num_teacher)


def setup_world(cfg: PaddConfig, env: LaunchEnv | None = None) -> World:
    """Detect the launcher, assign roles, connect the bridge, init the student DS world."""
    env = env or detect_launch()
    use_local_device(env.local_rank)  # before anything loads: each rank its own GPU
    roles = assign_roles(env, cfg.topology.teacher_ranks, cfg.topology.colocated)
    bridge = liveness = None
    if roles.role != "colocated":
        addr, port = bridge_address(env, cfg.topology.bridge_port)
        bridge = Bridge(addr, port, env.rank, env.world_size, cfg.topology.timeout_s)
        liveness = Liveness(addr, port, env.rank, env.world_size,
                            {r: "student" if r < roles.num_student else "teacher" for r in range(env.world_size)},
                            HeartbeatTiming(exit_after_s=cfg.topology.timeout_s))
    apply_env(sub_world_env(env, roles))
    sharded_teacher = roles.role == "teacher" and cfg.teacher.parallel == "zero3" and roles.num_teacher > 1
    if roles.role in ("student", "colocated") or sharded_teacher:
        import datetime

        import deepspeed

        if on_gpu():
            from deepspeed.accelerator import get_accelerator

            check_ranks_fit_devices(int(os.environ["LOCAL_SIZE"]), get_accelerator().device_count(),
                                    "student" if roles.is_student else "teacher")
        deepspeed.init_distributed(dist_backend=_backend(), auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=cfg.topology.timeout_s))
        release_shm_names()
    parallel = cfg.teacher.parallel if roles.num_teacher > 1 else "replicas"
    return World(env, roles, bridge, teacher_parallel=parallel, liveness=liveness)



def release_shm_names() -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory all-reduce buffer once every local rank
    has mapped it (collective: call right after init_distributed).

    On CPU, DeepSpeed's shm comm op creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank> (69 MB) per rank and never unlinks it: every run leaks it, and on this
    machine a few hundred runs filled /dev/shm and starved the host of memory. After a
    barrier all peers have opened it, so removing the name is safe; the memory goes away
    when the last process that maps it exits, however it exits (even SIGKILL)."""
    import deepspeed.comm as dist

    if on_gpu():
        return
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass  # the op is not built, or the ranks are not all local (no shm path)


def _backend() -> str:
    return "nccl" if on_gpu() else "gloo"  # what the rank's device is, not what the node has


def finish(world: World | None, code: int = 0) -> None:
    """Flush, meet the other live ranks at a barrier (on success), and leave without teardown."""
    if world is not None and world.bridge is not None and code == 0:
        try:
            b = world.bridge
            live_barrier(b.store, b.rank, b.world_size, b.timeout_s)
        except Exception as e:  # noqa: BLE001 - we are leaving anyway; say why
            print(f"[rank {world.env.rank}] warning: final bridge barrier failed: {e}", file=sys.stderr)
            code = code or 1
    leave(code)


def leave(code: int = 0, barrier: bool = False) -> None:
    """Flush and exit without interpreter teardown (see the module docstring); with
    `barrier`, first meet the other ranks of the DeepSpeed world so none exits while a peer
    still talks to it. For scripts that run a bare DeepSpeed world (tests, benches)."""
    if barrier:
        import deepspeed.comm as dist

        if dist.is_initialized():
            dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_guarded(main, world_factory):
    """Run `main(world)`; on any error print it with this rank's identity and exit non-zero."""
    world = None
    try:
        world = world_factory()
        main(world)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finish(world if code == 0 else None, code)
    except BaseException as e:  # noqa: BLE001 - report with the rank, then exit non-zero
        traceback.print_exc()
        report_failure(world, e)
        finish(None, 1)
    finish(world, 0)


def report_failure(world: World | None, e: BaseException) -> None:
    """The one `padd-ds: rank R (role) failed: ...` line. It names the lost peer when there
    is one (a launcher's teardown after a death included); a lost peer found is posted as the
    launch's verdict, this rank's own error is posted for its peers."""
    who = (f"rank {world.env.rank} ({world.roles.role})" if world is not None
           else f"rank {os.environ.get('RANK', '?')}")
    live = world.liveness if world is not None else None
    lost = live.diagnose(e, torn_down=signals.received()) if live is not None else None
    print(f"padd-ds: {who} failed: {lost + ': ' if lost else ''}{type(e).__name__}: {e}", file=sys.stderr)
    sys.stderr.flush()
    if live is None:
        return
    if lost:
        live.post_verdict(lost)
    elif not looks_like_peer_failure(e):
        live.post_failure(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
