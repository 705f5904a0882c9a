"""The `padd` command.

    padd demo                         build the toy world, run the 3-process skeleton, print the table
    padd toy build [--profile P]      build (or reuse) the tiny teacher, student and tokenizer
    padd train [--nproc N] [--recipe R] [--set k=v]   launch train.py with the deepspeed launcher
    padd config show [--recipe R] [--set k=v]         the resolved config as YAML
    padd config validate [--recipe R] [--world-size N]
    padd eval --model PATH [--suite toy]              greedy pass@1 of an HF checkpoint
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_config(args) -> int:
    from padd_ds.config import ConfigError, dump_yaml, load_config, validate
    from padd_ds.toy.resolve import use_toy_world_for

    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.action == "validate":
            use_toy_world_for(cfg)
            validate(cfg, world_size=args.world_size)
            print("config OK")
        else:
            print(dump_yaml(cfg), end="")
    except ConfigError as e:
        print(f"padd-ds: config error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_toy(args) -> int:
    from padd_ds.toy.build import build_toy_world

    world = build_toy_world(args.profile, args.cache_dir, args.force)
    print(f"PADD_TOY_DIR={world.root}")
    return 0


def launch_command(nproc: int, script_args: list[str], port: int | None = None) -> list[str]:
    """The deepspeed launcher command for `nproc` local processes."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(port or _free_port()), str(REPO_ROOT / "train.py"), *script_args]


def cmd_train(args) -> int:
    from padd_ds.config import ConfigError, load_config, validate
    from padd_ds.toy.resolve import use_toy_world_for

    try:
        cfg = load_config(args.recipe, args.overrides)
        use_toy_world_for(cfg)
        nproc = args.nproc or (1 if cfg.topology.colocated else cfg.topology.teacher_ranks + 2)
        validate(cfg, world_size=nproc)
    except ConfigError as e:
        print(f"padd-ds: config error: {e}", file=sys.stderr)
        return 2
    script_args = (["--recipe", args.recipe] if args.recipe else []) + \
        [a for o in args.overrides for a in ("--set", o)]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    env.setdefault("OMP_NUM_THREADS", "1")
    if nproc == 1:
        cmd = [sys.executable, str(REPO_ROOT / "train.py"), *script_args]
    else:
        cmd = launch_command(nproc, script_args)
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_demo(args) -> int:
    from padd_ds.toy.build import build_toy_world

    world = build_toy_world("demo")
    os.environ["PADD_TOY_DIR"] = str(world.root)
    ns = argparse.Namespace(recipe=str(REPO_ROOT / "recipes" / "toy_cpu.yaml"), overrides=args.overrides, nproc=3)
    return cmd_train(ns)


def cmd_eval(args) -> int:
    import torch

    from padd_ds.data.math import load_heldout_problems
    from padd_ds.eval.evaluate import evaluate_problems
    from padd_ds.models.loading import load_causal_lm, load_tokenizer
    from padd_ds.toy.resolve import use_toy_world_for

    if args.suite != "toy":
        print(f"padd-ds: --suite {args.suite} is not available yet; use --suite toy", file=sys.stderr)
        return 2
    from padd_ds.config import PaddConfig

    use_toy_world_for(PaddConfig())
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model, "float32")
    res = evaluate_problems(model, tok, load_heldout_problems("toy", limit=args.num_problems),
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(f"suite=toy n={res['n']} accuracy={res['accuracy']:.4f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="padd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("config", help="show or validate the resolved config")
    c.add_argument("action", choices=["show", "validate"])
    c.add_argument("--world-size", type=int, default=None)
    _add_recipe_args(c)
    c.set_defaults(fn=cmd_config)

    t = sub.add_parser("toy", help="the built-in toy world")
    t.add_argument("action", choices=["build"])
    t.add_argument("--profile", default="demo", choices=["demo", "test"])
    t.add_argument("--cache-dir", default=None)
    t.add_argument("--force", action="store_true")
    t.set_defaults(fn=cmd_toy)

    tr = sub.add_parser("train", help="launch train.py with the deepspeed launcher")
    tr.add_argument("--nproc", type=int, default=None, help="processes (default: teacher_ranks + 2)")
    _add_recipe_args(tr)
    tr.set_defaults(fn=cmd_train)

    d = sub.add_parser("demo", help="toy build + 3-process distillation + accuracy table")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("eval", help="greedy pass@1 of an HF checkpoint")
    e.add_argument("--model", required=True)
    e.add_argument("--suite", default="toy", choices=["toy", "gsm8k", "math5"])
    e.add_argument("--num-problems", type=int, default=200)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=64)
    e.set_defaults(fn=cmd_eval)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
