"""Several teacher ranks: replicas (one full copy per block of students) and one teacher
ZeRO-3-sharded over the teacher ranks. Both must give the same training as one teacher."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from conftest import REPO, deepspeed_cmd, read_results, run_cmd, spawn_gloo_ranks


def _tiny_teacher():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return Qwen3ForCausalLM(cfg).eval()


def _sharded_rank(rank: int, path: str | None = None):
    """One rank of a 2-rank sharded teacher: built from the whole model, or (`path`) loaded
    straight into its partitions from that checkpoint, as the teacher ranks load it."""
    from padd_ds.launch.bridge import OUT_CLUSTER_ACTS, OUT_HIDDEN
    from padd_ds.teacher.sharded import ShardedTeacher
    from test_teacher_outputs import cluster_map

    if path is None:
        model, loaded = _tiny_teacher(), None
    else:
        from padd_ds.models.loading import load_partitioned_causal_lm
        from padd_ds.teacher.sharded import zero3_config

        model = load_partitioned_causal_lm(path, zero3_config(False), "float32")
        # what this rank holds of each weight right after loading: its partition only
        loaded = sorted({(p.ds_tensor.numel(), p.ds_numel, p.numel()) for p in model.parameters()})
    teacher = ShardedTeacher(model, cluster_map=cluster_map(layers=(0, 1)))
    if rank == 0:
        g = torch.Generator().manual_seed(1)
        # round 1: one request of 3 rows (rank 1 has none); round 2: two requests packed, the
        # second (1 row of length 6, scored from position 2: a rollout's response) wholly on rank 1
        reqs = [(torch.randint(0, 211, (b, L), generator=g), torch.tensor(lens), seed, start)
                for b, L, lens, seed, start in ((3, 10, [10, 7, 4], 11, None), (2, 8, [8, 5], 12, None),
                                                (1, 10, [6], 13, torch.tensor([2])))]
        outs = [teacher.score(*reqs[0][:2], 8, seed=reqs[0][2], outputs=OUT_CLUSTER_ACTS | OUT_HIDDEN)]
        outs += teacher.score_many(reqs[1:], 8, outputs=OUT_CLUSTER_ACTS | OUT_HIDDEN)
        teacher.stop()
        out = [(ids, lengths, torch.zeros(len(ids), dtype=torch.int64) if start is None else start, o.logits.values,
                o.logits.indices, o.logits.lse, o.cluster_acts, o.hidden)
               for (ids, lengths, _, start), o in zip(reqs, outs)]
        return [tuple(t.numpy() for t in row) for row in out], loaded
    seen = []  # the forwards of this rank: (decoder tokens, LM head rows)
    hooks = [teacher.model.model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append([a[0].numel()])),
             teacher.model.get_output_embeddings().register_forward_hook(
                 lambda m, a, o: seen[-1].append(a[0].numel() // a[0].shape[-1]))]
    rounds = teacher.member_loop()
    for h in hooks:
        h.remove()
    return rounds, seen, loaded


@pytest.mark.parametrize("source", ["whole", "checkpoint"])
def test_two_rank_sharded_teacher_equals_one_rank(tmp_path, source):
    """Either way in, the same answers as one whole teacher; from a checkpoint (the teacher
    ranks' way) no rank ever held more than its half of any weight."""
    from padd_ds.teacher.service import TeacherModel

    path = None
    if source == "checkpoint":
        path = str(tmp_path / "teacher")
        _tiny_teacher().save_pretrained(path)
    got = spawn_gloo_ranks(_sharded_rank, path)
    # rank 1: in round 1 one token (ZeRO-3's gathers are collective) and no head row; in round 2
    # the packed second request whole (10 tokens, 6 real, 4 of them scored); 2 rounds, 1 request of its own
    assert got[1][:2] == ((2, 1), [[1, 0], [10, 4]]), got[1]
    if path is not None:  # (partition, full size, what the parameter itself holds): half, and nothing
        for loaded in (got[0][1], got[1][2]):
            assert loaded and all(part == (full + 1) // 2 and held == 0 for part, full, held in loaded), loaded
    from padd_ds.launch.bridge import OUT_CLUSTER_ACTS, OUT_HIDDEN
    from test_teacher_outputs import cluster_map

    local = TeacherModel(_tiny_teacher(), cluster_map(layers=(0, 1)))
    assert len(got[0][0]) == 3
    for arrays in got[0][0]:  # every answer is the replica's, whichever rank and round scored it
        ids, lengths, start, values, indices, lse, cluster, hidden = (torch.from_numpy(a) for a in arrays)
        ref = local.score(ids, lengths, 8, outputs=OUT_CLUSTER_ACTS | OUT_HIDDEN, scored_from=start)
        assert torch.equal(indices, ref.logits.indices)
        torch.testing.assert_close(values, ref.logits.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse, ref.logits.lse, atol=1e-5, rtol=0)
        torch.testing.assert_close(cluster, ref.cluster_acts, atol=1e-5, rtol=0)
        torch.testing.assert_close(hidden, ref.hidden, atol=1e-5, rtol=0)


COMMON = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.steps=8", "--set", "train.log_every=2",
          "--set", "eval.num_problems=8", "--set", "logging.wandb_mode=disabled", "--set", "logging.progress=false",
          "--set", "topology.timeout_s=120", "--set", "teacher.request_timeout_s=60"]


@pytest.fixture(scope="module")
def one_process(toy_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("colocated")
    run_cmd([sys.executable, str(REPO / "train.py"), *COMMON, "--set", f"run.output_dir={out}",
             "--set", "topology.colocated=true", "--set", "deepspeed.expert_parallel_size=1",
             "--set", "train.micro_batch_size=16"], timeout=300)
    return read_results(out)


@pytest.mark.parametrize("parallel", ["replicas", "zero3"])
def test_two_teacher_ranks_train_like_one(one_process, tmp_path, parallel):
    p = run_cmd(deepspeed_cmd(4, *COMMON, "--set", f"run.output_dir={tmp_path}", "--set", "train.micro_batch_size=8",
                              "--set", "topology.teacher_ranks=2", "--set", f"teacher.parallel={parallel}"),
                timeout=420)
    res = read_results(tmp_path)
    kd, want = ([h["train/kd_loss"] for h in r["history"]] for r in (res, one_process))
    assert kd == pytest.approx(want, rel=2e-3), (kd, want)
    # The teacher's reference row: the first replica alone, or the sharded teacher's ranks
    # each on half of the problems.
    assert res["teacher"]["n"] == 8 and res["teacher"]["accuracy"] == one_process["teacher"]["accuracy"]
    log = p.stdout + p.stderr
    if parallel == "replicas":     # each student has its own teacher: 8 requests each
        assert log.count("served 8 requests") == 2, log[-3000:]
    else:  # the leader serves both students, packing what has arrived: the member scores its share
        served = re.search(r"served 16 requests, \d+ tokens in (\d+) forwards", log)
        member = re.search(r"scored (\d+) requests in (\d+) rounds with the leader", log)
        assert served and member and int(member[2]) == int(served[1]) <= 16, log[-3000:]
        assert 16 - int(member[1]) == int(served[1]), log[-3000:]  # each round: 1 request of rank 0
