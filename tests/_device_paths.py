"""Run as a 1-rank DeepSpeed job by test_device.py: every path that feeds a model hands it
tensors on the rank's device.

DeepSpeed's accelerator is made to report `meta` as the current device, as a GPU node's
reports cuda:<local rank>, so `rank_device()` is `meta`: a tensor a path leaves on the host
then reaches the model on another device than the rank's. Models the paths load themselves
land on `meta` too; the student engine (a real ZeRO-3 + AutoEP engine) stays on the CPU. A
forward pre-hook on every module (and a check on `generate`, whose preparation cannot run on
meta tensors) compares every input tensor's device with the rank's and stops the path with
`Checked` once they match: meta tensors hold no values to go on with.
"""

import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

META = torch.device("meta")


class Checked(Exception):
    """The first model call of a path saw only tensors on the rank's device."""


class HostTensor(Exception):
    """A path handed a model a tensor that is not on the rank's device."""


def _check(who: str, args, kwargs) -> None:
    wrong = [f"{name} on {t.device}" for name, t in list(enumerate(args)) + list(kwargs.items())
             if torch.is_tensor(t) and t.device != META]
    if wrong:
        raise HostTensor(f"{who} got {', '.join(map(str, wrong))}, the rank's device is {META}")
    raise Checked(who)


def watch(model: torch.nn.Module) -> None:
    """Check the inputs of every module's forward, and of `model.generate`."""
    for name, m in model.named_modules():
        m.register_forward_pre_hook(lambda mod, args, kwargs, name=name: _check(name or "model", args, kwargs),
                                    with_kwargs=True, prepend=True)
    model.generate = lambda *args, **kwargs: _check("generate", args, kwargs)


@contextlib.contextmanager
def accelerator_reports(device: str):
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    acc.current_device_name = lambda: device
    try:
        yield
    finally:
        del acc.current_device_name


def outcome(path) -> str:
    try:
        path()
    except Checked:
        return "ok"
    except HostTensor as e:
        return f"host tensor: {e}"
    except Exception as e:  # noqa: BLE001 - report which path broke and how
        return f"{type(e).__name__}: {e}"
    return "the path never called its model"


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from padd_ds.launch.world import leave, release_shm_names

    release_shm_names()
    from padd_ds.data.batch import encode_examples
    from padd_ds.data.math import load_train_problems
    from padd_ds.engine.build import initialize_engine
    from padd_ds.eval.evaluate import Decoding
    from padd_ds.eval.heldout import heldout_accuracy, shared_accuracy
    from padd_ds.launch.device import rank_device
    from padd_ds.models.export import engine_routes
    from padd_ds.models.files import model_paths
    from padd_ds.models.loading import load_causal_lm, load_tokenizer
    from padd_ds.models.router import router_weights
    from padd_ds.pipeline.verify import max_logit_diff, probe_logits
    from padd_ds.recipe import load_config
    from padd_ds.rl.rewards import group_advantages
    from padd_ds.rl.rollout import RolloutBatch, RolloutSampling, sample_rollouts
    from padd_ds.rl.step import update_on_rollouts
    from padd_ds.stage1.student import Stage1
    from padd_ds.teacher.clusters import cluster_teacher, layer_map
    from padd_ds.teacher.service import LocalTeacher, TeacherModel
    from padd_ds.teacher.sharded import ShardedTeacher
    from padd_ds.toy.resolve import use_toy_build_for

    cfg = load_config(str(os.path.join(os.path.dirname(__file__), "..", "recipes", "toy_cpu.yaml")), [
        "deepspeed.expert_parallel_size=1", "train.mode=padd", "train.micro_batch_size=2", "stage3.group_size=2",
        "stage3.prompts_per_step=1",
        "data.max_response_tokens=6", "eval.num_problems=2", "eval.max_new_tokens=4", "eval.batch_size=2",
        "stage1.eval_problems=2"])
    use_toy_build_for(cfg)
    teacher_path, student_path, tok_path = model_paths(cfg)
    tok = load_tokenizer(tok_path)
    pool = load_train_problems("toy")[:4]
    engine, _ = initialize_engine(cfg, load_causal_lm(student_path, cfg.models.dtype), 1)
    teacher_cpu = load_causal_lm(teacher_path, cfg.models.dtype)
    layers = layer_map(len(engine.module.model.layers), len(teacher_cpu.model.layers))
    cmap, _ = cluster_teacher(teacher_cpu, layers, 8, "gate_up", 0)
    sharded = ShardedTeacher(load_causal_lm(teacher_path, cfg.models.dtype, device="cpu"))
    # A real scored rollout batch (on the CPU) for the step.
    ro = sample_rollouts(engine.module, tok, pool[:1], RolloutSampling.from_config(cfg), synced=False)
    rewards = torch.tensor([[1.0, 0.0]])
    rb = RolloutBatch(ro, rewards, group_advantages(rewards)[0].reshape(-1))
    prev = router_weights(engine.module)
    batch = encode_examples(tok, pool[:2], cfg.data.max_prompt_tokens, cfg.data.max_response_tokens)
    local = LocalTeacher(TeacherModel(teacher_cpu, cluster_map=cmap), 8)  # scores on the CPU: only the student is watched
    stage1 = Stage1(cfg, engine, local, lambda ps: encode_examples(tok, ps, 96, 128), {"D": pool}, lambda *a: None)
    watch(engine.module)
    watch(sharded.engine.module)

    out = {}
    with accelerator_reports("meta"):
        out["rank_device"] = str(rank_device())
        teacher = load_causal_lm(teacher_path, cfg.models.dtype)
        student = load_causal_lm(student_path, cfg.models.dtype)
        out["loaded_on"] = sorted({str(p.device) for m in (teacher, student) for p in m.parameters()})
        watch(teacher)
        watch(student)
        paths = {
            "rollout": lambda: sample_rollouts(engine.module, tok, pool[:1], RolloutSampling.from_config(cfg), False),
            "step": lambda: update_on_rollouts(engine, rb, prev, cfg),
            "stage1": stage1.measure,
            "engine routes (fold, fidelity)": lambda: engine_routes(engine, [batch]),
            "export probe": lambda: probe_logits(engine, tok, cfg, pool),
            "exported model check": lambda: max_logit_diff(student, batch, torch.zeros(0)),
            "teacher scoring": lambda: TeacherModel(teacher).score(batch.ids, batch.lengths, 8),
            "sharded teacher scoring": lambda: sharded.score(batch.ids, batch.lengths, 8),
            "evaluation": lambda: heldout_accuracy(teacher, tok, cfg),
            "split evaluation": lambda: shared_accuracy(teacher, tok, pool[:2], Decoding(4, 2), 0, 1),
        }
        out["paths"] = {name: outcome(path) for name, path in paths.items()}
        # The hooks themselves: a host tensor handed to the engine is caught.
        out["host_tensor_caught"] = outcome(lambda: engine(input_ids=batch.ids)).startswith("host tensor")
    print("RESULT " + json.dumps(out), flush=True)
    leave(0, barrier=True)


if __name__ == "__main__":
    main()
