"""Stage III where routes move (issue 17): GRPO, PR-GRPO and routing replay when the routers
learn much faster than the rest of the student.

At the table's setting router drift is ~5e-4 per step, so PR-GRPO's damping exp(-lambda Gamma)
is ~1 and it cannot differ from GRPO. Here the routers get their own, larger learning rate
(train.router_lr_scale), so the routes move between steps and, with 2 updates per rollout batch,
between the sampling forward and the second update.

Every run is one colocated `train.py` run of recipes/toy_padd.yaml from the base student
(toy://student), Stages I, II and IV off (nothing but Stage III acts, and no balancing bias
hides a routing collapse), 8 prompts x G=4 per step, train.lr=--lr, 2 updates per batch.

  GRPO (routers 1x)      train.router_lr_scale=1: the routes barely move (the reference)
  GRPO                   stage3.policy=grpo, routers at --router-lr-scale x the rate
  PR-GRPO                stage3.policy=pr_grpo, the recipe's lambda (stage3.drift_penalty=1)
  PR-GRPO (lambda 10)    a damping ten times stronger: does the mechanism act at all?
  GRPO + routing replay  rollout.route_replay=true: every update routes each token through the
                         experts the sampler chose

Per arm: held-out accuracy (greedy, --eval-problems; seed means, 95% t-intervals, the
difference to GRPO paired by seed), router drift (routing/drift_mean, mean over steps after the first), the
expert load CV at the end and its maximum over steps (a routing collapse raises it), the
policy move per update, the clip fraction and rollout accuracy first -> last. The last line:

    ROUTES scale=<s> grpo=<acc> pr_grpo=<acc> pr_grpo_l10=<acc> replay=<acc> grpo_1x=<acc> drift=<grpo's mean drift>

Writes <out>/stage3_routes.{md,json}: bench/results/stage3_routes_x<scale>/ for a full run,
bench/results/quick/ with --quick (a smoke run never replaces a full result).

Usage: python bench/stage3_routes.py [--router-lr-scale 1000] [--lr 1e-5] [--seeds 0 1 2] [--steps 20]
                                     [--eval-problems 200] [--jobs 2] [--quick] [--workdir DIR] [--reuse]
                                     [--set KEY=VALUE ...] [--toy-profile demo|guess]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_table import RESULTS, mean_of, run_train, t_interval  # noqa: E402
import reproduce_table  # noqa: E402

ARMS = {  # name -> overrides on top of the common ones; the first is the reference
    "GRPO (routers 1x)": ["stage3.policy=grpo", "train.router_lr_scale=1"],
    "GRPO": ["stage3.policy=grpo"],
    "PR-GRPO": ["stage3.policy=pr_grpo", "stage3.drift_penalty=1"],
    "PR-GRPO (lambda 10)": ["stage3.policy=pr_grpo", "stage3.drift_penalty=10"],
    "GRPO + routing replay": ["stage3.policy=grpo", "rollout.route_replay=true"],
}
KEYS = {"GRPO (routers 1x)": "grpo_1x", "GRPO": "grpo", "PR-GRPO": "pr_grpo", "PR-GRPO (lambda 10)": "pr_grpo_l10",
        "GRPO + routing replay": "replay"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--router-lr-scale", type=float, default=1000.0, help="train.router_lr_scale of the moving arms")
    ap.add_argument("--lr", type=float, default=1e-5, help="train.lr of every arm")
    reproduce_table.add_run_args(ap, "padd_stage3_routes")
    ap.add_argument("--steps", type=int, default=20, help="RL steps per run")
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 steps, 32 problems")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_problems = args.seeds[:1], 3, 32
    reproduce_table.settle_out(args, "stage3_routes", RESULTS / f"stage3_routes_x{args.router_lr_scale:g}")
    return args


def run_one(args: argparse.Namespace, name: str, seed: int) -> dict:
    out = args.workdir / f"seed{seed}" / KEYS[name]
    first = seed == args.seeds[0] and name == "GRPO"  # the base student's accuracy: once
    sets = ["stage1.enabled=false", "stage2.enabled=false", "stage4.enabled=false", f"train.lr={args.lr:g}",
            f"train.router_lr_scale={args.router_lr_scale:g}", "stage3.updates_per_batch=2",
            f"train.steps={args.steps}", "train.log_every=1", f"eval.num_problems={args.eval_problems}",
            f"eval.references={str(first).lower()}", *ARMS[name], *args.overrides]
    return run_train(name, seed, out, sets, args.reuse)


def summarize(name: str, runs: list[dict], grpo: list[float]) -> dict:
    acc = [r["student_after"]["accuracy"] for r in runs]
    rows = [h for r in runs for h in r["history"]]
    col = lambda key, hs=rows: [h[key] for h in hs if h.get(key) is not None]  # noqa: E731
    moved = [h for r in runs for h in r["history"][1:]]  # a run's first step has no earlier routers: drift 0
    return {"accuracy_per_seed": acc, "accuracy": t_interval(acc),
            "minus_grpo": t_interval([a - g for a, g in zip(acc, grpo)]),
            "drift_mean": mean_of(col("routing/drift_mean", moved)), "drift_p95": mean_of(col("routing/drift_p95", moved)),
            "load_cv_last": mean_of([r["history"][-1]["routing/load_cv"] for r in runs]),
            "load_cv_max": mean_of([max(h["routing/load_cv"] for h in r["history"]) for r in runs]),
            "policy_move": mean_of(col("train/policy_move")), "clip_frac": mean_of(col("train/clip_frac")),
            "route_agreement": mean_of(col("rollout/route_agreement")),
            "rollout_acc_first": mean_of([r["history"][0]["train/accuracy"] for r in runs]),
            "rollout_acc_last": mean_of([r["history"][-1]["train/accuracy"] for r in runs]),
            "seconds_per_seed": [r["_seconds"] for r in runs]}


def _pm(mean_half: tuple[float, float | None], sign: str = "") -> str:
    m, h = mean_half
    return f"{m:{sign}.3f}" + ("" if h is None else f" ± {h:.3f}")


def markdown(rows: dict[str, dict], base: float, args: argparse.Namespace, wall: float) -> str:
    lines = [f"Stage III with moving routes, from the base student (toy://student, {args.toy_profile} build, held-out {base:.3f}): 8 prompts x "
             f"G=4, lr {args.lr:g}, routers at {args.router_lr_scale:g}x (train.router_lr_scale) except the first "
             f"row, 2 updates per rollout batch, {args.steps} steps, Stages I, II, IV off; seeds {args.seeds}, "
             f"{args.eval_problems} held-out problems (greedy pass@1), 95% t-intervals over seeds, differences "
             f"paired by seed; drift and policy move: means over steps and seeds; wall time {wall / 60:.1f} min "
             f"with {args.jobs} runs at once." + (f" Overrides: {' '.join(args.overrides)}." if args.overrides else ""), "",
             "| arm | accuracy | per seed | - GRPO | router drift (mean / p95) | load CV last (max) | policy move "
             "| clip frac | rollout acc first -> last |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {_pm(r['accuracy'])} | {', '.join(f'{a:.3f}' for a in r['accuracy_per_seed'])} "
                     f"| {_pm(r['minus_grpo'], '+')} | {r['drift_mean']:.4f} / {r['drift_p95']:.4f} "
                     f"| {r['load_cv_last']:.3f} ({r['load_cv_max']:.3f}) | {r['policy_move']:.4f} "
                     f"| {r['clip_frac']:.4f} | {r['rollout_acc_first']:.3f} -> {r['rollout_acc_last']:.3f} |")
    return "\n".join(lines)


def routes_line(rows: dict[str, dict], scale: float) -> str:
    accs = " ".join(f"{KEYS[n]}={r['accuracy'][0]:.3f}" for n, r in rows.items())
    return f"ROUTES scale={scale:g} {accs} drift={rows['GRPO']['drift_mean']:.4f}"


def main() -> None:
    args = parse_args()
    print(f"stage3_routes: routers at {args.router_lr_scale:g}x lr {args.lr:g}, seeds {args.seeds}, {args.steps} "
          f"steps, {args.eval_problems} problems, {args.jobs} runs at once, in {args.workdir}", flush=True)
    results, wall = reproduce_table.run_pool(args.jobs, {(n, s): (run_one, args, n, s) for s in args.seeds for n in ARMS})
    base = results[("GRPO", args.seeds[0])]["student_before"]["accuracy"]
    grpo = [results[("GRPO", s)]["student_after"]["accuracy"] for s in args.seeds]
    rows = {n: summarize(n, [results[(n, s)] for s in args.seeds], grpo) for n in ARMS}
    table = markdown(rows, base, args, wall)
    print("\n" + table + "\n", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stage3_routes.md").write_text(table + "\n")
    (args.out / "stage3_routes.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "base": base,
         "wall_seconds": wall, "arms": rows}, indent=2) + "\n")
    print(routes_line(rows, args.router_lr_scale), flush=True)


if __name__ == "__main__":
    main()
