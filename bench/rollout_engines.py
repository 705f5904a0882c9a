"""Rollout engines side by side: generated tokens/s of each rollout backend, and how closely each
copy's log-probs and routes match the trainer's after an optimizer step and a weight sync (issue 16).

    python bench/rollout_engines.py [--quick] [--build demo|test] [--phases 5] [--no-vllm]

The bench launches itself as a 2-rank DeepSpeed job (the deepspeed launcher; DS_ACCELERATOR=cpu
and gloo on a host without CUDA, NCCL and one GPU per rank otherwise, as the trainer picks them):
the toy student under ZeRO-3 + AutoEP (EP 2), with a non-zero Stage IV bias on every router
(large enough to change routes). Each rank samples its own prompts; every backend gets the same
prompts, the same G and the same token budget.

1. Throughput. For each backend in (hf, hf_gathered, vllm), one rollout phase as the trainer runs
   it (`rollout_policy` + `sample_rollouts`; the phase includes hf_gathered's gather and free and
   vllm's weight sync; the first vllm phase starts the engine) as warm-up, then `--phases` timed
   phases, the backends alternating. Per phase: the generated tokens of both ranks (sampled
   response tokens, EOS included) over the slowest rank's wall time; the median is reported.
   vllm needs the vLLM environment (`make vllm`) and, on CPU, a head_dim of at least 32 (the
   demo toy; the test toy's is 16): otherwise it is left out and the line says why.
2. Weight sync. One optimizer step (`rl.step.update_on_rollouts`, PR-GRPO on rewarded rollouts,
   no teacher; seeded advantages if every group's rewards tie) changes the student; then a phase
   of each copy backend (hf_gathered, vllm) samples from the new weights, and its recorded
   log-probs are compared with the trainer engine's `token_logprobs` (fp32) of the same rows on
   the loss-mask positions: the max |difference| over both ranks. On the same rows,
   route_agreement: the share of (token, layer) pairs on the loss mask whose experts the copy
   chose equal the trainer's own top-k (`rl.routes.route_agreement`); hf_gathered records its
   routes while sampling, vLLM's are read by one prefill of each sampled sequence.

Last line (the worst backend's difference and agreement):

    ROLLOUT hf_tok_s=<x> gathered_tok_s=<y> vllm_tok_s=<z|n/a> logprob_max_abs_diff=<d> \
        route_agreement=<r> gathered_over_hf=<y/x> [vllm_over_hf=<z/x>]            (one line)

Targets (issue 16): d <= 1e-3, route_agreement >= 0.999, both copies faster than hf.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BACKENDS = ("hf", "hf_gathered", "vllm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (about a minute on 2 CPU cores)")
    ap.add_argument("--build", choices=("demo", "test"), default=None,
                    help="toy build (default: PADD_TOY_DIR, else the demo build if it is built, else test)")
    ap.add_argument("--phases", type=int, default=5, help="timed rollout phases per backend (after 1 warm-up)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per rank")
    ap.add_argument("--group-size", type=int, default=4, help="G responses per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="token budget per response")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the student's dtype")
    ap.add_argument("--no-vllm", action="store_true", help="leave the vllm backend out")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: a rank of the launched job
    ap.add_argument("--backends", default=None, help=argparse.SUPPRESS)  # internal: what the ranks run
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args = ap.parse_args(argv)
    if args.quick:
        args.phases, args.prompts, args.group_size, args.max_new_tokens = 2, 2, 2, 16
    return args


# ---------------------------------------------------------------- the launching process

def toy_dir(build: str | None) -> str:
    """The toy build the ranks load: PADD_TOY_DIR, the requested profile, or demo if built, else test."""
    from padd_ds.toy.build import ToyBuildConfig, build_root, build_toy, is_built

    if build is None and os.environ.get("PADD_TOY_DIR"):
        return os.environ["PADD_TOY_DIR"]
    if build is None:
        build = "demo" if is_built(build_root(ToyBuildConfig.for_profile("demo"))) else "test"
    return str(build_toy(build).root)  # cached: returns at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_problem(args: argparse.Namespace, toy: str) -> str | None:
    """Why the vllm backend cannot run here (None: it can)."""
    import torch

    from padd_ds.vllm_engine.client import vllm_environment_problem

    if args.no_vllm:
        return "--no-vllm"
    head_dim = json.loads((Path(toy) / "student" / "config.json").read_text()).get("head_dim")
    if not torch.cuda.is_available() and head_dim is not None and head_dim < 32:
        return f"the toy student's head_dim {head_dim} is below vLLM's CPU attention minimum (32): use --build demo"
    return vllm_environment_problem(None)


def launch(args: argparse.Namespace) -> dict:
    """Run this script as 2 DeepSpeed ranks; rank 0's summary."""
    import torch

    env = {**os.environ, "PADD_TOY_DIR": toy_dir(args.build), "PYTHONUNBUFFERED": "1"}
    skip = vllm_problem(args, env["PADD_TOY_DIR"])
    backends = [b for b in BACKENDS if b != "vllm" or skip is None]
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    print(f"toy build: {env['PADD_TOY_DIR']}", flush=True)
    passed = [f"--phases={args.phases}", f"--prompts={args.prompts}", f"--group-size={args.group_size}",
              f"--max-new-tokens={args.max_new_tokens}", f"--dtype={args.dtype}", f"--backends={','.join(backends)}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), str(Path(__file__).resolve()), *passed, f"--worker={out}"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if p.returncode != 0 or not out.is_file():
            raise SystemExit(f"the 2-rank job failed (exit {p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
        return {**json.loads(out.read_text()), "vllm_skipped": skip}


def report(args: argparse.Namespace, s: dict) -> None:
    rows = 2 * args.prompts * args.group_size
    print(f"{s['device']} x2 ranks, ZeRO-3 + AutoEP (EP 2), {args.dtype}; {rows} rollouts per phase "
          f"({args.prompts} prompts x G={args.group_size} per rank), up to {args.max_new_tokens} new tokens each; "
          f"median of {args.phases} phases after 1 warm-up, backends alternating")
    setup = {"hf_gathered": "gather + free", "vllm": "weight sync"}
    for b, ph in s["phases"].items():
        print(f"  {b:12s} tok/s per phase {[round(x, 1) for x in ph['tok_s']]}  tokens {ph['tokens']}  "
              f"seconds {[round(x, 3) for x in ph['seconds']]}" + (
                  f"  ({setup[b]} {statistics.median(ph['setup_s']):.3f} s)" if b in setup else ""))
    if s["vllm_skipped"]:
        print(f"  vllm         not run: {s['vllm_skipped']}")
    adv = (f"{s['step_rewarded_rows']} of {rows} rows with a non-zero group-relative advantage"
           if s["step_rewarded_rows"] else "every group's rewards tied, so seeded N(0, 1) advantages")
    print(f"Stage IV bias: |b| max {s['bias_max']:.3f}; optimizer step (update_on_rollouts, lr {s['lr']:g}): {adv}; "
          f"trainer log-probs moved by max {s['step_moved']:.4g} on its rollout batch")
    for b, m in s["synced"].items():
        print(f"after the step: {b} phase of {m['sync_tokens']} tokens, |log pi_rollout - log pi_trainer| "
              f"max {m['logprob_max_abs_diff']:.3g}, mean {m['logprob_mean_abs_diff']:.3g}; route agreement "
              f"(rollout engine's experts = trainer's top-k) {m['route_agree']:.0f} of {m['route_pairs']:.0f} "
              f"(token, layer) pairs on the loss mask")
    worst_d = max(m["logprob_max_abs_diff"] for m in s["synced"].values())
    worst_r = min(m["route_agreement"] for m in s["synced"].values())
    hf, ga, vl = s["tok_s"]["hf"], s["tok_s"]["hf_gathered"], s["tok_s"].get("vllm")
    print("ROLLOUT " + f"hf_tok_s={hf:.1f} gathered_tok_s={ga:.1f} vllm_tok_s=" + ("n/a" if vl is None else f"{vl:.1f}")
          + f" logprob_max_abs_diff={worst_d:.3e} route_agreement={worst_r:.6f} gathered_over_hf={ga / hf:.3f}"
          + ("" if vl is None else f" vllm_over_hf={vl / hf:.3f}"))


# ---------------------------------------------------------------- a rank of the launched job

def setup(args: argparse.Namespace):
    """This rank's device and process group (as the trainer picks them), the ZeRO-3 + AutoEP
    engine with a Stage IV bias, the tokenizer, this rank's problems and the config."""
    import deepspeed
    import torch

    from padd_ds.launch.device import check_ranks_fit_devices, on_gpu, use_local_device
    from padd_ds.launch.world import release_shm_names

    use_local_device(int(os.environ["LOCAL_RANK"]))
    if on_gpu():
        from deepspeed.accelerator import get_accelerator

        check_ranks_fit_devices(2, get_accelerator().device_count(), "student")
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo")
    release_shm_names()
    import deepspeed.comm as dist

    from padd_ds.data.math import load_train_problems
    from padd_ds.engine.build import initialize_engine
    from padd_ds.models.files import model_paths
    from padd_ds.models.loading import load_causal_lm, load_tokenizer
    from padd_ds.models.router import routers
    from padd_ds.recipe import load_config
    from padd_ds.toy.resolve import use_toy_build_for

    P, G = args.prompts, args.group_size
    cfg = load_config(str(REPO / "recipes" / "toy_cpu.yaml"),
                      ["train.mode=padd", f"models.dtype={args.dtype}", "deepspeed.expert_parallel_size=2",
                       f"stage3.group_size={G}", f"stage3.prompts_per_step={2 * P}", f"train.micro_batch_size={P * G}"])
    use_toy_build_for(cfg)
    _, student_path, tok_path = model_paths(cfg)
    torch.manual_seed(0)
    engine, _ = initialize_engine(cfg, load_causal_lm(student_path, args.dtype), 2)
    gen = torch.Generator().manual_seed(3)
    for r in routers(engine.module):  # the same bias on both ranks; scores sum to 1, so 0.3 moves routes
        r.padd_bias.copy_(0.3 * torch.randn(r.padd_bias.shape, generator=gen))
    rank = dist.get_rank()
    problems = load_train_problems("toy")[rank * P:(rank + 1) * P]
    return cfg, engine, load_tokenizer(tok_path), problems


def rollout_phase(engine, tok, problems, sampling, backend: str, seed: int, policy=None):
    """One rollout phase as the trainer runs it; (rollouts, seconds, seconds spent entering and
    leaving the backend's context: the gather and free for hf_gathered)."""
    import torch

    from padd_ds.launch.device import rank_device
    from padd_ds.rl.rollout import rollout_policy, sample_rollouts

    def sync():
        if rank_device().type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(seed)  # the same draws for every backend (synced_gpus samples nothing once finished)
    sync()
    t0 = time.perf_counter()
    with rollout_policy(engine, backend, 2, policy) as (model, synced):
        sync()
        t1 = time.perf_counter()
        ro = sample_rollouts(model, tok, problems, sampling, synced)
        sync()
        t2 = time.perf_counter()
    sync()
    t3 = time.perf_counter()
    return ro, t3 - t0, (t1 - t0) + (t3 - t2)


def throughput(args, engine, tok, problems, sampling, backends, policy) -> dict:
    """Per backend: tokens, seconds and tokens/s of both ranks per timed phase."""
    import deepspeed.comm as dist

    from padd_ds.launch.comm import all_max, all_sum

    rank = dist.get_rank()
    out = {b: {"tokens": [], "seconds": [], "tok_s": [], "setup_s": []} for b in backends}
    for i in range(args.phases + 1):
        order = backends if i % 2 == 0 else backends[::-1]
        for b in order:
            ro, sec, setup_s = rollout_phase(engine, tok, problems, sampling, b, 1000 * i + rank, policy)
            (tokens,) = all_sum([float(ro.response_lengths.sum())])
            sec, setup_s = all_max([sec, setup_s])
            if i == 0:
                continue  # warm-up
            for key, v in (("tokens", int(tokens)), ("seconds", sec), ("tok_s", tokens / sec), ("setup_s", setup_s)):
                out[b][key].append(v)
    return out


def trainer_view(engine, batch, routes=None):
    """The trainer engine's fp32 log-probs of the sampled tokens of `batch` (collective forward),
    and with `routes` (the rollout engine's), (agreeing, compared) (token, layer) route pairs."""
    import torch

    from padd_ds.launch.device import rank_device
    from padd_ds.models.router import routing_trace
    from padd_ds.rl.rollout import token_logprobs
    from padd_ds.rl.routes import route_agreement

    mb = batch.to(rank_device())
    with torch.no_grad(), routing_trace(engine.module) as trace:
        logits = engine(input_ids=mb.ids, attention_mask=mb.attention_mask).logits
        agree = (0.0, 0) if routes is None else route_agreement(trace.own(), routes, mb.loss_mask)
    return token_logprobs(logits.float(), mb).cpu(), agree


def step_then_sync(cfg, engine, tok, problems, sampling, backends, policy) -> dict:
    """One optimizer step on a rollout batch, then a phase of each copy backend (hf_gathered,
    vllm) on the new weights: its recorded log-probs and routes against the trainer's, over
    both ranks."""
    import deepspeed.comm as dist
    import torch

    from padd_ds.launch.comm import all_max, all_sum
    from padd_ds.models.router import router_weights
    from padd_ds.rl.rewards import group_advantages, reward
    from padd_ds.rl.rollout import RolloutBatch
    from padd_ds.rl.step import update_on_rollouts

    G, rank = sampling.group_size, dist.get_rank()
    ro, _, _ = rollout_phase(engine, tok, problems, sampling, "hf_gathered", seed=7 + rank)
    rewards = torch.tensor([reward(r, problems[i // G]["answer"], cfg.stage3)[0] for i, r in enumerate(ro.responses)])
    adv = group_advantages(rewards.view(-1, G))[0].reshape(-1)
    (rewarded,) = all_sum([float((adv != 0).sum())])
    if rewarded == 0:  # every group tied (small G): seeded advantages, so that the step moves the weights
        adv = torch.randn(adv.shape, generator=torch.Generator().manual_seed(5 + rank))
    before, _ = trainer_view(engine, ro.batch)
    update_on_rollouts(engine, RolloutBatch(ro, rewards.view(-1, G), adv), router_weights(engine.module), cfg)
    engine.eval()
    (moved,) = all_max([float((trainer_view(engine, ro.batch)[0] - before).abs().max())])
    synced = {b: compare_after_sync(engine, tok, problems, sampling, b, 11 + rank, policy)
              for b in backends if b != "hf"}
    return {"step_moved": moved, "step_rewarded_rows": int(rewarded), "synced": synced}


def compare_after_sync(engine, tok, problems, sampling, backend: str, seed: int, policy) -> dict:
    """One phase of `backend` on the engine's current weights: |log-prob difference| and route
    agreement against the trainer over both ranks. vLLM's routes are read by a prefill of each
    sampled sequence (the server's `routes` op)."""
    from padd_ds.launch.comm import all_max, all_sum

    synced, _, _ = rollout_phase(engine, tok, problems, sampling, backend, seed, policy)
    mask = synced.batch.loss_mask
    routes = synced.routes if backend != "vllm" else vllm_routes(policy, synced.batch)
    if routes is None:
        raise RuntimeError(f"the {backend} rollouts carry no routes (Rollouts.routes): routers not recognised")
    logp, (agree, pairs) = trainer_view(engine, synced.batch, routes)
    diff = (logp - synced.logprobs)[mask].abs()
    n, total, tokens, agree, pairs = all_sum([float(diff.numel()), float(diff.sum()),
                                              float(synced.response_lengths.sum()), agree, float(pairs)])
    (dmax,) = all_max([float(diff.max()) if diff.numel() else 0.0])
    return {"logprob_max_abs_diff": dmax, "logprob_mean_abs_diff": total / max(n, 1.0), "sync_tokens": int(tokens),
            "route_agree": agree, "route_pairs": pairs, "route_agreement": agree / max(pairs, 1.0)}


def vllm_routes(policy, batch):
    """[B, L, layers, k] the experts vLLM routes each position of `batch` to (-1 past its length)."""
    import torch

    seqs = [batch.ids[i, :n].tolist() for i, n in enumerate(batch.lengths.tolist())]
    got = policy.routes(seqs)  # [seq][layer][token][k]
    layers, k = len(got[0]), len(got[0][0][0])
    out = torch.full((*batch.ids.shape, layers, k), -1, dtype=torch.int16)
    for i, per_layer in enumerate(got):
        out[i, :len(seqs[i])] = torch.tensor(per_layer, dtype=torch.int16).permute(1, 0, 2)
    return out


def worker(args: argparse.Namespace) -> None:
    import deepspeed.comm as dist

    from padd_ds.launch.device import rank_device
    from padd_ds.launch.world import leave
    from padd_ds.models.router import routers
    from padd_ds.rl.rollout import RolloutSampling

    cfg, engine, tok, problems = setup(args)
    engine.eval()
    backends = tuple(args.backends.split(","))
    policy = None
    if "vllm" in backends:
        from padd_ds.rl.vllm_policy import VllmPolicy, engine_spec

        dtype = next(engine.module.parameters()).dtype
        policy = VllmPolicy(engine_spec(cfg, 2, dtype), dist.get_rank(), 2, Path(args.worker).parent)
    sampling = RolloutSampling(args.group_size, 1.0, 1.0, args.max_new_tokens, cfg.data.max_prompt_tokens)
    try:
        phases = throughput(args, engine, tok, problems, sampling, backends, policy)
        bias_max = max(float(r.padd_bias.abs().max()) for r in routers(engine.module))
        summary = {"phases": phases, "tok_s": {b: statistics.median(phases[b]["tok_s"]) for b in backends},
                   "device": rank_device().type, "bias_max": bias_max, "lr": cfg.train.lr,
                   **step_then_sync(cfg, engine, tok, problems, sampling, backends, policy)}
    finally:
        if policy is not None:
            policy.close()
    if dist.get_rank() == 0:
        Path(args.worker).write_text(json.dumps(summary))
    leave(0, barrier=True)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    report(args, launch(args))


if __name__ == "__main__":
    main()
