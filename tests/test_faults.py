"""A teacher that dies or hangs must stop every student quickly, naming the teacher rank
and the request; nothing may hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, deepspeed_cmd

ARGS = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.steps=400", "--set", "train.log_every=1",
        "--set", "eval.num_problems=4", "--set", "logging.wandb_mode=disabled", "--set", "logging.progress=false",
        "--set", "topology.timeout_s=60", "--set", "teacher.request_timeout_s=15", "--set", "train.micro_batch_size=4"]


def _start(tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen(deepspeed_cmd(3, *ARGS, "--set", f"run.output_dir={tmp_path}"), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _teacher_process(launcher: subprocess.Popen) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if any(a == "--local_rank=2" for a in child.cmdline()):
            return child
    raise AssertionError("teacher process (local rank 2) not found")


def _wait_training(tmp_path: Path, launcher: subprocess.Popen, timeout: float = 300) -> None:
    metrics = tmp_path / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            return
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        time.sleep(0.5)
    raise AssertionError("training did not start")


def _finish(launcher: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        out = launcher.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        raise AssertionError(f"students did not exit within {timeout}s of the teacher fault") from None
    return launcher.returncode, out, time.time() - t0


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_teacher_fault_stops_students(toy_world, tmp_path, fault):
    launcher = _start(tmp_path)
    try:
        _wait_training(tmp_path, launcher)
        teacher = _teacher_process(launcher)
        if fault == "killed":
            teacher.send_signal(signal.SIGKILL)
        else:
            teacher.send_signal(signal.SIGSTOP)   # alive but silent: only the timeout can tell
        code, out, took = _finish(launcher, timeout=90)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert code != 0
    assert "rank 0 (student) failed" in out or "rank 1 (student) failed" in out, out[-3000:]
    assert "teacher rank 2" in out and "request" in out, out[-3000:]
    if fault == "hung":
        assert "within 15s" in out, out[-3000:]
    assert took < 60
