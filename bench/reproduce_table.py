"""Table 1 and the ablations at toy scale: PADD vs the baselines vs PADD without each stage.

Every arm is one `train.py` run of recipes/toy_padd.yaml in ONE colocated process (teacher and
student in the same process, no expert parallelism), 8 prompts x G=4 rollouts per step, the
same data, steps, rollout budget and greedy held-out evaluation for all of them. Stage I is run
once per seed and shared: the arms with Stage I start from its exported student.

  base student         toy://student, no training (its `student_before` accuracy)
  MoE-GRPO             stage2.enabled=false stage3.policy=grpo stage4.enabled=false
  MoE-GRPO (lr 1e-5)   the same at a tenth of the recipe's rate: on-policy GRPO at 1e-4 lowers
                       the toy student's accuracy, in our engine and in plain PyTorch alike
  GRPO control         MoE-GRPO with each rollout batch's advantages shuffled across it
                       (stage3.shuffle_advantages): steps as large, no reward information; GRPO
                       must beat it for the table to measure learning rather than update noise
  online KD + GRPO     stage2.temperature_coupling=fixed stage3.policy=grpo stage4.enabled=false
  RSPO / GSPO          stage3.policy=rspo|gspo stage2.enabled=false stage4.enabled=false
  PADD                 Stage I, then the recipe as is
  w/o Stage I          the recipe from toy://student
  w/o Stage II/III/IV  Stage I, then stage2|stage3|stage4.enabled=false
(the baselines start from toy://student, as in docs/method.md, "Baselines and ablations")
Every arm logs `train/policy_move` (stage3.measure_movement: mean |log pi_new - log pi_old| per
response token over a step's updates), reported as the "policy move" column.
Every arm takes `--updates-per-batch` optimiser steps per rollout batch (default 2): with one,
the ratio is 1 at every update, nothing is clipped, GRPO, RSPO and PR-GRPO coincide, and GSPO
differs only in averaging per response.

The teacher and the base student are evaluated once (greedy decoding on fixed problems does
not depend on the seed), by the first seed's Stage I run; the arms set eval.references=false.

The shared Stage I run: `train.steps` must be >= 1 (config validation), so it does one PADD
step after Stage I; it runs that step at train.lr=1e-12 with Stage IV off, so the exported
student is the Stage I student (up to ~1e-12 per weight) and its export is exact (no bias
fold). Its `student_after` is reported as the "Stage I only" row (not a baseline).

Writes <out>/reproduce_table.{md,json,png}: bench/results/ for the full run, bench/results/quick/
(ignored by git) for --quick. A smoke run never replaces a full result: --quick refuses an --out
that holds one. The last line printed is

    REPRO padd=<acc> teacher=<acc> base=<acc> grpo=<acc> control=<acc> best_baseline=<name>:<acc> ablations_below_padd=<n>/4

With --eval-every K every arm also evaluates every K RL steps (eval.every): the table gains the
arms' learning curves (seed means, and the training time to each point, in the JSON).

Usage: python bench/reproduce_table.py [--seeds 0 1 2] [--steps 60] [--updates-per-batch 2]
                                       [--eval-problems 200] [--stage1-steps 300] [--jobs 2] [--quick]
                                       [--eval-every 0]
                                       [--out bench/results] [--workdir DIR] [--reuse]
                                       [--set KEY=VALUE ...] [--toy-profile demo|guess]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "toy_padd.yaml"

# name -> (starts from the shared Stage I student?, overrides on top of the recipe)
NO_S2_S4 = ["stage2.enabled=false", "stage4.enabled=false"]
ARMS = {
    "MoE-GRPO": (False, ["stage3.policy=grpo", *NO_S2_S4]),
    "MoE-GRPO (lr 1e-5)": (False, ["stage3.policy=grpo", *NO_S2_S4, "train.lr=1e-5"]),
    "GRPO control (shuffled advantages)": (False, ["stage3.policy=grpo", *NO_S2_S4, "stage3.shuffle_advantages=true"]),
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
CONTROL = "GRPO control (shuffled advantages)"  # not a baseline: the noise floor GRPO must beat
ORDER = ["teacher", "base student", "MoE-GRPO", "MoE-GRPO (lr 1e-5)", CONTROL, "online KD (fixed T) + GRPO", "RSPO", "GSPO",
         "Stage I only", "PADD", *ABLATIONS]

RESULTS = REPO / "bench" / "results"
QUICK_RESULTS = RESULTS / "quick"  # ignored by git: a smoke table never lands beside the full one

_procs: set[subprocess.Popen] = set()  # running arms, terminated if another arm fails
_lock = threading.Lock()


class ArmFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:  # a free rendezvous port: other runs may hold the default one
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(out: Path, seed: int, sets: list[str]) -> list[str]:
    """One colocated train.py run of the recipe with `sets` on top."""
    # 8 prompts x G=4 = one micro-batch of 32 rollouts per step (the table's layout).
    base = ["topology.colocated=true", "deepspeed.expert_parallel_size=1", "train.micro_batch_size=32",
            "stage3.prompts_per_step=8", "stage3.measure_movement=true",
            "logging.wandb_mode=disabled", "logging.progress=false", "train.resume=never",
            f"run.output_dir={out}", f"run.seed={seed}"]
    cmd = [sys.executable, str(REPO / "train.py"), "--recipe", str(RECIPE)]
    for s in base + sets:
        cmd += ["--set", s]
    return cmd


def finished_result(out: Path, cmd: list[str]) -> dict | None:
    """The results.json of an earlier run of the identical command in `out`, else None."""
    done = out / "results.json"
    if not (done.exists() and (out / "command.txt").exists()
            and (out / "command.txt").read_text().strip() == " ".join(cmd)):
        return None
    r = json.loads(done.read_text())
    r["_seconds"] = float((out / "seconds.txt").read_text())
    return r


def run_logged(cmd: list[str], out: Path, log: Path) -> int:
    """Run `cmd` in a fresh `out` with its output in `log`; returns the exit code."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "MASTER_PORT": str(free_port())}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    if out.exists():  # a fresh run: an earlier run's checkpoints or results must not leak in
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with _lock:
            _procs.add(p)
        rc = p.wait()
        with _lock:
            _procs.discard(p)
    return rc


