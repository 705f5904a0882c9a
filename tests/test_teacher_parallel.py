"""Several teacher ranks: replicas (one full copy per block of students) and one teacher
ZeRO-3-sharded over the teacher ranks. Both must give the same training as one teacher."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import traceback

import pytest
import torch

from conftest import REPO, deepspeed_cmd, free_port, read_results, run_cmd


def _tiny_teacher():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return Qwen3ForCausalLM(cfg).eval()


def _sharded_child(rank: int, port: int, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    try:
        import deepspeed

        from padd_ds.teacher.sharded import ShardedTeacher

        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        from padd_ds.launch.world import release_shm_names

        release_shm_names()
        from padd_ds.launch.bridge import OUT_CLUSTER_ACTS, OUT_HIDDEN
        from test_teacher_outputs import cluster_map

        teacher = ShardedTeacher(_tiny_teacher(), cluster_map=cluster_map(layers=(0, 1)))
        if rank == 0:
            g = torch.Generator().manual_seed(1)
            out = []
            for b in (3, 1):   # an odd batch (uneven slices) and one row (a rank has none)
                ids = torch.randint(0, 211, (b, 10), generator=g)
                lengths = torch.tensor([10, 7, 4][:b])
                o = teacher.score(ids, lengths, 8, outputs=OUT_CLUSTER_ACTS | OUT_HIDDEN)
                out.append((ids, lengths, o.logits.values, o.logits.indices, o.logits.lse, o.cluster_acts, o.hidden))
            teacher.stop()
            q.put((rank, [tuple(t.numpy() for t in row) for row in out]))
        else:  # the forwards of this rank: (decoder tokens, LM head rows); the second batch gives it none
            seen = []
            hooks = [teacher.model.model.embed_tokens.register_forward_hook(
                         lambda m, a, o: seen.append([a[0].numel()])),
                     teacher.model.get_output_embeddings().register_forward_hook(
                         lambda m, a, o: seen[-1].append(a[0].numel() // a[0].shape[-1]))]
            n = teacher.member_loop()
            for h in hooks:
                h.remove()
            q.put((rank, (n, seen)))
    except BaseException as e:  # noqa: BLE001
        q.put((rank, f"ERROR {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))
    q.close()
    q.join_thread()   # flush the queue before leaving without interpreter teardown
    os._exit(0)


def test_two_rank_sharded_teacher_equals_one_rank():
    from padd_ds.teacher.service import TeacherModel

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_sharded_child, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert not isinstance(got[0], str) and not isinstance(got[1], str), got
    # rank 1 scores row 2 (length 4) of the first batch; of the one-row batch it runs one
    # token (ZeRO-3's gathers are collective) and its head sees no row
    assert got[1] == (2, [[10, 4], [1, 0]]), got[1]
    from padd_ds.launch.bridge import OUT_CLUSTER_ACTS, OUT_HIDDEN
    from test_teacher_outputs import cluster_map

    local = TeacherModel(_tiny_teacher(), cluster_map(layers=(0, 1)))
    for arrays in got[0]:
        ids, lengths, values, indices, lse, cluster, hidden = (torch.from_numpy(a) for a in arrays)
        ref = local.score(ids, lengths, 8, outputs=OUT_CLUSTER_ACTS | OUT_HIDDEN)
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
    else:                          # the leader serves both students, the member scores its shards
        assert "served 16 requests" in log and "scored 16 shards" in log, log[-3000:]
