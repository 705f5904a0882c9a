"""Launcher detection, role assignment and sub-world environments (padd_ds/launch/roles.py).

The environment dicts are what each launcher really exports; the last tests start real
processes (torchrun, and a DeepSpeed-launcher-style environment) and build the sub-worlds
with torch.distributed over gloo.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import finish_ranks
from padd_ds.launch.roles import (
    LaunchEnv,
    Roles,
    apply_env,
    assign_roles,
    bridge_address,
    detect_launch,
    expand_hostlist,
    expand_tasks_per_node,
    student_to_teacher,
    students_of_teacher,
    sub_world_env,
)

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------

TORCHRUN = {  # torchrun --nproc_per_node 3 --master_port 29501, worker 2
    "RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3", "GROUP_RANK": "0",
    "ROLE_RANK": "2", "ROLE_NAME": "default", "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": "3",
    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501", "TORCHELASTIC_RESTART_COUNT": "0",
    "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True",
}
DEEPSPEED = {  # deepspeed --num_gpus 3, worker 1 (also gets --local_rank=1 in argv)
    "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
    "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "3",
}
OPENMPI = {  # mpirun -np 8 over two nodes, rank 5
    "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": "1", "MASTER_ADDR": "node01",
}
PMI = {  # MPICH / Intel MPI hydra, rank 2 of 4 on two nodes
    "PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
    "MASTER_ADDR": "h1", "MASTER_PORT": "12345",
}
SLURM = {  # srun -N 2 --ntasks-per-node 3, task 4
    "SLURM_PROCID": "4", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_NTASKS_PER_NODE": "3(x2)", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2",
    "SLURM_JOB_ID": "77",
}


def test_torchrun():
    assert detect_launch(TORCHRUN, []) == LaunchEnv("torchrun", 2, 3, 2, 3, "127.0.0.1", 29501)


def test_deepspeed_launcher():
    assert detect_launch(DEEPSPEED, ["--local_rank=1"]) == LaunchEnv("deepspeed", 1, 3, 1, 3, "127.0.0.1", 29500)


def test_deepspeed_local_rank_from_argv_and_local_size_from_cross_size():
    env = {k: v for k, v in DEEPSPEED.items() if k not in ("LOCAL_RANK", "LOCAL_SIZE")}
    env.update(RANK="4", WORLD_SIZE="6", CROSS_SIZE="2", CROSS_RANK="1", MASTER_ADDR="n0")
    assert detect_launch(env, ["train.py", "--local_rank", "1"]) == LaunchEnv("deepspeed", 4, 6, 1, 3, "n0", 29500)
    assert detect_launch(env, ["--local_rank=1"]).local_rank == 1


def test_openmpi():
    assert detect_launch(OPENMPI, []) == LaunchEnv("mpirun", 5, 8, 1, 4, "node01", 29500)


def test_openmpi_single_node_defaults_to_loopback():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "3"}
    assert detect_launch(env, []) == LaunchEnv("mpirun", 1, 3, 1, 3, "127.0.0.1", 29500)


def test_openmpi_multi_node_needs_master_addr():
    env = {k: v for k, v in OPENMPI.items() if k != "MASTER_ADDR"}
    with pytest.raises(ValueError, match=r"MASTER_ADDR is not set .* mpirun -x MASTER_ADDR="):
        detect_launch(env, [])


def test_pmi():
    assert detect_launch(PMI, []) == LaunchEnv("mpirun", 2, 4, 0, 2, "h1", 12345)


def test_slurm():
    assert detect_launch(SLURM, []) == LaunchEnv("srun", 4, 6, 1, 3, "node01", 29500)


def test_slurm_node_derived_from_rank_for_uneven_layout():
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0",
           "SLURM_TASKS_PER_NODE": "2,1", "SLURM_NODELIST": "gpu-a[7-8]", "MASTER_PORT": "30000"}
    assert detect_launch(env, []) == LaunchEnv("srun", 2, 3, 0, 1, "gpu-a7", 30000)


def test_slurm_with_pmi2_is_still_slurm():
    env = {**SLURM, "PMI_RANK": "4", "PMI_SIZE": "6"}
    assert detect_launch(env, []).launcher == "srun"


def test_explicit_rank_wins_over_slurm():
    env = {**SLURM, "RANK": "4", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_SIZE": "3", "MASTER_ADDR": "node01"}
    assert detect_launch(env, []) == LaunchEnv("deepspeed", 4, 6, 1, 3, "node01", 29500)
    torchrun_in_srun = {**SLURM, **TORCHRUN}
    assert detect_launch(torchrun_in_srun, []).launcher == "torchrun"


def test_single_process():
    assert detect_launch({}, []) == LaunchEnv("single", 0, 1, 0, 1, "127.0.0.1", 29500)


@pytest.mark.parametrize("env, pattern", [
    ({**DEEPSPEED, "RANK": "abc"}, r"RANK='abc' is not an integer"),
    ({**DEEPSPEED, "RANK": "3"}, r"RANK=3 must be smaller than WORLD_SIZE=3"),
    ({**DEEPSPEED, "WORLD_SIZE": "0"}, r"WORLD_SIZE=0 must be >= 1"),
    ({k: v for k, v in DEEPSPEED.items() if k != "LOCAL_RANK"}, r"LOCAL_RANK is not set"),
    ({k: v for k, v in DEEPSPEED.items() if k != "WORLD_SIZE"}, r"WORLD_SIZE is not set"),
    ({**DEEPSPEED, "MASTER_PORT": "99999"}, r"MASTER_PORT=99999 must be <= 65535"),
    ({**TORCHRUN, "LOCAL_RANK": "3"}, r"LOCAL_RANK=3 must be smaller than LOCAL_WORLD_SIZE=3"),
    ({k: v for k, v in OPENMPI.items() if k != "OMPI_COMM_WORLD_LOCAL_SIZE"}, r"OMPI_COMM_WORLD_LOCAL_SIZE is not set"),
    ({**OPENMPI, "OMPI_COMM_WORLD_RANK": "8"}, r"OMPI_COMM_WORLD_RANK=8 must be smaller than OMPI_COMM_WORLD_SIZE=8"),
    ({**PMI, "MPI_LOCALNRANKS": "two"}, r"MPI_LOCALNRANKS='two' is not an integer"),
    ({**SLURM, "SLURM_NTASKS": "-1"}, r"SLURM_NTASKS=-1 must be >= 1"),
    ({**SLURM, "SLURM_NODEID": "2", "SLURM_NTASKS_PER_NODE": "3,3"}, r"SLURM_NODEID=2 is beyond the 2 nodes"),
])
def test_bad_values_name_the_variable(env, pattern):
    with pytest.raises(ValueError, match=pattern):
        detect_launch(env, [])


# --------------------------------------------------------------------------------------
# SLURM syntax
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("hostlist, hosts", [
    ("node[01-04,07],gpu-a1", ["node01", "node02", "node03", "node04", "node07", "gpu-a1"]),
    ("node[01-02]", ["node01", "node02"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("a[08-10]", ["a08", "a09", "a10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("login", ["login"]),
    ("x1,y[3],z", ["x1", "y3", "z"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["node[01-", "node01]", "n[3-1]", "n[a-b]", ""])
def test_bad_hostlists(hostlist):
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(hostlist)


@pytest.mark.parametrize("spec, counts", [
    ("4", [4]), ("4(x2)", [4, 4]), ("2,1", [2, 1]), ("4(x2),2", [4, 4, 2]), ("3(x2)", [3, 3]),
])
def test_expand_tasks_per_node(spec, counts):
    assert expand_tasks_per_node(spec) == counts


def test_bad_tasks_per_node():
    with pytest.raises(ValueError, match="tasks-per-node"):
        expand_tasks_per_node("4(y2)")


# --------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------


def env_for(rank: int, world: int, local_size: int | None = None, launcher="deepspeed", addr="n0", port=29500):
    local_size = local_size or world
    return LaunchEnv(launcher, rank, world, rank % local_size, local_size, addr, port)


def test_three_ranks_one_teacher():
    roles = [assign_roles(env_for(r, 3), teacher_ranks=1, colocated=False) for r in range(3)]
    assert [r.role for r in roles] == ["student", "student", "teacher"]
    assert roles[0] == Roles("student", 0, 3, 1, 2, 0, None, 2)
    assert roles[1].teacher_for_student == 2 and roles[1].student_rank == 1
    assert roles[2] == Roles("teacher", 2, 3, 1, 2, None, 0, None, (0, 1))
    assert roles[2].is_teacher and not roles[2].is_student


def test_colocated_and_single_rank():
    r = assign_roles(env_for(1, 2), teacher_ranks=1, colocated=True)
    assert (r.role, r.num_teacher, r.num_student, r.student_rank) == ("colocated", 0, 2, 1)
    assert r.is_student and r.is_teacher
    assert assign_roles(env_for(0, 1), teacher_ranks=1, colocated=False).role == "colocated"


def test_teacher_blocks():
    assert [student_to_teacher(s, 4, 2) for s in range(4)] == [4, 4, 5, 5]
    assert students_of_teacher(0, 4, 2) == [0, 1] and students_of_teacher(1, 4, 2) == [2, 3]
    assert students_of_teacher(0, 5, 2) == [0, 1, 2] and students_of_teacher(1, 5, 2) == [3, 4]
    for s in range(5):  # the two functions agree
        assert s in students_of_teacher(student_to_teacher(s, 5, 2) - 5, 5, 2)


@pytest.mark.parametrize("world, teachers, pattern", [
    (3, 2, "num_teacher=2 exceeds num_student=1"),
    (2, 2, "world size 2 is too small for 2 teacher ranks"),
    (3, 0, "teacher_ranks=0 must be >= 1"),
])
def test_role_errors(world, teachers, pattern):
    with pytest.raises(ValueError, match=pattern):
        assign_roles(env_for(0, world), teacher_ranks=teachers, colocated=False)


def test_teacher_mapping_errors():
    with pytest.raises(ValueError, match="num_teacher=3 exceeds num_student=2"):
        student_to_teacher(0, 2, 3)
    with pytest.raises(ValueError, match="student_rank=4 must be in 0..3"):
        student_to_teacher(4, 4, 2)


# --------------------------------------------------------------------------------------
# Sub-world environments
# --------------------------------------------------------------------------------------


def sub_env(rank, world, teachers, local_size=None, **kw):
    env = env_for(rank, world, local_size, **kw)
    return sub_world_env(env, assign_roles(env, teachers, colocated=False))


def test_sub_world_single_node():
    assert sub_env(1, 3, 1, addr="127.0.0.1") == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
    }
    assert sub_env(2, 3, 1, addr="127.0.0.1") == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "2", "LOCAL_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501", "TORCHELASTIC_USE_AGENT_STORE": "False",
    }


def test_sub_world_two_nodes():
    # 2 nodes x 4 ranks, 2 teachers: node 0 = students 0-3, node 1 = students 4,5 + teachers 6,7.
    node0 = sub_env(3, 8, 2, local_size=4)
    assert (node0["RANK"], node0["WORLD_SIZE"], node0["LOCAL_SIZE"], node0["LOCAL_RANK"]) == ("3", "6", "4", "3")
    node1_student = sub_env(5, 8, 2, local_size=4)
    assert (node1_student["RANK"], node1_student["LOCAL_SIZE"], node1_student["LOCAL_RANK"]) == ("5", "2", "1")
    assert node1_student["MASTER_ADDR"] == "n0"
    teacher = sub_env(7, 8, 2, local_size=4)
    assert (teacher["RANK"], teacher["WORLD_SIZE"], teacher["LOCAL_SIZE"], teacher["LOCAL_RANK"]) == ("1", "2", "2", "3")
    # Both teachers live on node 1, so their world meets on loopback, not at node 0.
    assert (teacher["MASTER_ADDR"], teacher["MASTER_PORT"]) == ("127.0.0.1", "29501")


def test_sub_world_teachers_spanning_nodes_meet_at_master_addr():
    # 3 nodes x 4 ranks, 6 teachers on nodes 1 and 2.
    teacher = sub_env(10, 12, 6, local_size=4)
    assert (teacher["RANK"], teacher["WORLD_SIZE"], teacher["LOCAL_SIZE"]) == ("4", "6", "4")
    assert teacher["MASTER_ADDR"] == "n0"


def test_sub_world_colocated_normalises_mpi_launch():
    env = detect_launch(OPENMPI, [])
    out = sub_world_env(env, assign_roles(env, 1, colocated=True))
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4",
                   "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node01", "MASTER_PORT": "29500"}


def test_bridge_address():
    env = env_for(0, 3, addr="node01", port=29500)
    assert bridge_address(env, None) == ("node01", 29502)
    assert bridge_address(env, 31000) == ("node01", 31000)
    with pytest.raises(ValueError, match="bridge port 65536"):
        bridge_address(env_for(0, 3, port=65534), None)


def test_apply_env(monkeypatch):
    monkeypatch.setenv("PADD_ROLES_TEST", "old")  # monkeypatch restores it afterwards
    apply_env({"PADD_ROLES_TEST": "new"})
    assert os.environ["PADD_ROLES_TEST"] == "new"


# --------------------------------------------------------------------------------------
# Real processes: the sub-worlds are separate torch.distributed worlds
# --------------------------------------------------------------------------------------

WORKER = r"""
import json, os, sys
from datetime import timedelta
from padd_ds.launch.roles import apply_env, assign_roles, detect_launch, sub_world_env

