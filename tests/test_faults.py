"""A teacher that dies or hangs must stop every student quickly, naming the teacher rank
and the request; nothing may hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port

ARGS = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.steps=400", "--set", "train.log_every=1",
        "--set", "eval.num_problems=4", "--set", "logging.wandb_mode=disabled", "--set", "logging.progress=false",
        "--set", "topology.timeout_s=60", "--set", "teacher.request_timeout_s=15", "--set", "train.micro_batch_size=4"]


def _start(tmp_path: Path) -> list[subprocess.Popen]:
    """The three ranks as independent processes (the environment the deepspeed launcher
    sets, without the launcher): a supervising launcher would kill the students itself when
    the teacher dies, and this test is about the students noticing on their own."""
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")}
    base.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port, WORLD_SIZE="3", LOCAL_SIZE="3")
    return [subprocess.Popen([sys.executable, str(REPO / "train.py"), *ARGS, "--set", f"run.output_dir={tmp_path}"],
                             env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             stdin=subprocess.DEVNULL) for r in range(3)]


def _wait_training(tmp_path: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    metrics = tmp_path / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            return
        assert all(p.poll() is None for p in procs), "a rank exited before training started"
        time.sleep(0.5)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_teacher_fault_stops_students(toy_world, tmp_path, fault):
    procs = _start(tmp_path)
    teacher = procs[2]
    try:
        _wait_training(tmp_path, procs)
        t0 = time.time()
        teacher.send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)  # hung: alive but silent
        outs = []
        for p in procs[:2]:
            try:
                outs.append(p.communicate(timeout=90)[0])
            except subprocess.TimeoutExpired:
                raise AssertionError(f"student did not exit within 90s of the teacher being {fault}") from None
        took = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = "\n".join(outs)
    assert all(p.returncode not in (0, None) for p in procs[:2]), [p.returncode for p in procs[:2]]
    # the first student to notice names the teacher and the request; the other may instead
    # see its peer go away, which must also end it
    assert "teacher rank 2" in out and "request" in out, out[-4000:]
    if fault == "hung":
        assert "within 15s" in out, out[-4000:]
    assert took < 60
