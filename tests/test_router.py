"""The PADD router inside a real ZeRO-3 + AutoEP engine: routes exactly like the HF model in
`learned` mode, reproduces the dense teacher with a decompressed student under the warmup's
uniform router, draws k distinct experts in `uniform_random_topk`, and its bias steers top-k."""

import json
import sys

from conftest import REPO, free_port, run_cmd


def test_padd_router_in_a_zero3_autoep_engine():
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    p = run_cmd([sys.executable, str(REPO / "tests" / "_router_engine.py")], timeout=240, env=env)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["restored"] and r["n_routers"] == 2
    assert r["learned_vs_hf"] < 1e-5                 # same routing as transformers' own router
    assert r["uniform_all_vs_teacher"] < 1e-5        # decompressed x N, weight 1/N each = the teacher
    assert r["scores_rows_sum_to_1"]
    assert r["random_topk_distinct"] and r["random_topk_weights"] == [0.5] and r["random_topk_counts"] == 100
    assert r["layer_top_k"] == [2, 2] and r["layer_top_k_after"] == [2, 2]
    assert r["learned_again_vs_hf"] < 1e-5
    assert r["bias_forces_expert0"]


def test_router_gradients_on_two_ranks_equal_one_process(tmp_path):
    """ZeRO-3 + AutoEP over 2 ranks (experts split, tokens exchanged) gives the PADD router the
    same gradient as one process holding the whole batch."""
    script = str(REPO / "tests" / "_router_grad.py")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    run_cmd([sys.executable, script, str(one)], timeout=240, env=env)
    run_cmd([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
             script, str(two)], timeout=240)
    g1, g2 = json.loads(one.read_text()), json.loads(two.read_text())
    import torch

    assert len(g1) == len(g2) == 2
    for a, b in zip(g1, g2):
        a, b = torch.tensor(a), torch.tensor(b)
        assert a.abs().max() > 1e-4  # the loss really reaches the router
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_router_weights_written_into_a_bf16_engine_survive_optimizer_steps():
    """Stage I's router init writes the gates of a built engine. With bf16 the optimizer owns
    an fp32 master copy and copies it into the model after each step: a write that misses it
    is silently undone by the first step (the GPU recipes' setting)."""
    p = run_cmd([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
                 str(REPO / "tests" / "_router_write.py")], timeout=240)
    r = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
    assert r["dtype"] == "torch.bfloat16", r
    assert r["after_write"] and r["master"] and r["after_steps"], r
