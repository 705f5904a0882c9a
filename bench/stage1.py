"""Does Stage I help? Router init from the teacher's clusters vs a randomly initialised router.

Runs Stage I on the toy models (one colocated process each, identical data and steps) for:
  pretrained + fitted   the toy MoE student, router = least-squares projection of the
                        teacher's centroids (the paper's setting)
  pretrained + random   the same student with a freshly initialised router
  pretrained + kept     its own pre-trained router (no init), same warmup
  decompressed + centroids / random   a student decompressed from the teacher
  decompressed + centroids, uniform_random_topk   the other reading of the frozen router
and reports, on held-out D_D with the learned router: top-1 / top-k agreement between the
student's routes and the teacher's most active clusters, the path KL(p_S || p_T) and the KD
loss to the teacher - after the init and after the warmup. The last line compares the
fitted init with the random one (pretrained student, after warmup):

    STAGE1 agreement_top1_fitted=<a> agreement_top1_random=<b> kd_ratio_fitted_vs_random=<r>

Usage: python bench/stage1.py [--warmup-steps 100] [--quick]   (PADD_TOY_DIR or the built demo world)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ARMS = [
    ("pretrained + fitted", ["stage1.router_init=centroids"]),
    ("pretrained + random", ["stage1.router_init=random"]),
    ("pretrained + kept", ["stage1.router_init=keep"]),
    ("pretrained + kept, own router", ["stage1.router_init=keep", "stage1.warmup_router=learned"]),
    ("decompressed + centroids", ["models.student=null", "stage1.router_init=centroids"]),
    ("decompressed + random", ["models.student=null", "stage1.router_init=random"]),
    ("decompressed + centroids, random top-k",
     ["models.student=null", "stage1.router_init=centroids", "stage1.warmup_router=uniform_random_topk"]),
]


def free_port() -> int:
    with socket.socket() as sock:  # a free rendezvous port: other runs may hold the default one
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_arm(overrides: list[str], warmup: int, out: Path) -> tuple[dict, float]:
    sets = ["topology.colocated=true", "deepspeed.expert_parallel_size=1", "stage1.enabled=true",
            f"stage1.warmup_steps={warmup}", "train.steps=1", "eval.num_problems=8", "eval.max_new_tokens=16",
            "logging.wandb_mode=disabled", "logging.progress=false", f"run.output_dir={out}", *overrides]
    cmd = [sys.executable, str(REPO / "train.py"), "--recipe", str(REPO / "recipes" / "toy_cpu.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "MASTER_PORT": str(free_port())}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)
    if p.returncode != 0:
        sys.exit(f"arm failed ({' '.join(overrides)}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text())["stage1"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="20 warmup steps, the pretrained arms only")
    args = ap.parse_args()
    arms = ARMS[:4] if args.quick else ARMS
    warmup = 20 if args.quick else args.warmup_steps
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, over) in enumerate(arms):
            rows[name], secs = run_arm(over, warmup, Path(tmp) / f"arm{i}")
            print(f"{name}: {secs:.0f}s", flush=True)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Stage I on held-out D_D, learned routing (warmup {warmup} steps)")
    for col in ("arm", "phase", "agree top-1", "agree top-k", "path KL", "KD loss"):
        t.add_column(col, justify="right" if col not in ("arm", "phase") else "left")
    for name, r in rows.items():
        for phase in ("before", "after_init", "after_warmup"):
            m = r[phase]
            t.add_row(name if phase == "before" else "", phase.replace("_", " "), f"{m['agreement_top1']:.3f}",
                      f"{m['agreement_topk']:.3f}", f"{m['path_kl']:.3f}", f"{m['kd_loss']:.4f}")
    Console().print(t)
    fit, rnd = rows["pretrained + fitted"]["after_warmup"], rows["pretrained + random"]["after_warmup"]
    print(f"STAGE1 agreement_top1_fitted={fit['agreement_top1']:.4f} agreement_top1_random={rnd['agreement_top1']:.4f} "
          f"kd_ratio_fitted_vs_random={fit['kd_loss'] / rnd['kd_loss']:.4f}")


if __name__ == "__main__":
    main()
