"""Teacher replica failover: 2 teacher replicas + 2 students (world 4). One replica killed
mid-run: its student moves to the other, the run finishes and trains exactly like an
uninterrupted one. Both killed: the students stop, naming the teacher."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, finish_ranks, reap, start_ranks

STEPS = 60
ARGS = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "topology.teacher_ranks=2",
        "--set", f"train.steps={STEPS}", "--set", "train.log_every=1", "--set", "train.micro_batch_size=4",
        "--set", "eval.num_problems=4", "--set", "eval.max_new_tokens=8", "--set", "logging.wandb_mode=disabled",
        "--set", "logging.progress=false", "--set", "topology.timeout_s=60", "--set", "teacher.request_timeout_s=30"]
LOSSES = ("train/kd_loss", "train/lm_loss")
# train.mode=padd (later overrides win): 2 prompts x G=4 per student and step, scored in 2 micro-batches.
PADD_ARGS = ARGS + [
    "--set", "train.steps=10", "--set", "train.mode=padd", "--set", "stage3.prompts_per_step=4",
    "--set", "train.lr=1e-4", "--set", "data.max_response_tokens=24"]
TIMING = {"time", "train/elapsed_s", "train/tokens_per_s", "train/generate_fraction", "teacher/wait_fraction", "teacher/replicas_alive"}


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _kill_mid_run(run_dir: Path, procs: list[subprocess.Popen], ranks: list[int], after: int = 5) -> int:
    """SIGKILL `ranks` once metrics.jsonl shows `after` steps; returns the steps logged by then."""
    t0 = time.time()
    while len(_metrics(run_dir)) < after:
        assert time.time() - t0 < 120 and all(p.poll() is None for p in procs), "training did not start"
        time.sleep(0.05)
    for r in ranks:
        procs[r].send_signal(signal.SIGKILL)
    return len(_metrics(run_dir))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_file(str(d / "hf" / "model.safetensors")) for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _run_killing(run_dir: Path, args: list[str], killed: int, after: int = 5) -> tuple[list[str], list[int], int]:
    """A 4-rank run with rank `killed` SIGKILLed mid-run: (outputs, exit codes, steps logged at the kill)."""
    procs = start_ranks(run_dir, args, world_size=4)
    try:
        at_kill = _kill_mid_run(run_dir, procs, [killed], after)
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        reap(procs)
    return outs, [p.returncode for p in procs], at_kill


@pytest.fixture(scope="module")
def uninterrupted(toy_build, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    outs = finish_ranks(start_ranks(run_dir, ARGS, world_size=4), 300)
    assert (run_dir / "results.json").exists(), outs[0][-3000:]
    return run_dir


@pytest.mark.parametrize("killed", [3, 2])
def test_a_killed_replica_is_replaced_and_training_is_unchanged(uninterrupted, tmp_path, killed):
    """Rank 3 (replica 1) or rank 2 (replica 0, which also evaluates the teacher for the
    report) killed mid-run: the student it served moves to the other replica, re-sending what
    was in flight; every other rank exits 0 and the exported student is bit-identical."""
    outs, codes, at_kill = _run_killing(tmp_path, ARGS, killed)
    assert at_kill < STEPS  # really mid-run
    assert codes[killed] == -signal.SIGKILL and all(c == 0 for r, c in enumerate(codes) if r != killed), \
        (codes, "\n".join(o[-3000:] for o in outs))
    student, survivor = killed - 2, 5 - killed
    assert f"[failover] student rank {student}: teacher rank {killed} lost" in outs[student], outs[student][-3000:]
    assert f"its requests go to teacher rank {survivor}: 1 of 2 teacher replicas left" in outs[student]
    assert f"now also serving student rank {student} (its teacher replica was lost)" in outs[survivor]
    alive = [m["teacher/replicas_alive"] for m in _metrics(tmp_path)]
    assert alive[0] == 2 and alive[-1] == 1 and alive == sorted(alive, reverse=True), alive
    got, want = (json.loads((d / "results.json").read_text()) for d in (tmp_path, uninterrupted))
    assert [{k: h[k] for k in LOSSES} for h in got["history"]] == [{k: h[k] for k in LOSSES} for h in want["history"]]
    assert _same_weights(tmp_path, uninterrupted)
    if killed == 2:  # replica 0 posted the teacher's evaluation: the main student warns and goes on
        assert got["teacher"] is None and "the teacher's held-out evaluation is missing" in outs[0]
    else:
        assert got["teacher"]["accuracy"] == want["teacher"]["accuracy"]


def test_with_every_replica_killed_the_students_stop_naming_the_teacher(toy_build, tmp_path):
    procs = start_ranks(tmp_path, ARGS, world_size=4)
    try:
        _kill_mid_run(tmp_path, procs, [2, 3])
        t0 = time.time()
        outs = [p.communicate(timeout=90)[0] for p in procs[:2]]
        took = time.time() - t0
    finally:
        reap(procs)
    assert all(p.returncode not in (0, None) for p in procs[:2]), [p.returncode for p in procs]
    for out in outs:
        line = next((l for l in out.splitlines() if l.startswith("padd-ds: rank")), "")
        assert "no teacher replica is left (teacher ranks [2, 3] lost)" in line, out[-3000:]
    assert took < 30, took  # the connections close at once: no timeout is waited out


def test_the_padd_stage_fails_over_too(toy_build, tmp_path):
    """train.mode=padd: the rollouts' teacher scoring goes through the same client, so the
    killed replica's student moves on and the run ends exactly like an uninterrupted one."""
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    outs = finish_ranks(start_ranks(ref, PADD_ARGS, world_size=4), 300)
    assert (ref / "results.json").exists(), outs[0][-3000:]
    outs, codes, at_kill = _run_killing(run, PADD_ARGS, 3, after=3)
    assert at_kill < 10 and codes[3] == -signal.SIGKILL and codes[:3] == [0, 0, 0], \
        (codes, "\n".join(o[-3000:] for o in outs))
    assert "[failover] student rank 1: teacher rank 3 lost" in outs[1], outs[1][-3000:]
    assert [m["teacher/replicas_alive"] for m in _metrics(run)][-1] == 1
    got, want = (json.loads((d / "results.json").read_text())["history"] for d in (run, ref))
    assert [{k: v for k, v in h.items() if k not in TIMING} for h in got] == \
        [{k: v for k, v in h.items() if k not in TIMING} for h in want]
    assert _same_weights(run, ref)
