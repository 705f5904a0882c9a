"""The `padd` command.

    padd demo                         build the toy models, run the 3-process skeleton, print the table
    padd toy build [--profile P]      build (or reuse) the tiny teacher, student and tokenizer
    padd train [--nproc N] [--recipe R] [--set k=v]   launch train.py with the deepspeed launcher
    padd config show [--recipe R] [--set k=v]         the resolved config as YAML
    padd config validate [--recipe R] [--world-size N]
    padd plan [--recipe R] --nodes N [--gpus-per-node G] [--gpu-mem-gb M]   memory/speed plan, fits or not
    padd eval --model PATH --suite toy|gsm8k|math5 [--limit N] [--samples K --temperature T]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

from padd_ds.config import ConfigError, PaddConfig
from padd_ds.models.files import resolve_model_path
from padd_ds.paths import REPO_ROOT
from padd_ds.plan import make_plan, resolve_cluster, slurm_shape
from padd_ds.recipe import dump_yaml, load_config
from padd_ds.toy.resolve import use_toy_build_for
from padd_ds.validate import validate


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_config(args) -> int:
    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.action == "validate":
            use_toy_build_for(cfg)
            validate(cfg, world_size=args.world_size)
            print("config OK")
        else:
            print(dump_yaml(cfg), end="")
    except ConfigError as e:
        print(f"padd-ds: config error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_plan(args) -> int:
    """Exit 0 when the plan fits, 1 when it does not (the report says why and how to fix it),
    2 on a config error."""

    try:
        overrides = list(args.overrides) + ([f"deepspeed.config={args.deepspeed}"] if args.deepspeed else [])
        cfg = load_config(args.recipe, overrides)
        use_toy_build_for(cfg)
        validate(cfg)
        if args.slurm:
            nodes, per_node, world = slurm_shape()
        elif args.nodes is None:
            raise ConfigError("give the cluster: --nodes N [--gpus-per-node G --gpu-mem-gb M], or --slurm inside an allocation")
        else:
            nodes, per_node, world = args.nodes, args.gpus_per_node, args.nodes * args.gpus_per_node
        cluster = resolve_cluster(nodes, per_node, world, args.gpu_mem_gb, args.host_mem_gb, args.gpu_tflops, args.mfu)
        if args.hbm_tbps is not None:
            if args.hbm_tbps <= 0:
                raise ConfigError(f"--hbm-tbps must be > 0, got {args.hbm_tbps}")
            cluster = dataclasses.replace(cluster, hbm_tbps=args.hbm_tbps)
        plan = make_plan(cfg, cluster, args.recipe or "")
    except ConfigError as e:
        print(f"padd-ds: config error: {e}", file=sys.stderr)
        return 2
    print(plan.report())
    return 0 if plan.fits else 1


def cmd_toy(args) -> int:
    from padd_ds.toy.build import build_toy

    toy = build_toy(args.profile, args.cache_dir, args.force)
    print(f"PADD_TOY_DIR={toy.root}")
    return 0


def launch_command(nproc: int, script_args: list[str], port: int | None = None) -> list[str]:
    """The deepspeed launcher command for `nproc` local processes."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(port or _free_port()), str(REPO_ROOT / "train.py"), *script_args]


def cmd_train(args) -> int:
    try:
        cfg = load_config(args.recipe, args.overrides)
        use_toy_build_for(cfg)
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
    from padd_ds.toy.build import build_toy

    toy = build_toy("demo")
    os.environ["PADD_TOY_DIR"] = str(toy.root)
    # A demo always trains from the start; a cluster job resumes (train.resume=auto, the default).
    ns = argparse.Namespace(recipe=str(REPO_ROOT / "recipes" / "toy_cpu.yaml"),
                            overrides=["train.resume=never", *args.overrides], nproc=3)
    return cmd_train(ns)


