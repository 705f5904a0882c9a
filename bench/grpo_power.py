"""Does plain GRPO learn on the toy world, or only move? GRPO against its shuffled-advantage
control at several settings (issue 17, "power first").

Every run is one colocated `train.py` run of recipes/toy_padd.yaml from the base student
(toy://student), Stage I, II and IV off, stage3.policy=grpo; the control arm is the same run
with each rollout batch's advantages permuted across it (stage3.shuffle_advantages): its steps
are as large, its reward information is gone. Both arms of a seed sample the same first rollout
batch, so the seeds pair them. A setting is `PxG@lr/u`: P prompts x G responses per step, the
learning rate, u updates per rollout batch (e.g. 8x4@1e-4/2, the table's). Every run logs
`train/policy_move` (mean |log pi_new - log pi_old| per response token over a step's updates).

Per setting: held-out accuracy (greedy, --eval-problems) of GRPO and the control, seed means with
95% t-intervals, the paired GRPO - control and GRPO - base differences, and the mean policy
move. The setting whose GRPO - control interval has the highest lower bound is reported last:

    POWER best=<setting> grpo=<acc> control=<acc> base=<acc> grpo_minus_control=<d>+-<half> \
        grpo_minus_base=<d>+-<half> policy_move=<m>                                     (one line)

With --eval-every K every run also evaluates every K steps (eval.every): learning curves of
GRPO and the control, seed means against the step and the training wall time, in the JSON and
in <out>/grpo_power.png.

Writes <out>/grpo_power.{md,json} (bench/results/ for a full run, bench/results/quick/ with
--quick; a smoke run never replaces a full result).

Usage: python bench/grpo_power.py [--settings 8x4@1e-4/2 16x8@1e-5/1] [--seeds 0 1 2]
                                  [--steps 30] [--eval-problems 200] [--eval-every 0] [--jobs 2] [--quick]
                                  [--set KEY=VALUE ...] [--toy-profile demo|guess]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_table import RESULTS, t_interval  # noqa: E402
import reproduce_table  # noqa: E402

_SETTING = re.compile(r"^(\d+)x(\d+)@([0-9.eE+-]+)/(\d+)$")


@dataclass(frozen=True)
class Setting:
    prompts: int
    group: int
    lr: float
    updates: int

    @classmethod
    def parse(cls, text: str) -> Setting:
        m = _SETTING.match(text)
        if m is None:
            raise argparse.ArgumentTypeError(f"setting '{text}': expected PxG@lr/u, e.g. 16x8@1e-5/1")
        return cls(int(m[1]), int(m[2]), float(m[3]), int(m[4]))

    def __str__(self) -> str:
        return f"{self.prompts}x{self.group}@{self.lr:g}/{self.updates}"

    def sets(self, steps: int) -> list[str]:
        rows = self.prompts * self.group
        return ["stage1.enabled=false", "stage2.enabled=false", "stage4.enabled=false", "stage3.policy=grpo",
                f"stage3.prompts_per_step={self.prompts}", f"stage3.group_size={self.group}",
                f"train.micro_batch_size={math.gcd(rows, 32)}", f"train.lr={self.lr:g}",
                f"stage3.updates_per_batch={self.updates}", f"train.steps={steps}"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", type=Setting.parse, nargs="+",
                    default=[Setting.parse(s) for s in ("8x4@1e-4/2", "16x8@1e-5/1")])
    reproduce_table.add_run_args(ap, "padd_grpo_power")
    ap.add_argument("--steps", type=int, default=30, help="RL steps per run")
    ap.add_argument("--eval-every", type=int, default=0, help="held-out accuracy every K steps too (0: at the end only)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 steps, 32 problems, the first setting only")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_problems, args.settings = args.seeds[:1], 3, 32, args.settings[:1]
        args.eval_every = min(args.eval_every, args.steps)
    reproduce_table.settle_out(args, "grpo_power", RESULTS)
    return args


def run_pair(args: argparse.Namespace, setting: Setting, seed: int, control: bool) -> dict:
    name = f"{setting} {'control' if control else 'grpo'}"
    out = args.workdir / str(setting).replace("/", "u") / f"seed{seed}_{'control' if control else 'grpo'}"
    first = seed == args.seeds[0] and not control  # the references (teacher, base student): once per setting
    sets = [*setting.sets(args.steps), f"eval.num_problems={args.eval_problems}", "train.log_every=1",
            "stage3.measure_movement=true", f"eval.references={str(first).lower()}", f"eval.every={args.eval_every}",
            f"stage3.shuffle_advantages={str(control).lower()}", *args.overrides]
    return reproduce_table.run_train(name, seed, out, sets, args.reuse)


def paired(a: list[float], b: list[float]) -> tuple[float, float | None]:
    return t_interval([x - y for x, y in zip(a, b)])


def summarize(setting: Setting, runs: dict[tuple[int, bool], dict], seeds: list[int]) -> dict:
    grpo = [runs[(s, False)]["student_after"]["accuracy"] for s in seeds]
    ctrl = [runs[(s, True)]["student_after"]["accuracy"] for s in seeds]
    base = runs[(seeds[0], False)]["student_before"]["accuracy"]
    move = lambda c: [h["train/policy_move"] for s in seeds for h in runs[(s, c)]["history"]]  # noqa: E731
    return {"setting": str(setting), "grpo": grpo, "control": ctrl, "base": base,
            "grpo_mean": t_interval(grpo), "control_mean": t_interval(ctrl),
            "grpo_minus_control": paired(grpo, ctrl), "grpo_minus_base": t_interval([g - base for g in grpo]),
            "policy_move_grpo": sum(move(False)) / len(move(False)),
            "policy_move_control": sum(move(True)) / len(move(True)),
            "seconds": [runs[k]["_seconds"] for k in sorted(runs)],
            "curve_grpo": curve([runs[(s, False)] for s in seeds], base),
            "curve_control": curve([runs[(s, True)] for s in seeds], base)}


def curve(runs: list[dict], base: float) -> list[dict]:
    """The runs' learning curve from step 0 (the base student); empty without --eval-every."""
    points = reproduce_table.learning_curve(runs)
    start = {"step": 0, "accuracy": base, "accuracy_seeds": [base] * len(runs), "elapsed_s": 0.0}
    return [start, *points] if points else []


