"""Run as a 2-rank DeepSpeed job by test_guard.py: NonFiniteGuard on real ZeRO-3 engines.

A batch with a NaN in its input on one rank makes that rank's loss NaN. Every engine starts
from the same weights; a guarded engine that meets bad batches must end with exactly the
weights of an engine that never saw them (bit for bit), on both ranks, with and without
gradient accumulation.
"""

import json
import math

import torch

ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}  # partition every parameter


def make_engine(gas: int):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "zero_optimization": ZERO3,
          "gradient_clipping": 1.0, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    return deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)[0]


def batch(i: int, rank: int, nan: bool) -> torch.Tensor:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1000 * i + rank))
    if nan:
        x[1, 3] = math.nan
    return x


def loss_of(engine, x: torch.Tensor) -> torch.Tensor:
    return (engine(x) ** 2).mean()


def weights(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def run(gas: int, schedule: list[list[set]], rank: int, max_in_a_row: int = 3) -> dict:
    """schedule[step][micro] = the ranks whose batch has a NaN; every step goes through the guard.
    With gas=1 and several entries per step, each entry is one optimiser step on the same
    training step (stage3.updates_per_batch)."""
    from padd_ds.engine.guard import NonFiniteGuard, NonFiniteLossError

    engine = make_engine(gas)
    guard = NonFiniteGuard(max_in_a_row)
    skipped, error = [], None
    try:
        for step, micros in enumerate(schedule):
            for m, bad in enumerate(micros):
                loss = loss_of(engine, batch(step * len(micros) + m, rank, rank in bad))
                skipped.append(guard.backward_step(engine, loss, step))
    except NonFiniteLossError as e:
        error = str(e)
    w = weights(engine)
    return {"weights": w, "skipped": skipped, "count": guard.skipped, "error": error,
            "global_steps": engine.global_steps, "finite": all(bool(torch.isfinite(t).all()) for t in w)}


def clean(gas: int, steps: list[int], rank: int) -> dict:
    """The reference: plain backward/step on the clean data positions `steps` only."""
    engine = make_engine(gas)
    for step in steps:
        for m in range(gas):
            engine.backward(loss_of(engine, batch(step * gas + m, rank, False)))
            engine.step()
    return {"weights": weights(engine), "global_steps": engine.global_steps}


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def main() -> None:
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo")
    from padd_ds.launch.world import leave, release_shm_names

    release_shm_names()
    rank = dist.get_rank()
    out = {}

    # One micro-batch per step: step 2 is NaN on rank 1 only, step 4 on both ranks.
    sched = [[set()], [{1}], [set()], [{0, 1}], [set()]]
    g, ref = run(1, sched, rank), clean(1, [0, 2, 4], rank)
    out["gas1"] = {"same_as_clean": same(g["weights"], ref["weights"]), "skipped": g["skipped"], "count": g["count"],
                   "global_steps": [g["global_steps"], ref["global_steps"]], "finite": g["finite"]}

    # Two micro-batches per step: a NaN in the second (rank 0) or the first (rank 1)
    # micro-batch skips the whole step; what its clean micro-batch accumulated must not leak
    # into the next step, and accumulation boundaries must stay on the steps.
    sched = [[set(), set()], [set(), {0}], [{1}, set()], [set(), set()]]
    g, ref = run(2, sched, rank), clean(2, [0, 3], rank)
    out["gas2"] = {"same_as_clean": same(g["weights"], ref["weights"]), "skipped": g["skipped"], "count": g["count"],
                   "global_steps": [g["global_steps"], ref["global_steps"]]}

    # Three bad steps in a row stop the run on every rank, naming the steps and ranks.
    g = run(1, [[{1}], [set()], [{1}], [{0}], [{0, 1}], [set()]], rank)
    out["streak"] = {"error": g["error"], "skipped": g["skipped"], "count": g["count"]}

    # Two optimiser steps per training step: the streak counts training steps, so two bad
    # rollout batches (4 skipped optimiser steps) do not stop the run, the third one does.
    g = run(1, [[{0}, {0}], [{1}, {1}], [set(), set()], [{0}, {0}], [{1}, set()], [{0}, {0}], [{1}, {1}],
                [{0, 1}, {0, 1}]], rank)
    out["updates"] = {"error": g["error"], "skipped": g["skipped"], "count": g["count"]}
    out["rank"] = rank
    print("RESULT " + json.dumps(out), flush=True)
    leave(0, barrier=True)


if __name__ == "__main__":
    main()
