"""Non-finite losses (padd_ds/engine/guard.py): the step is skipped on every student rank, counted,
and a streak of train.max_nonfinite_steps stops the run. The end-to-end run with a corrupted
teacher is in test_nonfinite_run.py."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO, free_port, run_cmd
from padd_ds.config import ConfigError
from padd_ds.recipe import load_config
from padd_ds.validate import validate


def test_guard_on_two_zero3_ranks():
    p = run_cmd([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                 str(free_port()), str(REPO / "tests" / "_guard_engine.py")], timeout=300)
    # Two ranks share the launcher's stdout: their lines may land back to back, so decode each
    # "RESULT {...}" object where it starts rather than line by line.
    dec, out, results, i = json.JSONDecoder(), p.stdout, [], p.stdout.find("RESULT ")
    while i >= 0:
        obj, end = dec.raw_decode(out, i + len("RESULT "))
        results.append(obj)
        i = out.find("RESULT ", end)
    assert sorted(r["rank"] for r in results) == [0, 1], p.stdout[-3000:]
    for r in results:
        # A NaN on one rank skips the step on both; the weights are bit-identical to an engine
        # that only ever saw the clean steps, and the optimiser stepped only for those.
        g1 = r["gas1"]
        assert g1["skipped"] == [False, True, False, True, False] and g1["count"] == 2
        assert g1["same_as_clean"] and g1["finite"] and g1["global_steps"] == [3, 3]
        # With gradient accumulation a bad micro-batch skips its whole step; the clean
        # micro-batch of that step leaves no trace.
        g2 = r["gas2"]
        assert g2["skipped"] == [False, False, False, True, True, True, False, False] and g2["count"] == 2
        assert g2["same_as_clean"] and g2["global_steps"] == [2, 2]
        # The third bad step in a row raises on every rank, naming steps and ranks, in one line.
        s = r["streak"]
        assert s["skipped"] == [True, False, True, True] and s["count"] == 4
        assert s["error"].startswith("non-finite loss in 3 training steps in a row (step 3 on student rank 1; "
                                     "step 4 on student rank 0; step 5 on student ranks 0, 1)")
        assert "train.max_nonfinite_steps=3" in s["error"] and "\n" not in s["error"]
        # Several optimiser steps per training step (stage3.updates_per_batch=2): one bad rollout
        # batch is one step of the streak. Steps 1, 2 bad (4 skips, streak 2), 3 clean, 4 bad,
        # 5 half bad (its clean update ends the streak), 6, 7 bad, 8 bad: the error comes at
        # step 8's first update.
        u = r["updates"]
        assert u["skipped"] == [True] * 4 + [False] * 2 + [True] * 3 + [False] + [True] * 4
        assert u["count"] == 12 and u["error"].startswith(
            "non-finite loss in 3 training steps in a row (step 6 on student rank 0; step 7 on student rank 1; "
            "step 8 on student ranks 0, 1)")


def test_max_nonfinite_steps_is_validated():
    from padd_ds.engine.guard import NonFiniteGuard

    cfg = load_config(None, ["train.max_nonfinite_steps=0"])
    with pytest.raises(ConfigError, match=r"^train.max_nonfinite_steps must be > 0, got 0$"):
        validate(cfg)
    with pytest.raises(ValueError, match="train.max_nonfinite_steps must be >= 1"):
        NonFiniteGuard(0)
    assert load_config(None, []).train.max_nonfinite_steps == 3