env = detect_launch()
roles = assign_roles(env, teacher_ranks=1, colocated=False)
apply_env(sub_world_env(env, roles))

import torch
import torch.distributed as dist

torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
value = torch.tensor([float(env.rank + 1)])
dist.all_reduce(value)
out = {"launcher": env.launcher, "global_rank": env.rank, "role": roles.role,
       "world": dist.get_world_size(), "rank": dist.get_rank(), "sum": value.item()}
with open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w") as f:
    json.dump(out, f)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skips a rare gloo abort at interpreter exit on small machines
"""


def free_base_port() -> int:
    """A port p with p, p+1, p+2 free (students, teachers, bridge)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 2 > 65535:
            continue
        try:
            for p in (base, base + 1, base + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no three consecutive free ports")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "TORCHELASTIC", "OMPI_", "PMI_", "SLURM_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def check_sub_worlds(out_dir: Path, launcher: str) -> None:
    results = {r["global_rank"]: r for r in (json.loads(p.read_text()) for p in out_dir.glob("rank*.json"))}
    assert sorted(results) == [0, 1, 2], results
    assert {r["launcher"] for r in results.values()} == {launcher}
    for g in (0, 1):
        assert results[g]["role"] == "student"
        assert (results[g]["world"], results[g]["rank"]) == (2, g)
        assert results[g]["sum"] == 1 + 2  # students 0 and 1 only
    assert results[2]["role"] == "teacher"
    assert (results[2]["world"], results[2]["rank"], results[2]["sum"]) == (1, 0, 3)


def test_torchrun_sub_worlds(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3",
           "--master_port", str(free_base_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_sub_worlds(tmp_path, "torchrun")


def test_deepspeed_style_sub_worlds(tmp_path):
    """The environment `deepspeed --num_gpus 3` gives its workers (no agent store: student
    rank 0 hosts the students' store on MASTER_PORT itself)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_base_port()
    procs = []
    for rank in range(3):
        env = child_env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="3", LOCAL_SIZE="3", CROSS_RANK="0",
                   CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path), f"--local_rank={rank}"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = finish_ranks(procs, 120)
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    check_sub_worlds(tmp_path, "deepspeed")
