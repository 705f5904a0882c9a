"""Table 1 and the ablations at toy scale (issue 8): PADD vs the baselines vs PADD without each stage.

Every arm is one `train.py` run of recipes/toy_padd.yaml in ONE colocated process (teacher and
student in the same process, no expert parallelism), 8 prompts x G=4 rollouts per step, the
same data, steps, rollout budget and greedy held-out evaluation for all of them. Stage I is run
once per seed and shared: the arms with Stage I start from its exported student.

  base student         toy://student, no training (its `student_before` accuracy)
  MoE-GRPO             stage2.enabled=false stage3.policy=grpo stage4.enabled=false
  MoE-GRPO (lr 1e-5)   the same at a tenth of the recipe's rate: on-policy GRPO at 1e-4 lowers
                       the toy student's accuracy, in our engine and in plain PyTorch alike
  online KD + GRPO     stage2.temperature_coupling=fixed stage3.policy=grpo stage4.enabled=false
  RSPO / GSPO          stage3.policy=rspo|gspo stage2.enabled=false stage4.enabled=false
  PADD                 Stage I, then the recipe as is
  w/o Stage I          the recipe from toy://student
  w/o Stage II/III/IV  Stage I, then stage2|stage3|stage4.enabled=false
(the baselines start from toy://student, as in the README's "method | overrides" table)
Every arm takes `--updates-per-batch` optimiser steps per rollout batch (default 2): with one,
the ratio is 1 at every update, nothing is clipped, and GRPO, GSPO, RSPO and PR-GRPO coincide.

The teacher and the base student are evaluated once (greedy decoding on fixed problems does
not depend on the seed), by the first seed's Stage I run; the arms set eval.references=false.

The shared Stage I run: `train.steps` must be >= 1 (config validation), so it does one PADD
step after Stage I; it runs that step at train.lr=1e-12 with Stage IV off, so the exported
student is the Stage I student (up to ~1e-12 per weight) and its export is exact (no bias
fold). Its `student_after` is reported as the "Stage I only" row (not a baseline).

Writes <out>/reproduce_table.{md,json,png}. The last line printed is

    REPRO padd=<acc> teacher=<acc> best_baseline=<name>:<acc> ablations_below_padd=<n>/4

Usage: python bench/reproduce_table.py [--seeds 0 1 2] [--steps 60] [--updates-per-batch 2]
                                       [--eval-problems 200] [--stage1-steps 300] [--jobs 2] [--quick]
                                       [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "toy_padd.yaml"

# name -> (starts from the shared Stage I student?, overrides on top of the recipe)
NO_S2_S4 = ["stage2.enabled=false", "stage4.enabled=false"]
ARMS = {
    "MoE-GRPO": (False, ["stage3.policy=grpo", *NO_S2_S4]),
    "MoE-GRPO (lr 1e-5)": (False, ["stage3.policy=grpo", *NO_S2_S4, "train.lr=1e-5"]),
    "online KD (fixed T) + GRPO": (False, ["stage2.temperature_coupling=fixed", "stage3.policy=grpo",
                                          "stage4.enabled=false"]),
    "RSPO": (False, ["stage3.policy=rspo", *NO_S2_S4]),
    "GSPO": (False, ["stage3.policy=gspo", *NO_S2_S4]),
    "PADD": (True, []),
    "PADD w/o Stage I": (False, []),
    "PADD w/o Stage II": (True, ["stage2.enabled=false"]),
    "PADD w/o Stage III": (True, ["stage3.enabled=false"]),
    "PADD w/o Stage IV": (True, ["stage4.enabled=false"]),
}
BASELINES = ["base student", "MoE-GRPO", "MoE-GRPO (lr 1e-5)", "online KD (fixed T) + GRPO", "RSPO", "GSPO"]
ABLATIONS = ["PADD w/o Stage I", "PADD w/o Stage II", "PADD w/o Stage III", "PADD w/o Stage IV"]
ORDER = ["teacher", "base student", "MoE-GRPO", "MoE-GRPO (lr 1e-5)", "online KD (fixed T) + GRPO", "RSPO", "GSPO",
         "Stage I only", "PADD", *ABLATIONS]

_procs: set[subprocess.Popen] = set()  # running arms, terminated if another arm fails
_lock = threading.Lock()


class ArmFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:  # a free rendezvous port: other runs may hold the default one
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


REUSE = False  # --reuse: an arm whose directory holds results.json from the identical command is not run again


def run_train(name: str, seed: int, out: Path, sets: list[str]) -> dict:
    """One colocated train.py run; returns its results.json. Raises ArmFailed with the log tail."""
    base = ["topology.colocated=true", "deepspeed.expert_parallel_size=1", "train.micro_batch_size=32",
            "logging.wandb_mode=disabled", "logging.progress=false", "train.resume=never",
            f"run.output_dir={out}", f"run.seed={seed}"]
    cmd = [sys.executable, str(REPO / "train.py"), "--recipe", str(RECIPE)]
    for s in base + sets:
        cmd += ["--set", s]
    done = out / "results.json"
    if REUSE and done.exists() and (out / "command.txt").exists() and \
            (out / "command.txt").read_text().strip() == " ".join(cmd):  # the same arm, finished
        r = json.loads(done.read_text())
        r["_seconds"] = float((out / "seconds.txt").read_text())
        print(f"  seed {seed} {name}: reused {done}", flush=True)
        return r
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "MASTER_PORT": str(free_port())}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    if out.exists():  # a fresh run: an earlier run's checkpoints or results must not leak in
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with _lock:
            _procs.add(p)
        rc = p.wait()
        with _lock:
            _procs.discard(p)
    secs = time.perf_counter() - t0
    if rc != 0 or not (out / "results.json").exists():
        tail = log.read_text()[-4000:]
        raise ArmFailed(f"arm '{name}' (seed {seed}) failed with exit code {rc}; log {log}:\n{tail}")
    (out / "command.txt").write_text(" ".join(cmd) + "\n")
    (out / "seconds.txt").write_text(f"{secs:.1f}\n")
    print(f"  [{time.strftime('%H:%M:%S')}] seed {seed} {name}: {secs:.0f}s", flush=True)
    r = json.loads((out / "results.json").read_text())
    r["_seconds"] = secs
    return r


def t_interval(xs: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of the 95% t-interval (None with one seed)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    from scipy.stats import t

    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, float(t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60, help="RL (Stages II-IV) steps per arm")
    ap.add_argument("--updates-per-batch", type=int, default=2, help="stage3.updates_per_batch of every arm")
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--stage1-steps", type=int, default=300, help="Stage I warmup steps")
    ap.add_argument("--jobs", type=int, default=2, help="arms run at once (one core each)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 15 RL steps, 60 Stage I steps, 64 problems")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "padd_reproduce_table",
                    help="run directories and logs of every arm")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the arms an earlier (interrupted) run with the same --workdir finished")
    args = ap.parse_args()
    global REUSE
    REUSE = args.reuse
    if args.quick:
        args.seeds, args.steps, args.stage1_steps, args.eval_problems = args.seeds[:1], 15, 60, 64
    common = [f"eval.num_problems={args.eval_problems}", "train.log_every=5"]
    print(f"reproduce_table: seeds {args.seeds}, {args.steps} RL steps per arm, Stage I warmup "
          f"{args.stage1_steps} steps, {args.eval_problems} held-out problems, {args.jobs} arms at once, "
          f"runs in {args.workdir}", flush=True)
    print("  (the shared Stage I run also does 1 PADD step at lr 1e-12 with Stage IV off: "
          "train.steps must be >= 1)", flush=True)
    t_start = time.perf_counter()

    results: dict[tuple[str, int], dict] = {}
    failed: list[BaseException] = []
    with ThreadPoolExecutor(args.jobs) as pool:
        stage1 = {s: pool.submit(run_train, "Stage I", s, args.workdir / f"seed{s}" / "stage1",
                                 [*common, f"eval.references={str(s == args.seeds[0]).lower()}", "stage1.enabled=true", f"stage1.warmup_steps={args.stage1_steps}",
                                  "train.steps=1", "train.lr=1e-12", "stage4.enabled=false"])
                  for s in args.seeds}

        def arm(name: str, seed: int) -> dict:
            with_s1, over = ARMS[name]
            start = ["stage1.enabled=false"]
            if with_s1:
                stage1[seed].result()  # wait for this seed's Stage I
                start.append(f"models.student={args.workdir / f'seed{seed}' / 'stage1' / 'hf'}")
            d = args.workdir / f"seed{seed}" / name.replace(" ", "_").replace("/", "").replace("(", "").replace(")", "")
            return run_train(name, seed, d, [*common, "eval.references=false", f"train.steps={args.steps}",
                                             f"stage3.updates_per_batch={args.updates_per_batch}", *start, *over])

        # Arms without Stage I first, so the Stage I runs finish before their arms start.
        names = sorted(ARMS, key=lambda n: ARMS[n][0])
        futs = {(n, s): pool.submit(arm, n, s) for n in names for s in args.seeds}
        futs.update({("Stage I only", s): f for s, f in stage1.items()})
        for key, fut in futs.items():
            try:
                results[key] = fut.result()
            except BaseException as e:  # noqa: BLE001 - stop everything, report the first failure
                failed.append(e)
                pool.shutdown(wait=False, cancel_futures=True)
                with _lock:
                    for p in list(_procs):
                        p.terminate()
                break
    if failed:
        print(f"FAILED: {failed[0]}", file=sys.stderr, flush=True)
        sys.exit(1)
    wall = time.perf_counter() - t_start

    # Per method: accuracy per seed, and the routing/throughput figures of the last history row.
    rows: dict[str, dict] = {}
    refs = results[("Stage I only", args.seeds[0])]  # evaluated once: greedy, seed-independent
    per_seed = {"teacher": [refs["teacher"]["accuracy"]], "base student": [refs["student_before"]["accuracy"]]}
    for name in ["Stage I only", *ARMS]:
        per_seed[name] = [results[(name, s)]["student_after"]["accuracy"] for s in args.seeds]
    for name in ORDER:
        mean, half = t_interval(per_seed[name])
        row = {"accuracy_mean": mean, "accuracy_ci95_half": half, "accuracy_per_seed": per_seed[name]}
        if name in ARMS:
            last = [results[(name, s)]["history"][-1] for s in args.seeds]
            for key, col in (("routing/drift_mean", "drift"), ("routing/load_cv", "load_cv"),
                             ("train/tokens_per_s", "tokens_per_s"), ("train/clip_frac", "clip_frac")):
                vals = [h[key] for h in last if h.get(key) is not None]
                row[col] = sum(vals) / len(vals) if vals else None
            # sampled accuracy of the rollouts, first and last logged window (mean over seeds)
            for col, i in (("rollout_acc_first", 0), ("rollout_acc_last", -1)):
                vals = [results[(name, s)]["history"][i]["train/accuracy"] for s in args.seeds]
                row[col] = sum(vals) / len(vals)
            row["seconds_per_seed"] = [results[(name, s)]["_seconds"] for s in args.seeds]
        if name == "Stage I only":
            row["seconds_per_seed"] = [results[(name, s)]["_seconds"] for s in args.seeds]
        rows[name] = row

    # Markdown table.
    fmt = lambda v, p=3: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [f"seeds {args.seeds} ({len(args.seeds)}), {args.steps} RL steps per arm (8 prompts x G=4 rollouts, "
             f"{args.updates_per_batch} updates per batch), Stage I warmup {args.stage1_steps} steps, {args.eval_problems} held-out toy problems, greedy pass@1; "
             f"teacher and base student evaluated once (greedy, seed-independent); drift / load CV / clip "
             f"fraction / tokens/s from the last logged training window and rollout accuracy from the first "
             f"and last, mean over seeds; "
             f"wall time {wall / 60:.1f} min with {args.jobs} arms at once.", "",
             "| method | accuracy | 95% interval (t, over seeds) | per seed | router drift | load CV | clip frac "
             "| rollout acc first -> last | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        half = r["accuracy_ci95_half"]
        ci = ("exact (evaluated once)" if name in ("teacher", "base student") else
              "n/a (1 seed)" if half is None else f"±{half:.3f}")
        trend = (f"{r['rollout_acc_first']:.3f} -> {r['rollout_acc_last']:.3f}" if "rollout_acc_first" in r else "n/a")
        lines.append(f"| {name} | {r['accuracy_mean']:.3f} | {ci} | {', '.join(f'{a:.3f}' for a in r['accuracy_per_seed'])} "
                     f"| {fmt(r.get('drift'), 5)} | {fmt(r.get('load_cv'))} | {fmt(r.get('clip_frac'))} | {trend} "
                     f"| {fmt(r.get('tokens_per_s'), 0)} |")
    table = "\n".join(lines)
    print("\n" + table + "\n", flush=True)

    padd = rows["PADD"]["accuracy_mean"]
    best = max(BASELINES, key=lambda n: rows[n]["accuracy_mean"])
    below = sum(rows[n]["accuracy_mean"] < padd for n in ABLATIONS)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reproduce_table.md").write_text(table + "\n")
    (args.out / "reproduce_table.json").write_text(json.dumps(
        {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "wall_seconds": wall, "methods": rows}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = list(rows)
    colors = ["0.3" if n == "teacher" else "tab:red" if n == "PADD" else "tab:blue" if n in BASELINES
              else "tab:orange" if n in ABLATIONS else "tab:green" for n in names]
    ax.bar(range(len(names)), [rows[n]["accuracy_mean"] for n in names], color=colors,
           yerr=[rows[n]["accuracy_ci95_half"] or 0 for n in names], capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    ci = "95% t-intervals" if len(args.seeds) > 1 else "1 seed, no interval"
    ax.set_title(f"toy build: {len(args.seeds)} seed(s), {args.steps} RL steps, {ci}", fontsize=10)
    ax.axhline(rows["base student"]["accuracy_mean"], color="0.5", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(args.out / "reproduce_table.png", dpi=120)
    print(f"wrote {args.out}/reproduce_table.{{md,json,png}}; wall time {wall:.0f}s", flush=True)
    print(f"REPRO padd={padd:.3f} teacher={rows['teacher']['accuracy_mean']:.3f} "
          f"best_baseline={best.replace(' ', '_')}:{rows[best]['accuracy_mean']:.3f} ablations_below_padd={below}/4", flush=True)


if __name__ == "__main__":
    main()
