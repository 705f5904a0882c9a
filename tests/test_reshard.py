"""Resume on another allocation: a checkpoint of 2 student ranks (expert-parallel size 2)
continues on 1 student rank (EP 1), and one of 1 rank on 2, through DeepSpeed's universal
checkpoint, converted once and reused. The run keeps its global batch (train.grad_accum is
re-derived), so each step trains on the same problems and the per-step losses follow an
uninterrupted 2-rank run. A layout that cannot continue is refused before anything loads.

Tolerance: fp32 on CPU, but 2 ranks sum the step's gradient in another order than 1 rank
accumulating 2 micro-batches, and AutoEP computes the experts in other groupings: two
uninterrupted runs, 1 rank and 2 ranks, differ by <= 1.2e-7 relative in these losses. TOL =
1e-5 leaves 80x room for that, and is 10x below what a wrong optimizer state gives one update
after the restart (DeepSpeed's universal load shares one Adam step counter between the dense
and the expert sub-groups: 1.3e-4 at step 4, see engine/checkpoint.py `_own_step_counters`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, deepspeed_cmd, free_port, read_results, run_cmd
from padd_ds.config import ConfigError, PaddConfig
from padd_ds.engine.checkpoint import MARKER, UNIVERSAL, mark_complete, plan_resume, universal
from padd_ds.engine.layout import Layout, launch_layout, resume_problem, resumed_grad_accum
from padd_ds.teacher.feed import BatchPlan

N = 4
TOL = 1e-5
RUN = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", f"train.save_every={N // 2}",
       "--set", "train.log_every=1", "--set", "train.micro_batch_size=4", "--set", "eval.num_problems=4",
       "--set", "eval.max_new_tokens=8", "--set", "logging.wandb_mode=disabled", "--set", "logging.progress=false",
       "--set", "topology.timeout_s=120"]
ONE_RANK = ["--set", "deepspeed.expert_parallel_size=1", "--set", "train.grad_accum=2"]  # 2 x 4 = the global 8
TWO, ONE = "2 student ranks x expert-parallel size 2", "1 student rank x expert-parallel size 1"


def _launch(procs: int, out: Path, *extra: str, steps: int = N):
    return run_cmd(deepspeed_cmd(procs, *RUN, "--set", f"run.output_dir={out}", "--set", f"train.steps={steps}",
                                 *extra), timeout=300)


@pytest.fixture(scope="module")
def two_ranks(toy_build, tmp_path_factory) -> Path:
    """The uninterrupted reference: 2 student ranks and a teacher, N steps, checkpoints at N/2 and N."""
    out = tmp_path_factory.mktemp("two_ranks")
    _launch(3, out)
    return out


def _killed_after_half(src: Path, dst: Path) -> Path:
    """`dst` holds `src`'s run as a job killed right after its step-N/2 checkpoint left it."""
    shutil.copytree(src / "checkpoints" / f"step_{N // 2}", dst / "checkpoints" / f"step_{N // 2}")
    return dst


def _assert_follows(resumed: Path, reference: Path) -> None:
    a, b = read_results(resumed)["history"], read_results(reference)["history"]
    assert [h["step"] for h in a] == list(range(1, N + 1))
    for x, y in zip(a, b):
        for key in ("train/kd_loss", "train/lm_loss"):
            assert x[key] == pytest.approx(y[key], rel=TOL), (x["step"], key, x[key], y[key])


def _layout(ckpt: Path) -> dict:
    return json.loads((ckpt / MARKER).read_text())["layout"]


def test_two_student_ranks_resume_on_one(two_ranks, tmp_path):
    run = _killed_after_half(two_ranks, tmp_path / "run")
    ckpts = run / "checkpoints"
    out = _launch(2, run, "--set", "deepspeed.expert_parallel_size=1").stdout
    assert (f"[resume] {ckpts / 'step_2'} was trained on {TWO}, this launch has {ONE}: train.grad_accum 1 -> 2 "
            "keeps its global batch of 8 problems per step") in out, out[-3000:]
    assert f"[resume] continuing from {ckpts / 'step_2'} (step 2), resharded from {TWO} to {ONE}" in out
    _assert_follows(run, two_ranks)
    assert _layout(ckpts / "step_4") == {"students": 1, "ep": 1, "zero_stage": 3, "dtype": "float32", "experts": 8,
                                         "mode": "distill", "micro_batch_size": 4, "global_batch": 8,
                                         "router_lr_scale": 1.0}
    # The conversion stays beside its source, and a next restart reuses it instead of converting again.
    conv = ckpts / UNIVERSAL / "step_2"
    stamp = (conv / MARKER).stat().st_mtime_ns
    assert universal(ckpts / "step_2") == conv and (conv / MARKER).stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (ckpts / UNIVERSAL).iterdir()) == ["step_2"]  # nothing half-written left


