"""bench/rollout_engines.py --quick end to end (a 2-rank ZeRO-3 + AutoEP job it launches itself):
the last line's format, and the gathered copy's log-probs after an optimizer step equal to the
trainer's within 1e-3 (the weight sync picked up the new weights), and its routes the
trainer's on at least 99.9% of (token, layer) pairs."""

from __future__ import annotations

import re
import sys

from conftest import REPO, run_cmd

LAST = re.compile(r"ROLLOUT hf_tok_s=(?P<hf>[0-9.]+) gathered_tok_s=(?P<ga>[0-9.]+) vllm_tok_s=n/a "
                  r"logprob_max_abs_diff=(?P<d>[0-9.e+-]+) route_agreement=(?P<r>[0-9.]+) "
                  r"gathered_over_hf=(?P<ratio>[0-9.]+)")  # the test toy's head_dim leaves vLLM out (CPU)


def test_quick_bench_reports_throughput_and_synced_logprobs(toy_build):
    p = run_cmd([sys.executable, str(REPO / "bench" / "rollout_engines.py"), "--quick", "--build", "test"], timeout=300)
    last = p.stdout.strip().splitlines()[-1]
    m = LAST.fullmatch(last)
    assert m, last
    hf, ga = float(m["hf"]), float(m["ga"])
    assert hf > 0 and ga > 0, last
    assert abs(float(m["ratio"]) - ga / hf) < 2e-3 * ga / hf + 1e-3, last
    assert float(m["d"]) <= 1e-3, last
    assert float(m["r"]) >= 0.999, last
    assert "vllm         not run: the toy student's head_dim 16" in p.stdout, p.stdout[-2000:]
    moved = re.search(r"trainer log-probs moved by max ([0-9.e+-]+)", p.stdout)
    assert moved and float(moved[1]) > 1e-2, p.stdout[-2000:]  # the step changed the weights: the sync is tested
