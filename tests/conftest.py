"""Shared fixtures: the test-profile toy build (built once, cached under .cache/padd_ds)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from padd_ds.paths import REPO_ROOT

REPO = REPO_ROOT  # the checkout whose padd_ds the tests import (its train.py, recipes, ds_configs)


@pytest.fixture(scope="session")
def toy_build():
    """The fast 'test' toy build; PADD_TOY_DIR points at it for every subprocess."""
    from padd_ds.toy.build import build_toy

    toy = build_toy("test")
    os.environ["PADD_TOY_DIR"] = str(toy.root)
    return toy


def free_port() -> int:
    """A base port P with P, P+1, P+2 free (students, teachers, bridge). Drawn below the
    kernel's ephemeral range (32768+), so no gloo client connection can take it between this
    check and the launch (the EADDRINUSE flake of a port taken from bind(0))."""
    rng = random.SystemRandom()
    for _ in range(200):
        base = rng.randrange(20000, 32000)
        try:
            for p in range(base, base + 3):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no three consecutive free ports in 20000..32000")


def run_cmd(cmd: list[str], timeout: float, cwd: Path | None = None, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with a hard timeout; on failure show its output tail in the assertion."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "WANDB_MODE": "disabled", **(env or {})}
    full_env.setdefault("MASTER_PORT", str(free_port()))  # not the default 29500 another run on the host may hold
    try:
        p = subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-4000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-4000:]
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out}") from None
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {' '.join(cmd)}\n--- stdout ---\n{p.stdout[-6000:]}"
                             f"\n--- stderr ---\n{p.stderr[-6000:]}")
    return p


def deepspeed_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(free_port()), str(REPO / "train.py"), *args]


def read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def start_ranks(run_dir: Path, args: list[str], world_size: int = 3) -> list[subprocess.Popen]:
    """The ranks of a launch as independent processes, with the environment the deepspeed
    launcher would set but without the launcher: a supervising launcher kills every rank as
    soon as one exits, and fault tests are about each rank noticing on its own."""
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")}
    base.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port, WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size), PYTHONUNBUFFERED="1")
    return [subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "--set", f"run.output_dir={run_dir}"],
                             env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
            for r in range(world_size)]


def reap(procs: list[subprocess.Popen]) -> None:
    """Kill whatever is still running (a failed test must not leave ranks behind)."""
    for p in procs:
        if p.poll() is None:
            p.kill()


def finish_ranks(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each rank's combined output once it exits; ranks still running on failure are killed."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        reap(procs)


def two_sgd_ranks(script: str, tmp: Path, timeout: float) -> list[dict]:
    """Run tests/<script> on 2 ZeRO-3 + AutoEP ranks with ds_configs/zero3.json switched to SGD
    without clipping (AdamW's first steps barely depend on the gradient's scale, so it would
    hide a wrong one); each rank writes result.json.<rank> in `tmp`."""
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["optimizer"] = {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}}
    ds["gradient_clipping"] = 0.0
    ds["zero_allow_untested_optimizer"] = True
    (tmp / "zero3_sgd.json").write_text(json.dumps(ds))
    out = tmp / "result.json"
    run_cmd([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
             str(REPO / "tests" / script), str(out)], timeout=timeout)
    return [json.loads((tmp / f"result.json.{r}").read_text()) for r in (0, 1)]


def _gloo_child(rank: int, world: int, port: int, q, fn, args: tuple) -> None:
    """A spawned rank: the environment of a `world`-rank gloo job, DeepSpeed's comm on it, then
    fn(rank, *args); its result (or the error, as text) goes back through `q`."""
    import traceback

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    try:
        import deepspeed
        import torch

        from padd_ds.launch.world import release_shm_names

        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        release_shm_names()
        q.put((rank, fn(rank, *args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        q.put((rank, f"ERROR {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))
    q.close()
    q.join_thread()  # flush the queue before leaving without interpreter teardown
    os._exit(0)


def spawn_gloo_ranks(fn, *args, world: int = 2, timeout: float = 180) -> dict:
    """Run fn(rank, *args) on `world` spawned gloo ranks (fn importable at module level); their
    results by rank. A rank's error fails the caller's assertion with its traceback."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gloo_child, args=(r, world, port, q, fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    errors = [v for v in got.values() if isinstance(v, str) and v.startswith("ERROR")]
    assert not errors, errors
    return got