def test_one_student_rank_resumes_on_two(two_ranks, tmp_path):
    run = tmp_path / "run"
    _launch(2, run, *ONE_RANK, steps=N // 2)
    out = _launch(3, run, "--set", "train.grad_accum=2").stdout  # the job's own overrides, on 2 ranks and EP 2
    assert "train.grad_accum 2 -> 1 keeps its global batch of 8 problems per step" in out, out[-3000:]
    assert f"resharded from {ONE} to {TWO}" in out
    _assert_follows(run, two_ranks)
    assert _layout(run / "checkpoints" / "step_4")["students"] == 2


@pytest.mark.parametrize("world, extra, why", [
    (2, ["train.micro_batch_size=3", "deepspeed.expert_parallel_size=1"],
     f"{ONE}: its global batch of 8 problems per step is not a multiple of 1 student rank x "
     "train.micro_batch_size=3; set train.micro_batch_size to a divisor of 8"),
    (4, ["deepspeed.expert_parallel_size=3"],
     "3 student ranks x expert-parallel size 3: 8 experts do not divide over expert-parallel size 3"),
    (3, ["train.router_lr_scale=10"],
     f"{TWO}: its optimizer was built with train.router_lr_scale=1, this launch's is 10: the routers' own "
     "optimizer group cannot be added or removed in a resume; set train.router_lr_scale to 1"),
])
def test_impossible_reshape_is_refused_before_loading(two_ranks, tmp_path, world, extra, why):
    """One process of a `world`-process launch: validation refuses before any process group exists."""
    shutil.copytree(two_ranks / "checkpoints" / "step_4", tmp_path / "checkpoints" / "step_4")
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    p = run_cmd([sys.executable, str(REPO / "train.py"), *RUN, "--set", f"run.output_dir={tmp_path}",
                 *[a for kv in extra for a in ("--set", kv)]], timeout=60, env=env, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert (f"padd-ds: config error: train.resume=auto: checkpoint {tmp_path / 'checkpoints' / 'step_4'} was "
            f"trained on {TWO}, this launch has {why}") in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["checkpoints"]  # nothing started


# -- the rules, without a launch ---------------------------------------------------------------


def _layout_of(students: int, ep: int, **kw) -> Layout:
    base = dict(students=students, ep=ep, zero_stage=3, dtype="float32", experts=8, mode="distill",
                micro_batch_size=4, global_batch=8, router_lr_scale=1.0)
    return Layout(**{**base, **kw})


def test_a_step_holds_the_same_problems_however_it_is_cut():
    """BatchPlan: per_rank x ranks x micro-steps = 8 problems per step, across epoch ends (30 // 8)."""
    cuts = [(4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 8, 1), (2, 1, 4)]
    plans = [BatchPlan(30, per_rank, ranks, accum, seed=7) for per_rank, ranks, accum in cuts]
    for step in range(12):
        steps = [sorted(i for m in range(p.grad_accum) for r in range(p.num_ranks) for i in p.indices(step, m, r))
                 for p in plans]
        assert all(s == steps[0] for s in steps) and len(set(steps[0])) == 8, step


def test_resume_rules():
    old = _layout_of(2, 2)
    assert resume_problem(old, old, "ck") is None and not old.reshaped(old)
    one = _layout_of(1, 1, global_batch=4)
    assert resume_problem(old, one, "ck") is None and old.reshaped(one) and resumed_grad_accum(old, one) == 2
    four = _layout_of(4, 2, micro_batch_size=2, global_batch=8)
    assert resume_problem(old, four, "ck") is None and resumed_grad_accum(old, four) == 1
    cases = [(_layout_of(3, 1), "launch a number of student ranks that divides 8"),
             (_layout_of(2, 2, experts=16), "its student has 8 experts per layer, this launch's 16"),
             (_layout_of(2, 2, zero_stage=2), "set zero_optimization.stage=3"),
             (_layout_of(2, 2, dtype="bfloat16"), "set models.dtype=float32"),
             (_layout_of(6, 4), "6 student ranks do not form expert-parallel groups of 4"),
             (_layout_of(2, 2, mode="padd", global_batch=16), None),  # another loop: no data position to keep
             (_layout_of(2, 2, router_lr_scale=10.0), "set train.router_lr_scale to 1"),  # a group added
             (_layout_of(2, 2, router_lr_scale=1.0), None),
             ]
    for new, fix in cases:
        problem = resume_problem(old, new, "ck")
        assert (problem is None) if fix is None else (fix in problem and old.shape() in problem), (new, problem)
    padd = _layout_of(2, 2, mode="padd", global_batch=8)
    assert "set stage3.prompts_per_step=8" in resume_problem(padd, _layout_of(1, 1, mode="padd", global_batch=4), "ck")
    routers = _layout_of(2, 2, router_lr_scale=10.0)
    assert resume_problem(routers, _layout_of(2, 2, router_lr_scale=30.0), "ck") is None  # a new rate, same groups
    assert "set train.router_lr_scale to any value other than 1" in resume_problem(routers, old, "ck")
    assert _layout_of(2, 2, dtype=None).dtype is None and resume_problem(old, _layout_of(1, 1, dtype=None), "ck") is None


def test_a_resume_trains_at_the_configs_rates(toy_build):
    """A checkpoint's optimizer state brings back the rates it was saved with (torch restores
    param_groups); apply_learning_rates, run after every load, puts the config's back: train.lr
    for the rest, train.lr x train.router_lr_scale for the routers' group."""
    import torch

    from padd_ds.engine.build import apply_learning_rates, param_groups
    from padd_ds.models.files import model_paths
    from padd_ds.models.loading import load_causal_lm
    from padd_ds.recipe import load_config
    from padd_ds.toy.resolve import use_toy_build_for

    def cfg_of(lr: str, scale: str):
        cfg = load_config(REPO / "recipes" / "toy_cpu.yaml", [f"train.lr={lr}", f"train.router_lr_scale={scale}"])
        use_toy_build_for(cfg)
        return cfg

    old, new = cfg_of("1e-4", "10"), cfg_of("2e-5", "30")
    model = load_causal_lm(model_paths(old)[1], "float32")
    assert isinstance(param_groups(model, cfg_of("1e-4", "1")), list) and \
        not isinstance(param_groups(model, cfg_of("1e-4", "1"))[0], dict)  # scale 1: one group, as before
    groups = param_groups(model, old)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in groups[0]["params"]) == \
        [f"model.layers.{i}.mlp.gate.weight" for i in range(model.config.num_hidden_layers)]
    saved = torch.optim.AdamW(groups, lr=1e-4).state_dict()  # DeepSpeed builds it with train.lr as the default
    opt = torch.optim.AdamW(param_groups(model, new), lr=2e-5)
    opt.load_state_dict(saved)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3), 1e-4]  # the checkpoint's
    engine = type("Engine", (), {"optimizer": opt})()
    assert sorted(apply_learning_rates(engine, new)) == [(1e-4, 2e-5), (pytest.approx(1e-3), pytest.approx(6e-4))]
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(6e-4), 2e-5]
    assert apply_learning_rates(engine, new) == []


