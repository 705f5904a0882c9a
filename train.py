#!/usr/bin/env python
"""Entry point for every launcher; it only parses and dispatches.

    deepspeed --num_gpus 3 train.py --deepspeed ds_configs/zero3.json --recipe recipes/toy_cpu.yaml
    torchrun --nproc_per_node 3 train.py --recipe recipes/toy_cpu.yaml --set train.steps=50
    srun python train.py --recipe recipes/qwen25math7b_to_qwen3_30b_a3b.yaml   (via slurm/*.sbatch)
    python train.py --set topology.colocated=true      (one process: teacher and student together)
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="YAML recipe (default: built-in toy defaults)")
    p.add_argument("--deepspeed", default=None, metavar="JSON", help="DeepSpeed config; overrides deepspeed.config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    from padd_ds.launch import signals

    signals.install()  # SIGUSR1/SIGTERM: checkpoint after the current step and exit 0 (never lost while loading)
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from padd_ds.config import ConfigError
    from padd_ds.launch.roles import detect_launch
    from padd_ds.plan import plan_for_launch
    from padd_ds.recipe import load_config
    from padd_ds.toy.resolve import use_toy_build_for
    from padd_ds.validate import validate

    overrides = list(args.overrides) + ([f"deepspeed.config={args.deepspeed}"] if args.deepspeed else [])
    try:
        cfg = load_config(args.recipe, overrides)
        use_toy_build_for(cfg)
        env = detect_launch()
        validate(cfg, world_size=env.world_size)  # everything checkable before a process group
        # Memory plan of this launch on this device (GPU memory, or on CPU this host's RAM
        # shared by its ranks): refuse now rather than die out of memory after the load.
        plan = plan_for_launch(cfg, env)
        if env.rank == 0:
            print(plan.brief() if plan else "padd-ds plan: skipped (cannot read this device's memory)", flush=True)
        if plan is not None and not plan.fits:
            raise ConfigError(plan.refusal())
    except (ConfigError, ValueError) as e:
        print(f"padd-ds: config error: {e}", file=sys.stderr)
        sys.exit(2)

    from padd_ds.launch.world import run_guarded, setup_world
    from padd_ds.pipeline.run import run

    run_guarded(lambda world: run(cfg, world), lambda: setup_world(cfg, env))


if __name__ == "__main__":
    main()
