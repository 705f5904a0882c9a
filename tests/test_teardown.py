"""Deaths under a supervising launcher: the deepspeed launcher tears every other rank (and
its child processes: W&B's service) down within a second of the first death. Every padd-ds
failure line must still name the rank that died first, and a dead metrics service is a
warning, never a stop (or a culprit)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, free_port
from padd_ds.report.metrics import read_jsonl

COMMON = ["--set", "train.steps=400", "--set", "train.save_every=2", "--set", "train.log_every=1",
          "--set", "train.micro_batch_size=4", "--set", "stage1.enabled=true", "--set", "stage1.warmup_steps=6",
          "--set", "stage1.eval_problems=8", "--set", "stage1.targets_max_problems=32", "--set", "eval.num_problems=4", "--set", "eval.max_new_tokens=8",
          "--set", "logging.wandb_mode=offline", "--set", "logging.progress=false", "--set", "topology.timeout_s=60",
          "--set", "teacher.request_timeout_s=30"]
DISTILL = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), *COMMON]
PADD = ["--recipe", str(REPO / "recipes" / "toy_padd.yaml"), *COMMON, "--set", "data.max_response_tokens=32"]
# (phase, the run it happens in): each phase twice, 10 kills in all
PHASES = [("stage1", DISTILL), ("warmup", DISTILL), ("distill", DISTILL), ("rollouts", PADD),
          ("checkpoint", DISTILL)] * 2
TIMEOUT_S = 60  # topology.timeout_s: the longest any rank may wait


LAUNCHERS = {"deepspeed": ["-m", "deepspeed.launcher.runner", "--num_gpus", "3", "--master_port"],
             "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port"]}


def _launch(run_dir: Path, args: list[str], launcher: str = "deepspeed") -> tuple[subprocess.Popen, Path]:
    log = run_dir.parent / f"{run_dir.name}.log"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    proc = subprocess.Popen([sys.executable, *LAUNCHERS[launcher], str(free_port()), str(REPO / "train.py"), *args,
                             "--set", f"run.output_dir={run_dir}"],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    return proc, log


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if f"--local_rank={rank}" in p.cmdline() or p.environ().get("RANK") == str(rank):
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"rank {rank} is not running")


def _rows(run_dir: Path, prefix: str) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(k.startswith(prefix) for r in read_jsonl(path) for k in r)


def _reached(phase: str, run_dir: Path, log: Path) -> bool:
    """Has the run reached the moment after which the kill falls in `phase`?"""
    if phase == "stage1":  # the students have their bridge and start building (Stage I follows)
        return "[device] rank 0 (student)" in log.read_text()
    if phase == "warmup":
        return _rows(run_dir, "stage1/warmup")
    if phase in ("distill", "rollouts"):
        return _rows(run_dir, "train/")
    return any((run_dir / "checkpoints").glob(".tmp-step_*"))  # checkpoint: a save in progress


def _kill_teacher_at(phase: str, delay: float, args: list[str], run_dir: Path) -> tuple[str, int, float]:
    launcher, log = _launch(run_dir, args)
    try:
        t0 = time.time()
        while not _reached(phase, run_dir, log):
            assert launcher.poll() is None, f"the launch ended before {phase}:\n{log.read_text()[-3000:]}"
            assert time.time() - t0 < 300, f"{phase} not reached in 300 s"
            time.sleep(0.01)
        time.sleep(delay)
        _rank_process(launcher, 2).kill()
        killed = time.time()
        code = launcher.wait(timeout=TIMEOUT_S + 30)
        return log.read_text(), code, time.time() - killed
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, 9)


def test_teacher_killed_ten_times_under_the_deepspeed_launcher_is_named_every_time(toy_build, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for i, (phase, args) in enumerate(PHASES):
        delay = 0.0 if phase == "checkpoint" else rng.uniform(0.0, 2.0)
        out, code, took = _kill_teacher_at(phase, delay, args, tmp_path / f"kill{i}")
        where = f"kill {i} ({phase} + {delay:.2f}s, seed {seed})"
        failures = _failures(out)
        assert failures, f"{where}: no rank reported a failure\n{out[-4000:]}"
        blamed = [line for line in failures if "rank 2 (teacher)" not in line.split(" failed: ", 1)[1]]
        assert not blamed, f"{where}: failure lines that do not name the teacher: {blamed}\n{out[-4000:]}"
        assert code != 0 and took < TIMEOUT_S, f"{where}: launcher exit {code} after {took:.0f}s"


@pytest.mark.parametrize("launcher_name", ["deepspeed", "torchrun"])
def test_teacher_and_metrics_service_lost_together_still_name_the_teacher(toy_build, tmp_path, launcher_name):
    """What a launcher does to rank 0's process tree right after the teacher dies (its W&B
    service goes with it), made certain: both killed at once, mid-step. Rank 0's next W&B
    call fails before its next teacher request does; that must be a warning, and the failure
    lines must name the teacher, not rank 0."""
    args = [*DISTILL, "--set", "stage1.enabled=false", "--set", "train.micro_batch_size=16"]  # ~0.5 s steps, mostly training
    out, failures = _kill_mid_step(tmp_path / "run", args, launcher_name,
                                   lambda launcher: [_rank_process(launcher, 2), *_services(launcher)])
    assert all("rank 2 (teacher)" in line.split(" failed: ", 1)[1] for line in failures), failures
    assert "padd-ds: warning: W&B disabled" in out, out[-4000:]


def test_student_killed_under_the_launcher_is_named_by_every_rank(toy_build, tmp_path):
    """The other way round: student rank 1 dies; student 0 (which hosts the launch's store)
    and the teacher are torn down by the launcher and must both name rank 1."""
    _, failures = _kill_mid_step(tmp_path / "run", [*DISTILL, "--set", "stage1.enabled=false"], "deepspeed",
                                 lambda launcher: [_rank_process(launcher, 1)])
    assert all("lost rank 1 (student)" in line for line in failures), failures


def _failures(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("padd-ds: rank") and " failed: " in line]


def _kill_mid_step(run_dir: Path, args: list[str], launcher_name: str, victims) -> tuple[str, list[str]]:
    """Launch, SIGKILL `victims(launcher)` in the middle of a training step; the launch's output
    and its failure lines (there must be some, and the launcher must exit non-zero)."""
    launcher, log = _launch(run_dir, args, launcher_name)
    try:
        _mid_step(run_dir, launcher, log)
        for p in victims(launcher):
            p.kill()
        code = launcher.wait(timeout=TIMEOUT_S + 30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, 9)
    out = log.read_text()
    assert code != 0 and _failures(out), out[-4000:]
    return out, _failures(out)


def _mid_step(run_dir: Path, launcher: subprocess.Popen, log: Path) -> None:
    """Return in the middle of a training step, when its teacher outputs have arrived and
    the next request is not yet sent: half a step after a step's row is written."""
    def logged() -> list[float]:
        path = run_dir / "metrics.jsonl"
        return [r["time"] for r in read_jsonl(path) if "train/kd_loss" in r] if path.exists() else []

    t0 = time.time()
    while len(times := logged()) < 3:
        assert launcher.poll() is None and time.time() - t0 < 300, log.read_text()[-3000:]
        time.sleep(0.01)
    while len(logged()) == len(times):
        time.sleep(0.005)
    time.sleep((times[-1] - times[-2]) / 2)


def _services(launcher: subprocess.Popen) -> list[psutil.Process]:
    found = [p for p in psutil.Process(launcher.pid).children(recursive=True) if p.name() == "wandb-core"]
    assert found, "no W&B service process"
    return found


def test_wandb_service_killed_mid_run_is_a_warning_and_metrics_stay_complete(toy_build, tmp_path):
    steps = 12
    args = [*DISTILL, "--set", f"train.steps={steps}", "--set", "stage1.enabled=false", "--set", "train.save_every=0"]
    launcher, log = _launch(tmp_path / "run", args)
    try:
        t0 = time.time()
        while not _rows(tmp_path / "run", "train/"):
            assert launcher.poll() is None and time.time() - t0 < 300, log.read_text()[-3000:]
            time.sleep(0.05)
        for p in _services(launcher):
            p.kill()
        code = launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, 9)
    out = log.read_text()
    assert code == 0, out[-4000:]
    assert "padd-ds: warning: W&B disabled (ConnectionResetError" in out, out[-4000:]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/kd_loss" in r] == list(range(1, steps + 1))
    assert (tmp_path / "run" / "results.json").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
