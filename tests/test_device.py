"""Every model on its rank's device: the paths that feed a model (rollout, the RL step, Stage I,
the export's checks, teacher scoring replicated and sharded, evaluation) hand it tensors on
the rank's device, never host tensors; models load there; `models.dtype: auto` follows the
device a model computes on."""

import json
import sys

import pytest
import torch

from conftest import REPO, free_port, run_cmd


def test_every_path_feeds_its_model_on_the_ranks_device(toy_build):
    """tests/_device_paths.py: the accelerator reports `meta`, so any host tensor that reaches a
    model is on another device than the rank's, and the hooks name the path."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    p = run_cmd([sys.executable, str(REPO / "tests" / "_device_paths.py")], timeout=300, env=env)
    r = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
    assert r["rank_device"] == "meta" and r["loaded_on"] == ["meta"]
    assert r["paths"] == {name: "ok" for name in r["paths"]}, r["paths"]
    assert len(r["paths"]) == 10
    assert r["host_tensor_caught"]


@pytest.mark.parametrize("device, setting, want", [
    ("cpu", "auto", torch.float32), ("cuda:0", "auto", torch.bfloat16), ("cuda:1", "float32", torch.float32),
    ("cpu", "bfloat16", torch.bfloat16)])
def test_dtype_follows_the_device_the_model_computes_on(device, setting, want):
    from padd_ds.models.loading import resolve_dtype

    assert resolve_dtype(setting, device) == want


class _FakeCuda:
    """DeepSpeed's accelerator on a node with `count` GPUs: records the device each rank takes."""

    def __init__(self, count: int):
        self.count, self.chosen = count, []

    def device_name(self, index=None):
        return "cuda"

    def device_count(self):
        return self.count

    def set_device(self, index):
        if not 0 <= index < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        self.chosen.append(index)


@pytest.mark.parametrize("count, local_ranks, want", [
    (1, [0, 1, 2], [0, 0, 0]),            # 1 teacher + students on a 1-GPU node: all on cuda:0
    (8, list(range(9)), [*range(8), 0]),  # 8 students + a teacher: the teacher shares GPU 0
    (4, [0, 1, 2, 3], [0, 1, 2, 3])])     # one rank per GPU: unchanged
def test_ranks_share_the_nodes_gpus_round_robin(monkeypatch, count, local_ranks, want):
    import deepspeed.accelerator

    from padd_ds.launch import device

    fake = _FakeCuda(count)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: fake)
    for r in local_ranks:
        device.use_local_device(r)
    assert fake.chosen == want
    assert [device.local_device_index(r, count) for r in local_ranks] == want


def test_the_cpu_accelerator_takes_no_device():
    from padd_ds.launch.device import rank_device, use_local_device

    use_local_device(5)  # DS_ACCELERATOR=cpu: nothing to choose, never an error
    assert rank_device() == torch.device("cpu")


def test_a_world_with_more_ranks_on_a_node_than_gpus_is_refused_before_nccl():
    from padd_ds.launch.device import check_ranks_fit_devices

    check_ranks_fit_devices(1, 1, "student")  # 1 student + 1 teacher on one GPU: separate worlds, fine
    check_ranks_fit_devices(8, 8, "student")
    check_ranks_fit_devices(4, 0, "student")  # no GPU: not NCCL's concern
    with pytest.raises(ValueError, match=r"the student world has 2 ranks on this node but it has 1 GPU\(s\); NCCL "
                                         r"cannot run two ranks of one world on one GPU: launch at most 1 student"):
        check_ranks_fit_devices(2, 1, "student")
