"""A teacher or a student that dies (or a teacher that hangs) must stop every other rank
quickly, naming the lost rank; nothing may hang, and a restart from the last checkpoint must
end exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, finish_ranks, free_port, reap

ARGS = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.steps=400", "--set", "train.log_every=1",
        "--set", "eval.num_problems=4", "--set", "logging.wandb_mode=disabled", "--set", "logging.progress=false",
        "--set", "topology.timeout_s=60", "--set", "teacher.request_timeout_s=15", "--set", "train.micro_batch_size=4"]


def _start(tmp_path: Path, args: list[str] = ARGS) -> list[subprocess.Popen]:
    """The three ranks as independent processes (the environment the deepspeed launcher
    sets, without the launcher): a supervising launcher would kill the students itself when
    the teacher dies, and this test is about the students noticing on their own."""
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")}
    base.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port, WORLD_SIZE="3", LOCAL_SIZE="3")
    return [subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "--set", f"run.output_dir={tmp_path}"],
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
def test_teacher_fault_stops_students(toy_build, tmp_path, fault):
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


STEPS = 36
KILL_ARGS = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", f"train.steps={STEPS}",
             "--set", "train.save_every=6", "--set", "train.log_every=1", "--set", "train.micro_batch_size=4",
             "--set", "eval.num_problems=4", "--set", "eval.max_new_tokens=8", "--set", "logging.wandb_mode=disabled",
             "--set", "logging.progress=false", "--set", "topology.timeout_s=60"]
DETERMINISTIC = ("train/kd_loss", "train/lm_loss", "train/lr", "train/nonfinite_skipped")  # not timings




def _hit_student(procs: list[subprocess.Popen], sig: int) -> tuple[list[str], float]:
    """Send `sig` to student rank 1; the other ranks' output and how long they took to exit."""
    t0 = time.time()
    procs[1].send_signal(sig)
    outs = [p.communicate(timeout=90)[0] for p in (procs[0], procs[2])]
    return outs, time.time() - t0


def test_student_killed_stops_the_rest_and_a_restart_finishes_like_an_uninterrupted_run(toy_build, tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    outs = finish_ranks(_start(ref_dir, KILL_ARGS), 400)
    assert (ref_dir / "results.json").exists(), outs[0][-3000:]
    reference = json.loads((ref_dir / "results.json").read_text())

    procs = _start(run_dir, KILL_ARGS)
    try:
        metrics = run_dir / "metrics.jsonl"
        t0 = time.time()
        while not (metrics.exists() and metrics.read_text().count("\n") >= 8):  # the step-6 checkpoint is written
            assert time.time() - t0 < 300 and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.2)
        outs, took = _hit_student(procs, signal.SIGKILL)
    finally:
        reap(procs)
    assert procs[0].returncode not in (0, None) and procs[2].returncode not in (0, None)
    assert took < 60, took  # well within topology.timeout_s
    for name, out in (("student 0", outs[0]), ("teacher", outs[1])):
        line = next((l for l in out.splitlines() if l.startswith("padd-ds: rank")), "")
        assert "failed: lost rank 1 (student): no heartbeat" in line, f"{name}: {out[-3000:]}"
    assert not (run_dir / "results.json").exists()  # it really died mid-run
    latest = (run_dir / "checkpoints" / "latest").read_text()
    stopped = int(latest.split("_")[1])
    assert 6 <= stopped < STEPS and stopped % 6 == 0

    outs = finish_ranks(_start(run_dir, KILL_ARGS), 400)
    assert f"[resume] continuing from {run_dir / 'checkpoints' / latest} (step {stopped})" in outs[0], outs[0][-3000:]
    resumed = json.loads((run_dir / "results.json").read_text())
    assert [h["step"] for h in resumed["history"]] == list(range(1, STEPS + 1))
    for a, b in zip(resumed["history"], reference["history"]):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}, a["step"]
    for key in ("student_after", "export_routing_fidelity", "export_max_abs_logit_diff"):
        assert resumed[key] == reference[key], key


def test_student_hung_stops_the_rest_within_the_timeout(toy_build, tmp_path):
    """A frozen student (SIGSTOP): alive, silent, its sockets open. Not every collective the
    other student may be waiting in has a timeout of its own; the heartbeat watchdog ends it."""
    args = [a.replace("topology.timeout_s=60", "topology.timeout_s=15") for a in KILL_ARGS]
    args[args.index(f"train.steps={STEPS}")] = "train.steps=400"
    procs = _start(tmp_path, args)
    try:
        _wait_training(tmp_path, procs)
        outs, took = _hit_student(procs, signal.SIGSTOP)
    finally:
        reap(procs)
    assert procs[0].returncode not in (0, None) and procs[2].returncode not in (0, None)
    assert took < 15 + 10, took
    for out in outs:
        line = next((l for l in out.splitlines() if l.startswith("padd-ds: rank")), "")
        assert "failed: lost rank 1 (student): no heartbeat for 1" in line, out[-3000:]
