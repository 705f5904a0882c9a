"""Who am I? Launcher detection, teacher/student roles and each side's own world.

A PADD launch of W processes holds S student ranks (global ranks 0..S-1) and T teacher
ranks (S..W-1). DeepSpeed must see a world of students only (AutoEP sizes itself from the
default process group), so before `deepspeed.init_distributed` every process rewrites its
standard variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT) to
describe its own side:

    env = detect_launch()                                   # what the launcher said
    roles = assign_roles(env, cfg.topology.teacher_ranks, cfg.topology.colocated)
    apply_env(sub_world_env(env, roles))                    # students: world S, teachers: T
    host, port = bridge_address(env, cfg.topology.bridge_port)  # student<->teacher link

Ports: students MASTER_PORT, teachers MASTER_PORT + 1, bridge MASTER_PORT + 2 (default).

This module only reads and computes environment variables; it never touches
torch.distributed (the bridge lives in padd_ds.launch.bridge).
"""

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

Launcher = Literal["deepspeed", "torchrun", "mpirun", "srun", "single"]

# torch.distributed's and DeepSpeed's default rendezvous port.
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    """The launch as the launcher described it (all W processes, before any splitting)."""

    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    master_addr: str
    master_port: int

    @property
    def node_ranks(self) -> range:
        """Global ranks on this node, assuming the usual node-major (block) layout in which
        a node holds consecutive ranks; every launcher here uses it by default."""
        first = self.rank - self.local_rank
        return range(first, first + self.local_size)


# --------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = env[name]
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _require(env: Mapping[str, str], name: str, launcher: str) -> None:
    if name not in env:
        raise ValueError(f"{name} is not set; the {launcher} launch environment is incomplete")


def _port(env: Mapping[str, str]) -> int:
    if "MASTER_PORT" not in env:
        return DEFAULT_PORT
    port = _int(env, "MASTER_PORT", minimum=1)
    if port > 65535:
        raise ValueError(f"MASTER_PORT={port} must be <= 65535")
    return port


def _argv_local_rank(argv: Sequence[str]) -> int | None:
    """`--local_rank=N` / `--local_rank N` (the DeepSpeed launcher passes it; newer torch
    spells it `--local-rank`)."""
    for i, arg in enumerate(argv):
        for flag in ("--local_rank", "--local-rank"):
            value = None
            if arg.startswith(flag + "="):
                value = arg[len(flag) + 1 :]
            elif arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            if value is not None:
                return _int({flag: value}, flag)
    return None


def _checked(launch: LaunchEnv, names: tuple[str, str, str, str]) -> LaunchEnv:
    """`launch` once its ranks and sizes agree; an error names the launcher's variable
    (`names`: rank, world size, local rank, local size)."""
    rank_var, world_var, local_rank_var, local_size_var = names
    rank, world, local_rank, local_size = launch.rank, launch.world_size, launch.local_rank, launch.local_size
    if world < 1:
        raise ValueError(f"{world_var}={world} must be >= 1")
    if rank >= world:
        raise ValueError(f"{rank_var}={rank} must be smaller than {world_var}={world}")
    if local_size < 1 or local_size > world:
        raise ValueError(f"{local_size_var}={local_size} must be in 1..{world_var}={world}")
    if local_rank >= local_size:
        raise ValueError(f"{local_rank_var}={local_rank} must be smaller than {local_size_var}={local_size}")
    # No `local_rank <= rank` check: OpenMPI 5 on one node can hand out local ranks in another
    # order than global ranks (e.g. global 1 -> local 2).
    return launch


def _master_addr(env: Mapping[str, str], local_size: int, world: int, launcher: str) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if local_size == world:
        return "127.0.0.1"  # a single node: loopback always works
    raise ValueError(
        f"MASTER_ADDR is not set and this {launcher} job spans several nodes; export the first node's "
        "address to every rank, e.g. mpirun -x MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ... "
        "(MPICH/Intel MPI: -genv MASTER_ADDR $(hostname))"
    )


