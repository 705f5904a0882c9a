"""Exact resume of train.mode=padd on 2 ZeRO-3 + AutoEP student ranks and a teacher rank:
N steps in one go == N/2 steps, stop, restart (auto-resume), N/2 more. Rollouts are sampled,
so this also checks that every rank gets its own RNG back, and that the Stage IV bias,
advantage EMAs and the router snapshot survive the restart."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, deepspeed_cmd, read_results, run_cmd

N = 4
COMMON = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.mode=padd",
          # 2 prompts x G=4 per student rank in 2 micro-batches: accumulation and 2 teacher requests per step.
          "--set", "stage3.prompts_per_step=4", "--set", "train.micro_batch_size=4",
          "--set", "train.lr=1e-4", "--set", "train.log_every=1",
          "--set", "data.max_response_tokens=24", "--set", "eval.num_problems=4", "--set", "eval.max_new_tokens=8",
          "--set", "logging.wandb_mode=disabled", "--set", "logging.progress=false",
          "--set", "topology.timeout_s=120", "--set", "teacher.request_timeout_s=60",
          "--set", "stage4.fold_every=3",  # steps 1-2 build a bias (saved at the split), step 3 folds it
          "--set", "train.router_lr_scale=3"]  # the routers' own optimizer group is saved and loaded too
# Wall-clock rates differ between runs; everything else must be identical.
TIMING = {"train/tokens_per_s", "train/elapsed_s", "train/generate_fraction", "teacher/wait_fraction", "time"}


def _run(out, steps):
    return run_cmd(deepspeed_cmd(3, *COMMON, "--set", f"run.output_dir={out}", "--set", f"train.steps={steps}"),
                   timeout=420)


@pytest.fixture(scope="module")
def runs(toy_build, tmp_path_factory):
    full, split = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("split")
    _run(full, N)
    _run(split, N // 2)
    p = _run(split, N)  # same run dir: picks up step_2
    return full, split, p


def test_resumed_run_equals_uninterrupted_run(runs):
    full, split, p = runs
    assert f"[resume] continuing from {split / 'checkpoints' / f'step_{N // 2}'}" in p.stdout
    assert "[resume] learning rate" not in p.stdout  # the checkpoint's rates are the config's
    a, b = load_file(str(full / "hf" / "model.safetensors")), load_file(str(split / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    ha = [{k: v for k, v in h.items() if k not in TIMING} for h in read_results(full)["history"]]
    hb = [{k: v for k, v in h.items() if k not in TIMING} for h in read_results(split)["history"]]
    assert len(ha) == N and ha == hb
    assert ha[-1]["routing/bias_norm"] > 0  # Stage IV really moved the bias
    # stage4.fold_every=3: step 3 folded the bias into the routers and restarted it from 0;
    # the folded routers keep most of the routes of the step's rollout tokens.
    assert [("routing/fold_kept" in h) for h in ha] == [False, False, True, False]
    assert ha[2]["routing/bias_norm"] == 0 and 0.8 < ha[2]["routing/fold_kept"] <= 1.0, ha[2]
    # The bias has no slot in Qwen3-MoE: the export folds it and reports how often it still
    # picks the engine's experts on held-out tokens.
    res = read_results(split)
    assert res["export_bias_folded"] and 0.8 < res["export_routing_fidelity"] <= 1.0
    # ... and its routing file gives the exact engine back in plain transformers.
    exact = res["export_exact_routing"]
    assert exact["routing_fidelity"] == 1.0 and exact["max_abs_logit_diff"] < 1e-4, exact
    assert exact["student_after"] is None  # eval.exact_routing is off by default
    assert (split / "hf" / "padd_routing.safetensors").exists()


def test_eval_cli_restores_exact_routing(runs, tmp_path):
    """`padd eval --exact-routing` on the folded export evaluates the engine's routing."""
    _, split, _ = runs
    res = {}
    for flag in ("", "--exact-routing"):
        out = tmp_path / f"eval{flag}.json"
        run_cmd([sys.executable, "-m", "padd_ds.cli", "eval", "--model", str(split / "hf"), "--suite", "toy",
                 "--limit", "8", "--max-new-tokens", "32", "--output", str(out), *([flag] if flag else [])],
                timeout=300)  # PADD_TOY_DIR: the toy_build fixture
        res[flag] = json.loads(out.read_text())
    assert res[""]["exact_routing"] is False and res["--exact-routing"]["exact_routing"] is True


def test_checkpoints_are_complete_and_pruned(runs):
    _, split, _ = runs
    ckpts = sorted(d.name for d in (split / "checkpoints").iterdir() if d.is_dir())
    assert ckpts == [f"step_{N // 2}", f"step_{N}"]  # keep_last=2, no .tmp leftovers
    marker = json.loads((split / "checkpoints" / f"step_{N}" / "padd_complete.json").read_text())
    assert marker["step"] == N and marker["files"]
    assert (split / "checkpoints" / "latest").read_text() == f"step_{N}"
