"""SIGUSR1 mid-run (what slurm/launch.sh forwards before a time limit): every student rank
finishes the same step, a complete checkpoint is written, all ranks exit 0, and a restart
resumes from it and finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, free_port

STEPS = 60
ARGS = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", f"train.steps={STEPS}", "--set", "train.log_every=1",
        "--set", "eval.num_problems=4", "--set", "eval.max_new_tokens=8", "--set", "logging.wandb_mode=disabled",
        "--set", "logging.progress=false", "--set", "topology.timeout_s=60", "--set", "train.micro_batch_size=4"]


def _start(out: Path) -> list[subprocess.Popen]:
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")}
    base.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port, WORLD_SIZE="3", LOCAL_SIZE="3")
    return [subprocess.Popen([sys.executable, str(REPO / "train.py"), *ARGS, "--set", f"run.output_dir={out}"],
                             env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL) for r in range(3)]


def test_sigusr1_checkpoints_exits_zero_and_resumes(toy_build, tmp_path):
    procs = _start(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert time.time() - t0 < 300 and all(p.poll() is None for p in procs), "training did not start"
        time.sleep(0.3)
    for p in procs:  # SLURM signals every task of the step
        p.send_signal(signal.SIGUSR1)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs[0][-3000:]
    assert "[preempted]" in outs[0]
    assert not (tmp_path / "results.json").exists()
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    stopped = int(latest.split("_")[1])
    assert 3 <= stopped < STEPS
    marker = json.loads((tmp_path / "checkpoints" / latest / "padd_complete.json").read_text())
    assert marker["step"] == stopped

    outs = [p.communicate(timeout=400)[0] for p in _start(tmp_path)]
    assert f"[resume] continuing from {tmp_path / 'checkpoints' / latest} (step {stopped})" in outs[0]
    res = json.loads((tmp_path / "results.json").read_text())
    steps = [h["step"] for h in res["history"]]
    assert steps == list(range(1, STEPS + 1))  # nothing lost, nothing repeated
