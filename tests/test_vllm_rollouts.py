"""rollout.backend=vllm: the engine process (padd_ds/vllm_engine) against transformers, and a
whole PADD run that samples from it. Needs the vLLM environment (`make vllm`, which CI runs).

The test toy's head_dim (16) is below what vLLM's CPU attention supports, so these tests use a
student of the same shape with head_dim 32 and seeded random weights (`vllm_student`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, finish_ranks, reap, start_ranks
from padd_ds.vllm_engine.client import EngineConnection, EngineProcess, EngineSpec, vllm_environment_problem, \
    vllm_python

if vllm_environment_problem(None):
    pytest.skip(f"no vLLM environment at {vllm_python(None)}: run `make vllm`", allow_module_level=True)


def _spec(stock: bool = False) -> EngineSpec:
    return EngineSpec(python=vllm_python(None), clients=1, dtype="float32", seed=0, max_model_len=256,
                      kv_cache_bytes=64 << 20, gpu_memory_utilization=0.3, timeout_s=240, stock=stock)


@pytest.fixture(scope="module")
def vllm_student(toy_build, tmp_path_factory) -> Path:
    """The test toy student's shape with head_dim 32 (seeded random weights) and its tokenizer files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(toy_build.root) / "student"
    cfg = AutoConfig.from_pretrained(src)
    cfg.head_dim = 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = tmp_path_factory.mktemp("vllm_student") / "student"
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "generation_config")):
            shutil.copy(f, out / f.name)
    return out


def _with_bias(student: Path, dst: Path, scale: float) -> dict[str, torch.Tensor]:
    """A copy of the student with a Stage IV bias file; the bias (large enough to move routes)."""
    from safetensors.torch import save_file

    shutil.copytree(student, dst)
    layers = json.loads((student / "config.json").read_text())["num_hidden_layers"]
    g = torch.Generator().manual_seed(1)
    bias = {f"model.layers.{i}.mlp.gate.padd_bias": torch.rand(8, generator=g) * scale for i in range(layers)}
    save_file(bias, str(dst / "padd_bias.safetensors"))
    return bias


def _hf_reference(model_dir: Path, bias: dict[str, torch.Tensor]):
    """transformers' model with PADD's routing (export's exact-routing hook) and a route recorder."""
    from transformers import AutoModelForCausalLM

    from padd_ds.models.export import biased_selection

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    routes: list = []
    for name, b in bias.items():
        gate = model.get_submodule(name.rsplit(".", 1)[0])
        gate.register_forward_hook(biased_selection(model.config, b))
        gate.register_forward_hook(lambda m, a, out: routes.append(out[2].sort(dim=-1).values.tolist()))
    return model, routes


