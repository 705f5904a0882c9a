"""rollout.backend=hf_gathered against hf, on 2 ZeRO-3 + AutoEP ranks with a non-zero Stage IV
bias (tests/_gathered_rollouts.py): the same greedy tokens, the same logits, and a number of
collectives per rollout phase that does not grow with the tokens generated; and a whole PADD
run that trains exactly as with engine rollouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, finish_ranks, start_ranks, two_sgd_ranks


@pytest.fixture(scope="module")
def ranks(toy_build, tmp_path_factory):
    return two_sgd_ranks("_gathered_rollouts.py", tmp_path_factory.mktemp("gathered"), timeout=600)


def test_gathered_copy_generates_the_engines_greedy_tokens(ranks):
    for r in ranks:
        assert r["gathered_greedy"] == r["hf_greedy"], r["rank"]


def test_gathered_copy_computes_the_engines_logits_with_its_router_bias(ranks):
    for r in ranks:
        assert r["logits_max_diff"] < 1e-4, r
        assert r["bias_moves_logits"] > 1e-2, r  # the bias changes routes: the match above is not vacuous


def test_routing_replay_makes_the_engine_compute_with_the_replayed_experts(ranks):
    for r in ranks:
        assert r["replay_max_diff"] == 0.0, r
        assert r["no_replay_diff"] > 1e-2, r  # without the replay the unbiased engine routes otherwise


def test_captured_routes_agree_with_the_engine_only_under_padd_routing(ranks):
    """A gathered copy that routes like PaddRouter samples on the trainer's routes; one that
    ignores the Stage IV bias (a stock transformers or vLLM MoE) does not."""
    for r in ranks:
        assert r["agreement_padd"] == 1.0, r
        assert r["agreement_stock"] < 0.99, r


def test_gathered_collectives_do_not_grow_with_generated_tokens(ranks):
    for r in ranks:
        hf4, hf12 = r["hf"]
        g4, g12 = r["hf_gathered"]
        assert hf12 > hf4, r  # the engine gathers (and exchanges tokens) at every decode step
        assert g4 == g12, r
        assert g4 < hf4, r


def _padd_run(run_dir: Path, backend: str, *extra: str) -> list[dict]:
    args = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.mode=padd", "--set", "train.steps=4",
            "--set", "train.log_every=1", "--set", "stage3.prompts_per_step=4", "--set", "train.micro_batch_size=4",
            "--set", "data.max_response_tokens=24", "--set", "stage4.balance_rate=0.5",
            "--set", "eval.num_problems=4", "--set", "eval.max_new_tokens=8", "--set", "logging.wandb_mode=disabled",
            "--set", "logging.progress=false", "--set", f"rollout.backend={backend}", *extra]
    outs = finish_ranks(start_ranks(run_dir, args, world_size=3), 600)
    assert (run_dir / "results.json").exists(), outs[0][-3000:]
    return json.loads((run_dir / "results.json").read_text())["history"]


def test_a_padd_run_with_gathered_rollouts_trains_exactly_like_one_with_engine_rollouts(toy_build, tmp_path):
    """The whole loop, 4 RL steps with a Stage IV bias moving every step: the gathered copy
    samples the same tokens from the same per-rank RNG, so every logged number agrees but timing
    and the sampler-trainer log-prob gap, which each engine's decode rounds its own way (fp32:
    < 1e-4); with routing replay on too. The engine run also evaluates every 2 steps
    (eval.every, both ranks decoding the held-out problems in step): that changes no number of
    its training. Both are issue 17's control arm (stage3.shuffle_advantages) and log how far
    each step moved the policy (stage3.measure_movement)."""
    timing = {"time", "train/elapsed_s", "train/tokens_per_s", "train/generate_fraction", "teacher/wait_fraction"}
    control = ("--set", "stage3.shuffle_advantages=true", "--set", "stage3.measure_movement=true")
    # With routing replay too: the routes agree everywhere, so replaying them changes nothing.
    got = _padd_run(tmp_path / "gathered", "hf_gathered", "--set", "rollout.route_replay=true", *control)
    want = _padd_run(tmp_path / "hf", "hf", "--set", "eval.every=2", *control)
    assert len(got) == 4
    same = lambda h: {k: v for k, v in h.items() if k not in timing and not k.startswith(("rollout/", "eval/"))}
    assert [same(h) for h in got] == [same(h) for h in want]
    assert all(h["train/policy_move"] > 1e-4 for h in got), got
    assert ["eval/heldout_acc" in h for h in want] == [False, True, False, True]
    assert all(0 <= h["eval/heldout_acc"] <= 1 for h in want[1::2]) and not any("eval/heldout_acc" in h for h in got)
    clock = [h["train/elapsed_s"] for h in want]
    assert all(b > a > 0 for a, b in zip(clock, clock[1:])), clock
    for h in got + want:
        assert h["rollout/logprob_diff_max"] < 1e-4 and h["rollout/route_agreement"] == 1.0, h


def test_truncated_is_runs_on_the_samplers_log_probs(toy_build, tmp_path):
    """stage3.tis_cap through the whole loop: the weights are the sampler/trainer ratios, ~1 here,
    at a sampling temperature of 0.7, where the trainer scores at 0.7 too. At lr 1e-12 the
    policy does not move (stage3.measure_movement: the test above's movement is the update's)."""
    got = _padd_run(tmp_path, "hf_gathered", "--set", "stage3.tis_cap=2", "--set", "train.steps=2",
                    "--set", "rollout.temperature=0.7", "--set", "train.lr=1e-12", "--set", "stage3.measure_movement=true")
    assert len(got) == 2 and all(abs(h["train/tis_weight"] - 1) < 1e-4 for h in got), got
    assert all(h["rollout/logprob_diff_max"] < 1e-4 for h in got), got
    assert all(h["train/policy_move"] < 1e-6 for h in got), got