def figure(rows: list[dict], path: Path) -> Path | None:
    """Held-out accuracy against RL steps, GRPO and control per setting (seed means)."""
    if not any(r["curve_grpo"] for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.4), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], rows):
        for arm, style in (("grpo", "-o"), ("control", "--s")):
            pts = r[f"curve_{arm}"]
            ax.plot([p["step"] for p in pts], [p["accuracy"] for p in pts], style, ms=3, label=arm)
        ax.axhline(r["base"], color="grey", lw=0.8, ls=":", label="base student")
        ax.set_title(r["setting"])
        ax.set_xlabel("RL step")
    axes[0][0].set_ylabel("held-out accuracy (seed mean)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pm(mean_half: tuple[float, float | None]) -> str:
    m, h = mean_half
    return f"{m:+.3f}" + ("" if h is None else f" ± {h:.3f}")


def markdown(rows: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines = [f"GRPO against its shuffled-advantage control, from the base student (toy://student, {args.toy_profile} build): seeds "
             f"{args.seeds}, {args.steps} RL steps, {args.eval_problems} held-out problems (greedy pass@1), "
             f"95% t-intervals over seeds (differences paired by seed); wall time {wall / 60:.1f} min with "
             f"{args.jobs} runs at once." + (f" Overrides: {' '.join(args.overrides)}." if args.overrides else ""), "",
             "| setting (PxG@lr/updates) | base | GRPO | control | GRPO - control | GRPO - base | policy move GRPO / control |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        g, c = r["grpo_mean"], r["control_mean"]
        lines.append(f"| {r['setting']} | {r['base']:.3f} | {g[0]:.3f} | {c[0]:.3f} | {_pm(r['grpo_minus_control'])} "
                     f"| {_pm(r['grpo_minus_base'])} | {r['policy_move_grpo']:.4f} / {r['policy_move_control']:.4f} |")
    return "\n".join(lines)


def power_line(rows: list[dict]) -> str:
    lower = lambda r: r["grpo_minus_control"][0] - (r["grpo_minus_control"][1] or 0.0)  # noqa: E731
    best = max(rows, key=lower)
    d, b = best["grpo_minus_control"], best["grpo_minus_base"]
    half = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    return (f"POWER best={best['setting']} grpo={best['grpo_mean'][0]:.3f} control={best['control_mean'][0]:.3f} "
            f"base={best['base']:.3f} grpo_minus_control={d[0]:+.3f}+-{half(d[1])} "
            f"grpo_minus_base={b[0]:+.3f}+-{half(b[1])} policy_move={best['policy_move_grpo']:.4f}")


def main() -> None:
    args = parse_args()
    print(f"grpo_power: settings {[str(s) for s in args.settings]}, seeds {args.seeds}, {args.steps} steps, "
          f"{args.eval_problems} problems, {args.jobs} runs at once, in {args.workdir}", flush=True)
    results, wall = reproduce_table.run_pool(args.jobs, {(st, s, c): (run_pair, args, st, s, c) for st in args.settings
                                                         for s in args.seeds for c in (False, True)})
    rows = [summarize(st, {(s, c): results[(st, s, c)] for s in args.seeds for c in (False, True)}, args.seeds)
            for st in args.settings]
    table = markdown(rows, args, wall)
    print("\n" + table + "\n", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grpo_power.md").write_text(table + "\n")
    (args.out / "grpo_power.json").write_text(json.dumps(
        {"args": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "settings" else v)
                  for k, v in vars(args).items()}, "wall_seconds": wall, "settings": rows}, indent=2) + "\n")
    figure(rows, args.out / "grpo_power.png")
    print(power_line(rows), flush=True)


if __name__ == "__main__":
    main()