def run_train(name: str, seed: int, out: Path, sets: list[str], reuse: bool = False) -> dict:
    """One colocated train.py run; returns its results.json. Raises ArmFailed with the log tail.
    With `reuse`, an arm whose directory holds results.json from the identical command is not run again."""
    cmd = train_command(out, seed, sets)
    if reuse and (r := finished_result(out, cmd)) is not None:
        print(f"  seed {seed} {name}: reused {out / 'results.json'}", flush=True)
        return r
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    rc = run_logged(cmd, out, log)
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


def run_pool(jobs: int, calls: dict) -> tuple[dict, float]:
    """Run every call (a function and its arguments) of `calls`, `jobs` at once: the results by
    key, and the wall time."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        results = collect(pool, {k: pool.submit(fn, *a) for k, (fn, *a) in calls.items()})
    return results, time.perf_counter() - t0


def collect(pool: ThreadPoolExecutor, futs: dict) -> dict:
    """Every future's result by key; the first failure stops every running run and ends the script."""
    results = {}
    for key, fut in futs.items():
        try:
            results[key] = fut.result()
        except BaseException as e:  # noqa: BLE001 - stop everything, report the first failure
            pool.shutdown(wait=False, cancel_futures=True)
            with _lock:
                for p in list(_procs):
                    p.terminate()
            print(f"FAILED: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
    return results


def t_interval(xs: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of the 95% t-interval (None with one seed)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    from scipy.stats import t

    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, float(t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))


def add_run_args(ap: argparse.ArgumentParser, workdir: str) -> None:
    """The arguments every bench script of runs shares (this one, grpo_power, stage3_routes)."""
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one core each)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"where the results go (default under {RESULTS.relative_to(REPO)}, with --quick "
                         f"{QUICK_RESULTS.relative_to(REPO)})")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / workdir,
                    help="run directories and logs of every run")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the runs an earlier (interrupted) call with the same --workdir finished")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run, after the script's own (repeatable)")
    ap.add_argument("--toy-profile", choices=["demo", "guess"], default="demo",
                    help="the toy build every run uses (guess: a student that learned to work, then to guess half its answers without "
                         "working; build it first with `padd toy build --profile guess`)")