def test_launch_layout_reads_the_recipe_and_the_deepspeed_json():
    cfg = PaddConfig()
    cfg.train.micro_batch_size, cfg.train.grad_accum = 4, 3
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    assert launch_layout(cfg, ds, 2, 8, on_gpu=False) == _layout_of(2, 2, global_batch=24)
    assert launch_layout(cfg, ds, 2, 8, on_gpu=True).dtype == "bfloat16"
    assert launch_layout(cfg, ds, 2, None, on_gpu=None).dtype is None  # `padd config validate`: no device yet
    cfg.train.mode, cfg.train.grad_accum, cfg.stage3.prompts_per_step = "padd", 1, 8
    assert launch_layout(cfg, ds, 1, 8, on_gpu=False).global_batch == 8


def test_another_world_size_gets_reproducible_fresh_rng_streams():
    """Saved per-rank streams belong to the old ranks' data shares; each rank starts one from (seed, step, rank)."""
    import torch

    from padd_ds.engine.checkpoint import _restore_rng

    draws = []
    for step in (5, 5, 6):
        _restore_rng([{"unused": 0}, {"unused": 1}], seed=1234, step=step)  # saved by 2 ranks, this world has 1
        draws.append((torch.rand(3).tolist(), float(np.random.rand())))
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_the_ranks_check_the_chosen_checkpoint_again_before_loading(tmp_path):
    """plan_resume (every student rank, before the engine) refuses what validation would; a
    marker of an older padd-ds without a layout resumes only on its own number of ranks."""
    d = tmp_path / "step_2"
    d.mkdir()
    for r in (0, 1):
        (d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"m" * 10)
    mark_complete(d, 2, _layout_of(2, 2))
    with pytest.raises(ConfigError, match="is not a multiple of 1 student rank x train.micro_batch_size=3"):
        plan_resume(tmp_path, _layout_of(1, 1, micro_batch_size=3))
    plan = plan_resume(tmp_path, _layout_of(1, 1))
    assert plan.found == d and plan.reshaped and plan.layout == _layout_of(2, 2)
    mark_complete(d, 2)  # no layout: written before layouts were recorded
    assert not plan_resume(tmp_path, _layout_of(2, 2)).reshaped
    with pytest.raises(ConfigError, match="was written on 2 student ranks by a padd-ds that did not record its layout"):
        plan_resume(tmp_path, _layout_of(1, 1))