def cmd_eval(args) -> int:
    """Evaluate an HF checkpoint on a suite: rich table on stdout, full results as JSON."""
    import torch
    from rich.console import Console

    # torch, transformers and the evaluation code load only for this command
    from padd_ds.eval.evaluate import Decoding, evaluate_suite, results_table, save_results
    from padd_ds.models.loading import load_causal_lm, load_tokenizer

    try:
        if args.suite == "toy" or args.model.startswith("toy://"):
            use_toy_build_for(PaddConfig())
        model_path = resolve_model_path(args.model, field_name="--model")
        tok_path = resolve_model_path(args.tokenizer, field_name="--tokenizer", need_config=False) \
            if args.tokenizer else model_path
        if args.samples < 0 or (args.limit is not None and args.limit < 1):
            raise ConfigError("--samples must be >= 0 and --limit >= 1")
        if args.samples and args.temperature <= 0:
            raise ConfigError("--samples needs --temperature > 0 (sampled answers)")
    except ConfigError as e:
        print(f"padd-ds: config error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(min(args.threads, os.cpu_count() or 1))
    tok = load_tokenizer(tok_path)
    model = load_causal_lm(model_path, args.dtype)
    if args.exact_routing:
        from padd_ds.models.export import EXACT_ROUTING_FILE, load_exact_routing

        if not (Path(model_path) / EXACT_ROUTING_FILE).exists():
            print(f"padd-ds: --exact-routing: {model_path} has no {EXACT_ROUTING_FILE} (no folded Stage IV bias), "
                  "so it already routes as trained", file=sys.stderr)
        load_exact_routing(model, model_path)
    decoding = Decoding(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples=args.samples,
                        temperature=args.temperature, top_p=args.top_p, prompt_style=args.prompt, seed=args.seed)
    res = evaluate_suite(model, tok, args.suite, decoding, limit=args.limit)
    res["model"] = model_path
    res["exact_routing"] = bool(args.exact_routing)
    first = next(model.parameters())
    res["device"], res["dtype"] = str(first.device), str(first.dtype).removeprefix("torch.")
    if args.output:
        out = Path(args.output)
    elif Path(model_path).is_dir() and not args.model.startswith("toy://"):  # keep the toy cache clean
        out = Path(model_path) / f"eval_{args.suite}{'_exact' if args.exact_routing else ''}.json"
    else:
        out = Path("runs/eval") / f"{Path(model_path).name}_{args.suite}.json"
    save_results(res, out)
    Console().print(results_table(res))
    print(f"results: {out} ({res['seconds']:.0f} s)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="padd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("config", help="show or validate the resolved config")
    c.add_argument("action", choices=["show", "validate"])
    c.add_argument("--world-size", type=int, default=None)
    _add_recipe_args(c)
    c.set_defaults(fn=cmd_config)

    pl = sub.add_parser("plan", help="per-GPU memory, divisibility and speed of a recipe on a cluster")
    _add_recipe_args(pl)
    pl.add_argument("--deepspeed", default=None, metavar="JSON", help="DeepSpeed config; overrides deepspeed.config")
    pl.add_argument("--nodes", type=int, default=None)
    pl.add_argument("--gpus-per-node", type=int, default=8)
    pl.add_argument("--gpu-mem-gb", type=float, default=None,
                    help="memory per GPU in GB (default: measure this host's GPU, else plan for its CPU)")
    pl.add_argument("--host-mem-gb", type=float, default=None, help="RAM per node in GB (default: not checked)")
    pl.add_argument("--gpu-tflops", type=float, default=None, help="peak dense bf16 TFLOPs per GPU (default 989, H100)")
    pl.add_argument("--mfu", type=float, default=None, help="model-FLOPs utilization for the speed estimate (default 0.30)")
    pl.add_argument("--hbm-tbps", type=float, default=None,
                    help="GPU memory bandwidth in TB/s for the rollout decode model (default: H100 SXM 3.35, H200 4.8 "
                         "above 100 GB)")
    pl.add_argument("--slurm", action="store_true", help="take nodes and tasks per node from this SLURM allocation")
    pl.set_defaults(fn=cmd_plan)

    t = sub.add_parser("toy", help="the built-in toy models")
    t.add_argument("action", choices=["build"])
    t.add_argument("--profile", default="demo", choices=["demo", "test", "guess"],
                   help="guess: the demo build whose student then learns to guess half its answers without working")
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

    e = sub.add_parser("eval", help="pass@1 / avg@k of an HF checkpoint on a benchmark suite")
    e.add_argument("--model", required=True, help="HF model directory, hub id or toy://student")
    e.add_argument("--tokenizer", default=None, help="default: the model's")
    e.add_argument("--suite", default="toy", choices=["toy", "gsm8k", "math5"],
                   help="math5: AIME24, AMC23, MATH500, Minerva, OlympiadBench")
    e.add_argument("--limit", "--num-problems", dest="limit", type=int, default=None,
                   help="first N problems of each benchmark (default: all)")
    e.add_argument("--samples", type=int, default=0, help="K > 0: also K sampled answers each (avg@K, pass@K)")
    e.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (with --samples)")
    e.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (with --samples)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default per suite: toy 128, gsm8k 512, math5 2048")
    e.add_argument("--batch-size", type=int, default=32, help="sequences generated together")
    e.add_argument("--prompt", default="auto", choices=["auto", "chat", "plain"],
                   help="auto: the chat template when the tokenizer has one")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--exact-routing", action="store_true",
                   help="a padd-ds export with a folded Stage IV bias: route exactly as the trained engine "
                        "(padd_routing.safetensors) instead of the fold")
    e.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    e.add_argument("--output", default=None, help="results JSON (default: MODEL/eval_SUITE.json)")
    e.set_defaults(fn=cmd_eval)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
