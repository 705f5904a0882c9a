"""Run as a 2-rank DeepSpeed job by test_activation_checkpointing.py: the toy student under
ZeRO-3 + AutoEP (EP 2), built once with train.activation_checkpointing off and once on, from
the same weights. Each engine then

1. samples rollouts (rl/rollout.py, eval mode: the KV cache, no checkpointing) from a fixed seed;
2. takes one Stage III update (`update_on_rollouts`: policy loss, router drift, KD against the
   real toy teacher) on _rollout_accum.py's fixed rollout batch, in 2 micro-batches of 4;
3. takes one Stage I warmup-style step: `uniform_random_topk` routing, LM loss plus the path KL
   on the router scores, which reach the loss from inside the checkpointed layers.

The optimiser is plain SGD without clipping (see _rollout_accum.py), so each step's gradient is
(weights before - weights after) / lr. Each rank writes, per engine, the sampled ids, both
steps' gradients (its view: ZeRO-3 partitions gathered, its own experts) and how often the
last decoder layer ran, to OUT.<rank>.
"""

import json
import os
import sys

import torch

from _rollout_accum import ROWS, gathered, rollout_batch

LR = 0.05
MBS = 4


def config(checkpointing: bool, ds_json: str):
    from padd_ds.recipe import load_config
    from padd_ds.toy.resolve import use_toy_build_for

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(repo, "recipes", "toy_cpu.yaml"),
                      ["train.mode=padd", f"train.micro_batch_size={MBS}", f"train.lr={LR}",
                       "stage3.prompts_per_step=4", "stage3.group_size=4", "stage3.updates_per_batch=1",
                       f"train.activation_checkpointing={str(checkpointing).lower()}", f"deepspeed.config={ds_json}"])
    use_toy_build_for(cfg)
    return cfg


class LayerCalls:
    """Counts the calls of the last decoder layer: a checkpointed layer runs again in backward."""

    def __init__(self, engine):
        self.n = 0
        engine.module.model.layers[-1].register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.n += 1


def sampled_ids(engine, tok) -> list[list[int]]:
    from padd_ds.rl.rollout import RolloutSampling, sample_rollouts

    problems = [{"id": i, "question": q} for i, q in enumerate(["What is 3 + 4?", "What is 12 - 5?"])]
    torch.manual_seed(11)
    ro = sample_rollouts(engine.module, tok, problems, RolloutSampling(2, 1.0, 1.0, 6, 96), synced=True)
    return ro.batch.ids.tolist()


def stage3_grad(engine, cfg, teacher, rank: int) -> torch.Tensor:
    from padd_ds.data.batch import micro_batches
    from padd_ds.models.router import router_weights
    from padd_ds.rl.step import update_on_rollouts

    rb = rollout_batch(rank, engine.module.config.vocab_size)
    rb.requests = [teacher.submit(0, mb.ids, mb.lengths) for mb in micro_batches(rb.rollouts.batch, MBS)]
    prev = [w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(7 + l))
            for l, w in enumerate(router_weights(engine.module))]
    before = gathered(engine)
    update_on_rollouts(engine, rb, prev, cfg, lambda i: teacher.result(rb.requests[i]).logits, step=0)
    return (before - gathered(engine)) / LR


def warmup_grad(engine, rank: int) -> torch.Tensor:
    """Stage I's loss shape: LM + path KL of the router scores to fixed targets, with a random top-k dispatch."""
    from padd_ds.data.batch import lm_loss, micro_batches
    from padd_ds.models.router import routers, routing_trace
    from padd_ds.stage1.warmup import path_kl

    batch = rollout_batch(rank, engine.module.config.vocab_size).rollouts.batch
    n_layers, n_experts = len(routers(engine.module)), routers(engine.module)[0].num_experts
    before = gathered(engine)
    engine.train()  # as Stage1.warmup
    with routing_trace(engine.module, "uniform_random_topk", seed=5) as trace:
        for i, mb in enumerate(micro_batches(batch, MBS)):
            gen = torch.Generator().manual_seed(300 + 10 * rank + i)
            log_pt = torch.log_softmax(torch.randn(*mb.ids.shape, n_layers, n_experts, generator=gen), -1)
            logits = engine(input_ids=mb.ids, attention_mask=mb.attention_mask).logits
            kl = path_kl(trace.scores(), log_pt, mb.attention_mask.bool(), float(mb.lengths.sum()))
            loss = lm_loss(logits, mb) + kl
            engine.backward(loss)
            engine.step()
    return (before - gathered(engine)) / LR


def run(checkpointing: bool, ds_json: str, rank: int) -> dict:
    from padd_ds.engine.build import initialize_engine
    from padd_ds.models.files import model_paths
    from padd_ds.models.loading import load_causal_lm, load_tokenizer
    from padd_ds.teacher.service import LocalTeacher, TeacherModel

    cfg = config(checkpointing, ds_json)
    teacher_path, student_path, tok_path = model_paths(cfg)
    engine, _ = initialize_engine(cfg, load_causal_lm(student_path, "float32"), 2)
    assert engine.gradient_accumulation_steps() == ROWS // MBS
    teacher = LocalTeacher(TeacherModel(load_causal_lm(teacher_path, "float32")), cfg.teacher.logits_top_k)
    calls = LayerCalls(engine)
    ids = sampled_ids(engine, load_tokenizer(tok_path))
    after_rollout = calls.n
    g3 = stage3_grad(engine, cfg, teacher, rank)
    after_stage3 = calls.n
    g1 = warmup_grad(engine, rank)
    return {"checkpointing": engine.module.is_gradient_checkpointing, "sampled": ids,
            "calls": [after_rollout, after_stage3 - after_rollout, calls.n - after_stage3],
            "stage3_grad": g3.tolist(), "warmup_grad": g1.tolist()}


def main(out_path: str) -> None:
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo")
    from padd_ds.launch.world import leave, release_shm_names

    release_shm_names()
    rank = dist.get_rank()
    ds_json = os.path.join(os.path.dirname(out_path), "zero3_sgd.json")
    out = {"rank": rank, "off": run(False, ds_json, rank), "on": run(True, ds_json, rank)}
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(out, f)
    leave(0, barrier=True)


if __name__ == "__main__":
    main(sys.argv[-1])  # the DeepSpeed launcher puts --local_rank=N first