def _engine_vs_reference(model_dir: Path, reference_dir: Path, bias: dict, stock: bool, workdir: Path,
                         reload_from: Path | None = None, temperature: float = 1.0) -> dict:
    """Sample from an engine on `model_dir` (optionally reloaded from `reload_from` first) at
    `temperature` and score its tokens (at that temperature) and routes with transformers on
    `reference_dir`."""
    proc = EngineProcess.start(_spec(stock), model_dir, workdir)
    try:
        conn = EngineConnection(proc.address, 0, 240)
        if reload_from is not None:
            conn.call({"op": "load", "files": sorted(str(f) for f in reload_from.glob("*.safetensors"))})
        prompts = [[1, 17, 33, 60, 5], [1, 200, 9]]
        gen = conn.call({"op": "generate", "prompts": prompts, "n": 2, "temperature": temperature, "top_p": 1.0,
                         "max_tokens": 16, "stop": [2]})
        seqs = [prompts[i // 2] + t for i, t in enumerate(gen["tokens"])]
        eng_routes = conn.call({"op": "routes", "seqs": seqs})["routes"]
        conn.call({"op": "close"})
    finally:
        proc.stop()
    model, routes = _hf_reference(reference_dir, bias)
    diff, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for i, (toks, lps) in enumerate(zip(gen["tokens"], gen["logprobs"])):
            p = prompts[i // 2]
            routes.clear()
            logp = (model(torch.tensor([p + toks])).logits[0].float() / temperature).log_softmax(-1)
            ref = logp[len(p) - 1:-1].gather(1, torch.tensor(toks)[:, None])[:, 0]
            diff = max(diff, (ref - torch.tensor(lps)).abs().max().item())
            for layer, hf_layer in zip(eng_routes[i], routes):
                agree += sum(a == b for a, b in zip(layer, hf_layer))
                total += len(layer)
    return {"logprob_max_diff": diff, "route_agreement": agree / total, "tokens": sum(map(len, gen["tokens"]))}


def test_padd_model_samples_on_the_trainers_routes_and_the_stock_model_does_not(vllm_student, tmp_path):
    """With a Stage IV bias: vLLM's stock Qwen3-MoE ignores it (other experts, other log-probs);
    the PADD model's sampled-token log-probs are transformers' with PADD routing, token by token,
    at the sampling temperature (the trainer's)."""
    bias = _with_bias(vllm_student, tmp_path / "m", 0.3)
    padd = _engine_vs_reference(tmp_path / "m", tmp_path / "m", bias, False, tmp_path / "padd", temperature=0.7)
    stock = _engine_vs_reference(tmp_path / "m", tmp_path / "m", bias, True, tmp_path / "stock")
    assert padd["tokens"] > 8, padd
    assert padd["route_agreement"] == 1.0 and padd["logprob_max_diff"] < 1e-4, padd
    assert stock["route_agreement"] < 0.9 and stock["logprob_max_diff"] > 1e-2, stock


def _tiny(kind: str, out: Path) -> Path:
    """A 2-layer student of another exported architecture, seeded random weights (vLLM's CPU
    attention: head_dim 32; its CPU MLA kernels: DeepSeek-V2's real head sizes, bf16 only)."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config, MixtralConfig

    common = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  max_position_embeddings=320, num_experts_per_tok=2, tie_word_embeddings=False)
    cfg = (MixtralConfig(intermediate_size=128, head_dim=32, num_local_experts=8, **common) if kind == "mixtral" else
           DeepseekV2Config(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                            first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                            v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy", norm_topk_prob=False, **common))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    return out


@pytest.mark.parametrize("kind, dtype, tol", [("mixtral", "float32", 1e-4), ("deepseek_v2", "bfloat16", 2e-2)])
def test_padd_models_of_the_other_architectures_route_with_the_bias(kind, dtype, tol, tmp_path, monkeypatch):
    """Mixtral and DeepSeek-V2 (softmax routing without renormalisation) sample on transformers'
    PADD routes; DeepSeek-V2 in bf16 against an fp32 reference, hence the looser log-prob bound."""
    spec = _spec()
    monkeypatch.setattr(sys.modules[__name__], "_spec", lambda stock=False: EngineSpec(**{**spec.__dict__, "dtype": dtype}))
    bias = _with_bias(_tiny(kind, tmp_path / "src"), tmp_path / "m", 0.3)
    got = _engine_vs_reference(tmp_path / "m", tmp_path / "m", bias, False, tmp_path / "e")
    assert got["route_agreement"] == 1.0 and got["logprob_max_diff"] < tol, got


def test_a_weight_reload_reproduces_the_new_weights(vllm_student, tmp_path):
    """The sync path: an engine started on one checkpoint, reloaded in place with other weights
    and another bias, computes what transformers computes with the new ones."""
    from transformers import AutoModelForCausalLM

    _with_bias(vllm_student, tmp_path / "old", 0.0)
    model = AutoModelForCausalLM.from_pretrained(vllm_student, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "new0")
    bias = _with_bias(tmp_path / "new0", tmp_path / "new", 0.3)
    got = _engine_vs_reference(tmp_path / "old", tmp_path / "new", bias, False, tmp_path / "w", reload_from=tmp_path / "new")
    assert got["route_agreement"] == 1.0 and got["logprob_max_diff"] < 1e-4, got


def _padd_args(student: Path, steps: int) -> list[str]:
    return ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.mode=padd", "--set", f"train.steps={steps}",
            "--set", "train.log_every=1", "--set", "stage3.prompts_per_step=4", "--set", "train.micro_batch_size=4",
            "--set", "data.max_response_tokens=24", "--set", "stage4.balance_rate=0.5",
            "--set", "eval.num_problems=4", "--set", "eval.max_new_tokens=8", "--set", "logging.wandb_mode=disabled",
            "--set", "logging.progress=false", "--set", "rollout.backend=vllm", "--set", f"models.student={student}"]


def test_a_padd_run_samples_from_vllm_and_a_killed_engine_stops_it(vllm_student, tmp_path):
    """A PADD run (2 students + 1 teacher) sampling from the vLLM engine: the first steps log the
    sampler-trainer log-prob gap of the synced weights with a moving Stage IV bias (fp32: within
    1e-3); then the engine is killed, and the students stop within the timeout naming it."""
    run_dir = tmp_path / "run"
    procs = start_ranks(run_dir, _padd_args(vllm_student, 200) + ["--set", "rollout.vllm_timeout_s=60"])
    metrics = run_dir / "metrics.jsonl"
    killed: list = []

    def kill_after_two_steps():
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not killed:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                pids = subprocess.run(["pgrep", "-f", f"padd_ds.vllm_engine.server.*{run_dir}"], capture_output=True,
                                      text=True).stdout.split()
                for pid in pids:
                    subprocess.run(["kill", "-9", pid])
                killed.append((time.monotonic(), pids))
            time.sleep(0.5)

    watcher = threading.Thread(target=kill_after_two_steps, daemon=True)
    watcher.start()
    try:
        outs = finish_ranks(procs, 600)
    finally:
        reap(procs)
    watcher.join(1)
    assert killed and killed[0][1], outs[0][-3000:]
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert len(rows) >= 2 and len(rows) < 200, outs[0][-3000:]
    for r in rows[:2]:
        assert r["rollout/logprob_diff_max"] < 1e-3, r
    stopped = time.monotonic() - killed[0][0]
    assert stopped < 120, stopped
    assert all(p.returncode != 0 for p in procs[:2]), [p.returncode for p in procs]
    for out in outs[:2]:
        assert "vLLM rollout engine" in out, out[-3000:]


def test_one_engine_per_rank_samples_each_ranks_prompts(vllm_student, tmp_path):
    """rollout.vllm_ranks_per_engine=1: each student rank starts, syncs and samples from its own
    engine; the synced copies agree with the trainer as the shared one does."""
    run_dir = tmp_path / "run"
    outs = finish_ranks(start_ranks(run_dir, _padd_args(vllm_student, 2) + ["--set", "rollout.vllm_ranks_per_engine=1"]),
                        600)
    assert (run_dir / "results.json").exists(), outs[0][-3000:]
    assert sorted(p.name for p in run_dir.glob("vllm_engine.*")) == ["vllm_engine.0", "vllm_engine.1"]
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["rollout/logprob_diff_max"] < 1e-3 for r in rows), rows


def test_a_hung_engine_is_named_within_the_deadline(vllm_student, tmp_path):
    """An engine that stops answering (SIGSTOP) fails the call at its deadline, naming it."""
    import os
    import signal

    from padd_ds.vllm_engine.client import EngineLost

    _with_bias(vllm_student, tmp_path / "m", 0.0)
    proc = EngineProcess.start(_spec(), tmp_path / "m", tmp_path / "w")
    try:
        conn = EngineConnection(proc.address, 0, 3.0, str(proc.log))
        os.kill(proc.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(EngineLost, match=r"the vLLM rollout engine \(.*\) did not answer 'generate' within 3s"):
            conn.call({"op": "generate", "prompts": [[1, 5]], "n": 1, "temperature": 1.0, "top_p": 1.0,
                       "max_tokens": 4, "stop": [2]})
        assert time.monotonic() - t0 < 10
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
        proc.stop()
