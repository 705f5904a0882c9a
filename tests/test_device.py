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