def settle_out(args: argparse.Namespace, name: str, full_dir: Path) -> None:
    """--out's default (`full_dir`, with --quick QUICK_RESULTS; a folder of its own there for
    another toy profile), the guard below, and every run pointed at the --toy-profile build."""
    if args.out is None:
        base = QUICK_RESULTS if args.quick else full_dir
        args.out = base if args.toy_profile == "demo" else base / f"toy_{args.toy_profile}"
    check_out(args, name)
    os.environ["PADD_TOY_PROFILE"] = args.toy_profile  # the runs inherit it (toy/resolve.py)


def check_out(args: argparse.Namespace, name: str) -> None:
    """A smoke run never replaces a full result (--quick refuses an --out holding <name>.json of a
    full run), nor a run on one toy build a result on another."""
    prev = args.out / f"{name}.json"
    if not prev.is_file():
        return
    before = json.loads(prev.read_text()).get("args", {})
    if args.quick and not before.get("quick", False):
        sys.exit(f"{name}: {prev} holds a full run's result; --quick does not replace it "
                 f"(leave --out unset to write to {QUICK_RESULTS})")
    if before.get("toy_profile", "demo") != args.toy_profile:
        sys.exit(f"{name}: {prev} holds a result on the {before.get('toy_profile', 'demo')} toy build; a run on "
                 f"the {args.toy_profile} build does not replace it (leave --out unset or pick another)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(ap, "padd_reproduce_table")
    ap.add_argument("--steps", type=int, default=60, help="RL (Stages II-IV) steps per arm")
    ap.add_argument("--updates-per-batch", type=int, default=2, help="stage3.updates_per_batch of every arm")
    ap.add_argument("--stage1-steps", type=int, default=300, help="Stage I warmup steps")
    ap.add_argument("--eval-every", type=int, default=0, help="each arm's held-out accuracy every K RL steps too")
    ap.add_argument("--quick", action="store_true", help="1 seed, 15 RL steps, 60 Stage I steps, 64 problems")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.stage1_steps, args.eval_problems = args.seeds[:1], 15, 60, 64
    settle_out(args, "reproduce_table", RESULTS)
    return args


def announce(args: argparse.Namespace) -> None:
    print(f"reproduce_table: seeds {args.seeds}, {args.steps} RL steps per arm, Stage I warmup "
          f"{args.stage1_steps} steps, {args.eval_problems} held-out problems, {args.jobs} arms at once, "
          f"runs in {args.workdir}", flush=True)
    print("  (the shared Stage I run also does 1 PADD step at lr 1e-12 with Stage IV off: "
          "train.steps must be >= 1)", flush=True)


def common_sets(args: argparse.Namespace) -> list[str]:
    return [f"eval.num_problems={args.eval_problems}", "train.log_every=5"]


def submit_stage1(pool: ThreadPoolExecutor, args: argparse.Namespace) -> dict[int, Future]:
    """Stage I once per seed; the first seed's run also evaluates the teacher and the base student."""
    return {s: pool.submit(run_train, "Stage I", s, args.workdir / f"seed{s}" / "stage1",
                           [*common_sets(args), f"eval.references={str(s == args.seeds[0]).lower()}",
                            "stage1.enabled=true", f"stage1.warmup_steps={args.stage1_steps}",
                            "train.steps=1", "train.lr=1e-12", "stage4.enabled=false", *args.overrides], args.reuse)
            for s in args.seeds}


def arm_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    return args.workdir / f"seed{seed}" / name.replace(" ", "_").replace("/", "").replace("(", "").replace(")", "")


def run_arm(args: argparse.Namespace, stage1: dict[int, Future], name: str, seed: int) -> dict:
    """One arm of one seed; an arm with Stage I waits for that seed's Stage I and starts from its student."""
    with_s1, over = ARMS[name]
    start = ["stage1.enabled=false"]
    if with_s1:
        stage1[seed].result()
        start.append(f"models.student={args.workdir / f'seed{seed}' / 'stage1' / 'hf'}")
    return run_train(name, seed, arm_dir(args, name, seed),
                     [*common_sets(args), "eval.references=false", f"train.steps={args.steps}",
                      f"eval.every={args.eval_every}", f"stage3.updates_per_batch={args.updates_per_batch}",
                      *start, *over, *args.overrides], args.reuse)


def run_all(args: argparse.Namespace) -> dict[tuple[str, int], dict]:
    """(method, seed) -> results.json of every arm and of the shared Stage I runs ("Stage I only").
    The first failure stops every running arm and ends the script."""
    with ThreadPoolExecutor(args.jobs) as pool:
        stage1 = submit_stage1(pool, args)
        # Arms without Stage I first, so the Stage I runs finish before their arms start.
        names = sorted(ARMS, key=lambda n: ARMS[n][0])
        futs = {(n, s): pool.submit(run_arm, args, stage1, n, s) for n in names for s in args.seeds}
        futs.update({("Stage I only", s): f for s, f in stage1.items()})
        return collect(pool, futs)


def mean_of(vals: list) -> float | None:
    return sum(vals) / len(vals) if vals else None


def training_columns(runs: list[dict]) -> dict:
    """Routing and throughput from the last history row, rollout accuracy from the first and last
    (means over seeds), and each seed's wall time."""
    last = [r["history"][-1] for r in runs]
    row = {col: mean_of([h[key] for h in last if h.get(key) is not None])
           for key, col in (("routing/drift_mean", "drift"), ("routing/load_cv", "load_cv"),
                            ("train/tokens_per_s", "tokens_per_s"), ("train/clip_frac", "clip_frac"))}
    moves = [h["train/policy_move"] for r in runs for h in r["history"] if h.get("train/policy_move") is not None]
    row["policy_move"] = mean_of(moves)  # every step of every seed
    for col, i in (("rollout_acc_first", 0), ("rollout_acc_last", -1)):
        vals = [r["history"][i]["train/accuracy"] for r in runs]
        row[col] = sum(vals) / len(vals)
    row["seconds_per_seed"] = [r["_seconds"] for r in runs]
    row["curve"] = learning_curve(runs)
    return row


def learning_curve(runs: list[dict]) -> list[dict]:
    """The runs' held-out accuracy at each evaluated step (eval.every): seed mean, per seed, and
    the mean training time to it; empty when the runs did not evaluate during training."""
    evals = [[h for h in r["history"] if "eval/heldout_acc" in h] for r in runs]
    return [{"step": hs[0]["step"], "accuracy": mean_of([h["eval/heldout_acc"] for h in hs]),
             "accuracy_seeds": [h["eval/heldout_acc"] for h in hs],
             "elapsed_s": mean_of([h["train/elapsed_s"] for h in hs])} for hs in zip(*evals)]


def aggregate(results: dict[tuple[str, int], dict], seeds: list[int]) -> dict[str, dict]:
    """Per method in ORDER: accuracy per seed, its mean and t-interval, and the training columns."""
    refs = results[("Stage I only", seeds[0])]  # evaluated once: greedy, seed-independent
    per_seed = {"teacher": [refs["teacher"]["accuracy"]], "base student": [refs["student_before"]["accuracy"]]}
    for name in ["Stage I only", *ARMS]:
        per_seed[name] = [results[(name, s)]["student_after"]["accuracy"] for s in seeds]
    rows: dict[str, dict] = {}
    for name in ORDER:
        mean, half = t_interval(per_seed[name])
        row = {"accuracy_mean": mean, "accuracy_ci95_half": half, "accuracy_per_seed": per_seed[name]}
        if name in ARMS:
            row.update(training_columns([results[(name, s)] for s in seeds]))
        if name == "Stage I only":
            row["seconds_per_seed"] = [results[(name, s)]["_seconds"] for s in seeds]
        rows[name] = row
    return rows


def markdown_table(rows: dict[str, dict], args: argparse.Namespace, wall: float) -> str:
    fmt = lambda v, p=3: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [f"seeds {args.seeds} ({len(args.seeds)}), {args.steps} RL steps per arm (8 prompts x G=4 rollouts, "
             f"{args.updates_per_batch} updates per batch), Stage I warmup {args.stage1_steps} steps, {args.eval_problems} held-out problems of the {args.toy_profile} toy build, greedy pass@1; "
             f"teacher and base student evaluated once (greedy, seed-independent); drift / load CV / clip "
             f"fraction / tokens/s from the last logged training window and rollout accuracy from the first "
             f"and last, mean over seeds; "
             f"wall time {wall / 60:.1f} min with {args.jobs} arms at once."
             + (f" Overrides: {' '.join(args.overrides)}." if args.overrides else ""), "",
             "| method | accuracy | 95% interval (t, over seeds) | per seed | router drift | load CV | clip frac "
             "| policy move | rollout acc first -> last | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        half = r["accuracy_ci95_half"]
        ci = ("exact (evaluated once)" if name in ("teacher", "base student") else
              "n/a (1 seed)" if half is None else f"±{half:.3f}")
        trend = (f"{r['rollout_acc_first']:.3f} -> {r['rollout_acc_last']:.3f}" if "rollout_acc_first" in r else "n/a")
        lines.append(f"| {name} | {r['accuracy_mean']:.3f} | {ci} | {', '.join(f'{a:.3f}' for a in r['accuracy_per_seed'])} "
                     f"| {fmt(r.get('drift'), 5)} | {fmt(r.get('load_cv'))} | {fmt(r.get('clip_frac'))} "
                     f"| {fmt(r.get('policy_move'), 4)} | {trend} "
                     f"| {fmt(r.get('tokens_per_s'), 0)} |")
    curves = {name: r["curve"] for name, r in rows.items() if r.get("curve")}
    if curves:
        steps = [c["step"] for c in next(iter(curves.values()))]
        lines += ["", "Held-out accuracy during training, by RL step (seed means; eval.every, Stage IV bias included):", "",
                  "| method | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
        lines += [f"| {name} | " + " | ".join(f"{c['accuracy']:.3f}" for c in curve) + " |"
                  for name, curve in curves.items()]
    return "\n".join(lines)


def plot_accuracies(rows: dict[str, dict], args: argparse.Namespace, path: Path) -> None:
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
    ax.set_title(f"{args.toy_profile} toy build: {len(args.seeds)} seed(s), {args.steps} RL steps, {ci}", fontsize=10)
    ax.axhline(rows["base student"]["accuracy_mean"], color="0.5", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_results(rows: dict[str, dict], table: str, args: argparse.Namespace, wall: float) -> None:
    """<out>/reproduce_table.md (the table), .json (arguments and per-method numbers), .png (the bars)."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reproduce_table.md").write_text(table + "\n")
    (args.out / "reproduce_table.json").write_text(json.dumps(
        {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "wall_seconds": wall, "methods": rows}, indent=2) + "\n")
    plot_accuracies(rows, args, args.out / "reproduce_table.png")


def repro_line(rows: dict[str, dict]) -> str:
    """PADD and the teacher, the best baseline, and how many ablations fall below PADD (seed means)."""
    padd = rows["PADD"]["accuracy_mean"]
    best = max(BASELINES, key=lambda n: rows[n]["accuracy_mean"])
    below = sum(rows[n]["accuracy_mean"] < padd for n in ABLATIONS)
    acc = lambda n: rows[n]["accuracy_mean"]  # noqa: E731
    return (f"REPRO padd={padd:.3f} teacher={acc('teacher'):.3f} base={acc('base student'):.3f} "
            f"grpo={acc('MoE-GRPO'):.3f} control={acc(CONTROL):.3f} "
            f"best_baseline={best.replace(' ', '_')}:{rows[best]['accuracy_mean']:.3f} ablations_below_padd={below}/4")


def main() -> None:
    args = parse_args()
    announce(args)
    t_start = time.perf_counter()
    results = run_all(args)  # Stage I per seed and every arm
    wall = time.perf_counter() - t_start
    rows = aggregate(results, args.seeds)
    table = markdown_table(rows, args, wall)
    print("\n" + table + "\n", flush=True)
    write_results(rows, table, args, wall)
    print(f"wrote {args.out}/reproduce_table.{{md,json,png}}; wall time {wall:.0f}s", flush=True)
    print(repro_line(rows), flush=True)


if __name__ == "__main__":
    main()