# --------------------------------------------------------------------------------------
# SLURM syntax
# --------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {text!r}: unmatched ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"hostlist {text!r}: unmatched '['")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_host(pattern: str) -> list[str]:
    open_ = pattern.find("[")
    if open_ < 0:
        return [pattern]
    close = pattern.index("]", open_)
    prefix, body, rest = pattern[:open_], pattern[open_ + 1 : close], pattern[close + 1 :]
    numbers = []
    for item in body.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"hostlist {pattern!r}: bad range {item!r}")
        start, stop = int(lo), int(hi) if sep else int(lo)
        if stop < start:
            raise ValueError(f"hostlist {pattern!r}: range {item!r} runs backwards")
        width = len(lo)  # SLURM keeps the zero padding of the lower bound: [08-10] -> 08 09 10
        numbers += [str(n).zfill(width) for n in range(start, stop + 1)]
    tails = _expand_host(rest)
    return [f"{prefix}{n}{tail}" for n in numbers for tail in tails]


def expand_hostlist(hostlist: str) -> list[str]:
    """`node[01-04,07],gpu-a1` -> node01 node02 node03 node04 node07 gpu-a1 (like
    `scontrol show hostnames`, without needing SLURM installed)."""
    hosts = [h for part in _split_top_level(hostlist) for h in _expand_host(part)]
    if not hosts:
        raise ValueError(f"hostlist {hostlist!r} names no host")
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """`4(x2),2` -> [4, 4, 2]; `2,1` -> [2, 1]; `4` -> [4]."""
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"tasks-per-node {spec!r}: cannot parse {item!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


