"""Run as a 2-rank DeepSpeed job by test_gathered_rollouts.py: the toy student under ZeRO-3 +
AutoEP (EP 2) with a non-zero Stage IV bias on every router. Each rank writes to OUT.<rank>:

- greedy tokens of the same 4 prompts from the engine itself (`hf`, both ranks in step) and
  from the gathered copy (`hf_gathered`);
- the logits of the engine and of the gathered copy on one batch;
- the collectives each backend issues for a sampled rollout phase (rollout_policy +
  sample_rollouts, as the trainer runs them) of 4 and of 12 new tokens, counted at
  torch.distributed's entry points;
- the gathered copy's logits with the routers' bias zeroed, to show the bias is what moves them;
- routing replay: the engine without its bias, replaying the experts it chose with it;
- the agreement of the gathered copy's captured rollout routes with the engine's own choices,
  with PADD routing and with a stock model's (the bias hook removed).
"""

import json
import os
import sys

import torch

PROMPT_LEN, ROWS = 7, 4
COLLECTIVES = ("all_gather_into_tensor", "all_gather", "_all_gather_base", "all_to_all_single", "all_to_all",
               "all_reduce", "broadcast", "reduce_scatter_tensor", "barrier")
PROBLEMS = [{"question": q, "answer": "1"} for q in ("What is 2 + 3?", "Tom has 4 apples and eats one. How many are left?")]


class CollectiveCount:
    """Counts calls into torch.distributed's collectives while active (they still run)."""

    def __init__(self):
        import torch.distributed as tdist

        self.n, self.saved = 0, {}
        for name in COLLECTIVES:
            if hasattr(tdist, name):
                self.saved[name] = getattr(tdist, name)
                setattr(tdist, name, self._counted(self.saved[name]))

    def _counted(self, fn):
        def call(*args, **kwargs):
            self.n += 1
            return fn(*args, **kwargs)
        return call

    def close(self):
        import torch.distributed as tdist

        for name, fn in self.saved.items():
            setattr(tdist, name, fn)


def collectives_of(engine, tok, backend: str, new_tokens: int) -> int:
    from padd_ds.rl.rollout import RolloutSampling, rollout_policy, sample_rollouts

    sampling = RolloutSampling(group_size=2, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens,
                               max_prompt_tokens=96)
    count = CollectiveCount()
    try:
        with rollout_policy(engine, backend, 2) as (model, synced):
            sample_rollouts(model, tok, PROBLEMS, sampling, synced)
    finally:
        count.close()
    return count.n


def replay(engine, ids: torch.Tensor) -> dict:
    """Routing replay: the engine with its bias at zero, routed through the experts it chose with
    the bias, computes what it computed with the bias (the weights are the unbiased scores in
    both); without the replay it does not."""
    from padd_ds.models.router import replayed_routes, routers, routing_trace

    mask = torch.ones_like(ids)
    with routing_trace(engine.module) as trace:
        biased = engine(input_ids=ids, attention_mask=mask).logits
        chosen = [s.clone() for s in trace.selected()]
    saved = [r.padd_bias.clone() for r in routers(engine.module)]
    for r in routers(engine.module):
        r.padd_bias.zero_()
    with replayed_routes(engine.module, chosen):
        replayed = engine(input_ids=ids, attention_mask=mask).logits
    plain = engine(input_ids=ids, attention_mask=mask).logits
    for r, b in zip(routers(engine.module), saved):
        r.padd_bias.copy_(b)
    return {"replay_max_diff": float((replayed - biased).abs().max()), "no_replay_diff": float((plain - biased).abs().max())}


def route_agreements(engine, tok) -> dict:
    """The gathered copy's captured rollout routes against the engine's own top-k on the same
    rows, with the exact-routing hook (PADD routing) and with it removed (a stock model that
    ignores the bias)."""
    from padd_ds.models.gathered import gathered_student
    from padd_ds.models.router import routing_trace
    from padd_ds.rl.rollout import RolloutSampling, sample_rollouts
    from padd_ds.rl.routes import route_agreement

    sampling = RolloutSampling(group_size=2, temperature=1.0, top_p=1.0, max_new_tokens=12, max_prompt_tokens=96)
    out = {}
    for kind in ("padd", "stock"):
        with gathered_student(engine) as model:
            if kind == "stock":
                for m in model.modules():
                    m._forward_hooks.clear()
            torch.manual_seed(5)
            ro = sample_rollouts(model, tok, PROBLEMS, sampling, synced=False)
        b = ro.batch
        with routing_trace(engine.module) as trace:
            engine(input_ids=b.ids, attention_mask=b.attention_mask)
            agree, pairs = route_agreement(trace.own(), ro.routes, b.loss_mask)
        out[f"agreement_{kind}"] = agree / pairs
    return out


def greedy(model, ids: torch.Tensor, synced: bool) -> list[list[int]]:
    from padd_ds.models.generation import decoding_kwargs

    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **decoding_kwargs(None),
                         max_new_tokens=10, eos_token_id=[-1], pad_token_id=0, synced_gpus=synced)
    return out[:, PROMPT_LEN:].tolist()


def main(out_path: str) -> None:
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo")
    from padd_ds.launch.world import leave, release_shm_names

    release_shm_names()
    from padd_ds.engine.build import initialize_engine
    from padd_ds.models.files import model_paths
    from padd_ds.models.gathered import gathered_student
    from padd_ds.models.loading import load_causal_lm, load_tokenizer
    from padd_ds.models.router import routers
    from padd_ds.recipe import load_config
    from padd_ds.toy.resolve import use_toy_build_for

    rank = dist.get_rank()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(repo, "recipes", "toy_cpu.yaml"), ["train.mode=padd"])
    use_toy_build_for(cfg)
    _, student_path, _ = model_paths(cfg)
    engine, _ = initialize_engine(cfg, load_causal_lm(student_path, "float32"), 2)
    engine.eval()
    tok = load_tokenizer(student_path)
    gen = torch.Generator().manual_seed(3)
    for r in routers(engine.module):  # a Stage IV bias large enough to change routes (scores sum to 1)
        r.padd_bias.copy_(0.3 * torch.randn(r.padd_bias.shape, generator=gen))
    vocab = engine.module.config.vocab_size
    ids = torch.randint(5, vocab, (ROWS, PROMPT_LEN), generator=torch.Generator().manual_seed(11 + rank))
    out = {"rank": rank}
    with torch.no_grad():
        out["hf_greedy"] = greedy(engine.module, ids, synced=True)
        engine_logits = engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        with gathered_student(engine) as model:
            out["gathered_greedy"] = greedy(model, ids, synced=False)
            gathered_logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        out["logits_max_diff"] = float((engine_logits - gathered_logits).abs().max())
        biases = [r.padd_bias.clone() for r in routers(engine.module)]
        for r in routers(engine.module):
            r.padd_bias.zero_()
        with gathered_student(engine) as model:
            unbiased = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        out["bias_moves_logits"] = float((unbiased - gathered_logits).abs().max())
        for r, b in zip(routers(engine.module), biases):
            r.padd_bias.copy_(b)
        out.update(replay(engine, ids))
    out.update(route_agreements(engine, tok))
    for backend in ("hf", "hf_gathered"):
        out[backend] = [collectives_of(engine, tok, backend, n) for n in (4, 12)]
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(out, f)
    leave(0, barrier=True)


if __name__ == "__main__":
    main(sys.argv[-1])  # the DeepSpeed launcher puts --local_rank=N first