# --------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        _require(env, name, "torchrun")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE", 1)
    local_rank, local_size = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE", 1)
    addr = _master_addr(env, local_size, world, "torchrun")
    return _checked(LaunchEnv("torchrun", rank, world, local_rank, local_size, addr, _port(env)),
                    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def _from_env_vars(env: Mapping[str, str], argv: Sequence[str]) -> LaunchEnv:
    """The DeepSpeed launcher (and anything else that exports the standard variables)."""
    _require(env, "WORLD_SIZE", "deepspeed")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE", 1)
    if "LOCAL_RANK" in env:
        local_rank = _int(env, "LOCAL_RANK")
    else:
        local_rank = _argv_local_rank(argv)
        if local_rank is None:
            raise ValueError("LOCAL_RANK is not set and no --local_rank argument was given")
    if "LOCAL_SIZE" in env:
        local_size, size_var = _int(env, "LOCAL_SIZE", 1), "LOCAL_SIZE"
    elif "CROSS_SIZE" in env:
        nodes = _int(env, "CROSS_SIZE", 1)
        if world % nodes:
            raise ValueError(f"WORLD_SIZE={world} does not divide over CROSS_SIZE={nodes} nodes")
        local_size, size_var = world // nodes, "CROSS_SIZE"
    else:
        local_size, size_var = world, "WORLD_SIZE"
    addr = _master_addr(env, local_size, world, "deepspeed")
    return _checked(LaunchEnv("deepspeed", rank, world, local_rank, local_size, addr, _port(env)),
                    ("RANK", "WORLD_SIZE", "LOCAL_RANK", size_var))


def _from_mpi(env: Mapping[str, str], names: tuple[str, str, str, str]) -> LaunchEnv:
    for name in names:
        _require(env, name, "mpirun")
    rank_var, world_var, local_rank_var, local_size_var = names
    rank, world = _int(env, rank_var), _int(env, world_var, 1)
    local_rank, local_size = _int(env, local_rank_var), _int(env, local_size_var, 1)
    addr = _master_addr(env, local_size, world, "mpirun")
    return _checked(LaunchEnv("mpirun", rank, world, local_rank, local_size, addr, _port(env)), names)


def _from_slurm(env: Mapping[str, str]) -> LaunchEnv:
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        _require(env, name, "srun")
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS", 1)
    local_rank = _int(env, "SLURM_LOCALID")

    # Tasks per node: the step's own layout is the most precise, then the requested one.
    per_node_var = next(
        (v for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if env.get(v)),
        None,
    )
    if per_node_var is None:
        counts, per_node_var = [world], "SLURM_NTASKS"
    else:
        counts = expand_tasks_per_node(env[per_node_var])
    if "SLURM_NODEID" in env:
        node = _int(env, "SLURM_NODEID")
    else:  # block distribution: find the node whose rank range holds ours
        node, first = 0, 0
        while node < len(counts) - 1 and rank >= first + counts[node]:
            first += counts[node]
            node += 1
    if node < len(counts):
        local_size = counts[node]
    elif len(counts) == 1:  # `--ntasks-per-node=4` is one number for every node
        local_size = counts[0]
    else:
        raise ValueError(f"SLURM_NODEID={node} is beyond the {len(counts)} nodes of {per_node_var}={env[per_node_var]!r}")

    nodelist = next((env[v] for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)), None)
    addr = expand_hostlist(nodelist)[0] if nodelist else _master_addr(env, local_size, world, "srun")
    return _checked(LaunchEnv("srun", rank, world, local_rank, local_size, addr, _port(env)),
                    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", per_node_var))


def detect_launch(environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> LaunchEnv:
    """Read rank, world and rendezvous address from whichever launcher started us.

    Precedence: torchrun, then the standard RANK/WORLD_SIZE set (the DeepSpeed launcher, or a
    script that exported them, e.g. around srun), then OpenMPI, MPICH/Intel MPI (PMI), SLURM
    srun; none of them means a single process. Bad values raise ValueError naming the variable.
    """
    env = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else argv
    if "TORCHELASTIC_RUN_ID" in env or ("LOCAL_WORLD_SIZE" in env and "RANK" in env):
        return _from_torchrun(env)
    if "RANK" in env:
        return _from_env_vars(env, argv)
    if "OMPI_COMM_WORLD_RANK" in env:
        return _from_mpi(env, ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                               "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"))
    # srun --mpi=pmi2 also sets PMI_RANK but not MPI_LOCALRANKID: that is a SLURM launch.
    if "PMI_RANK" in env and ("MPI_LOCALRANKID" in env or "SLURM_PROCID" not in env):
        return _from_mpi(env, ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"))
    if "SLURM_PROCID" in env:
        return _from_slurm(env)
    return LaunchEnv("single", 0, 1, 0, 1, env.get("MASTER_ADDR") or "127.0.0.1", _port(env))


# --------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roles:
    """This process's part in the launch.

    Students are global ranks 0..S-1 (student_rank == global rank), teachers S..W-1
    (teacher_rank = global rank - S). "colocated" runs student and teacher in one process.
    """

    role: Literal["teacher", "student", "colocated"]
    global_rank: int
    world_size: int
    num_teacher: int
    num_student: int
    student_rank: int | None
    teacher_rank: int | None
    # Student: global rank of the teacher replica that serves it. None otherwise.
    teacher_for_student: int | None
    # Teacher: global ranks of the students it serves. Empty otherwise.
    students_of_teacher: tuple[int, ...] = field(default=())

    @property
    def is_student(self) -> bool:
        return self.role in ("student", "colocated")

    @property
    def is_teacher(self) -> bool:
        """True for a process that runs the teacher model (a teacher rank, or colocated)."""
        return self.role in ("teacher", "colocated")


def _check_split(num_student: int, num_teacher: int) -> None:
    if num_teacher < 1:
        raise ValueError(f"num_teacher={num_teacher} must be >= 1 (or run colocated)")
    if num_student < 1:
        raise ValueError(f"num_student={num_student} must be >= 1")
    if num_teacher > num_student:
        raise ValueError(f"num_teacher={num_teacher} exceeds num_student={num_student}; each teacher needs a student")


def student_to_teacher(student_rank: int, num_student: int, num_teacher: int) -> int:
    """Global rank of the teacher serving `student_rank`: contiguous, balanced blocks
    (4 students / 2 teachers: students 0,1 -> rank 4; 2,3 -> rank 5)."""
    _check_split(num_student, num_teacher)
    if not 0 <= student_rank < num_student:
        raise ValueError(f"student_rank={student_rank} must be in 0..{num_student - 1}")
    return num_student + student_rank * num_teacher // num_student


def students_of_teacher(teacher_idx: int, num_student: int, num_teacher: int) -> list[int]:
    """Student ranks (= their global ranks) served by teacher index `teacher_idx` (0..T-1)."""
    _check_split(num_student, num_teacher)
    if not 0 <= teacher_idx < num_teacher:
        raise ValueError(f"teacher_idx={teacher_idx} must be in 0..{num_teacher - 1}")
    return [s for s in range(num_student) if s * num_teacher // num_student == teacher_idx]


def assign_roles(env: LaunchEnv, teacher_ranks: int, colocated: bool) -> Roles:
    """Students on global ranks 0..S-1, teachers on the last `teacher_ranks` ranks."""
    w, r = env.world_size, env.rank
    if colocated or w == 1:
        return Roles("colocated", r, w, 0, w, r, None, None)
    if teacher_ranks < 1:
        raise ValueError(f"teacher_ranks={teacher_ranks} must be >= 1 for a non-colocated launch")
    num_student = w - teacher_ranks
    if num_student < 1:
        raise ValueError(
            f"world size {w} is too small for {teacher_ranks} teacher ranks plus at least one student rank"
        )
    _check_split(num_student, teacher_ranks)
    if r < num_student:
        return Roles("student", r, w, teacher_ranks, num_student, r, None,
                     student_to_teacher(r, num_student, teacher_ranks))
    t = r - num_student
    return Roles("teacher", r, w, teacher_ranks, num_student, None, t, None,
                 tuple(students_of_teacher(t, num_student, teacher_ranks)))


# --------------------------------------------------------------------------------------
# Sub-worlds
# --------------------------------------------------------------------------------------


def _checked_port(port: int, what: str) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"{what} port {port} is outside 1..65535; lower MASTER_PORT")
    return port


def sub_world_env(env: LaunchEnv, roles: Roles) -> dict[str, str]:
    """The standard variables a process must have before `deepspeed.init_distributed` /
    `torch.distributed.init_process_group` so that its world holds only its own side.

    Students: RANK = student rank, WORLD_SIZE = S, MASTER_PORT = the launch's port.
    Teachers: RANK = teacher index, WORLD_SIZE = T, MASTER_PORT = the launch's port + 1.
    Both keep LOCAL_RANK (it stays the device index on this node) and get
    LOCAL_SIZE = LOCAL_WORLD_SIZE = the number of their side's ranks on this node, assuming
    the node-major layout (a node holds consecutive global ranks).

    DeepSpeed and torch read these standard variables before any MPI/SLURM discovery, so the
    launcher's own OMPI_*/PMI_*/SLURM_* variables are left alone.

    Rendezvous hosts: the students' world meets at MASTER_ADDR, where global rank 0 (a
    student) runs. The teachers' world is hosted by teacher 0; when all teachers share this
    node (the usual case: teachers are the last ranks) it meets on 127.0.0.1, otherwise at
    MASTER_ADDR, so teacher 0 must then run on the MASTER_ADDR host (the environment does not
    name other nodes' hosts).

    Under torchrun the students keep torchrun's agent TCPStore (it already listens on
    MASTER_PORT); teachers opt out of it (TORCHELASTIC_USE_AGENT_STORE=False) and host
    their own store on MASTER_PORT + 1.
    """
    node = env.node_ranks
    if roles.role in ("student", "colocated"):
        students = range(0, roles.num_student)
        on_node = len(range(max(node.start, students.start), min(node.stop, students.stop)))
        return {
            "RANK": str(roles.student_rank),
            "WORLD_SIZE": str(roles.num_student),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_SIZE": str(on_node),
            "LOCAL_WORLD_SIZE": str(on_node),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    teachers = range(roles.num_student, roles.world_size)
    on_node = len(range(max(node.start, teachers.start), min(node.stop, teachers.stop)))
    all_here = node.start <= teachers.start and teachers.stop <= node.stop
    return {
        "RANK": str(roles.teacher_rank),
        "WORLD_SIZE": str(roles.num_teacher),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_SIZE": str(on_node),
        "LOCAL_WORLD_SIZE": str(on_node),
        "MASTER_ADDR": "127.0.0.1" if all_here else env.master_addr,
        "MASTER_PORT": str(_checked_port(env.master_port + 1, "teacher world")),
        "TORCHELASTIC_USE_AGENT_STORE": "False",
    }


def bridge_address(env: LaunchEnv, bridge_port: int | None) -> tuple[str, int]:
    """Rendezvous of the student<->teacher bridge: MASTER_ADDR and bridge_port, by default
    MASTER_PORT + 2 (next to the students' and the teachers' world ports)."""
    port = bridge_port if bridge_port is not None else env.master_port + 2
    return env.master_addr, _checked_port(port, "bridge")


def apply_env(updates: Mapping[str, str]) -> None:
    """Set the variables in this process's environment (inherited by its children)."""
    for key, value in updates.items():
        os.environ[key] = str(value)
