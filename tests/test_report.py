"""Reporting: a toy training run leaves the W&B offline run, the JSONL metrics, real figures and a
report that states whether the student matched its teacher; the logger's rules; the verdict."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, free_port
from padd_ds.report.metrics import MetricsLogger, read_jsonl, wandb_mode
from padd_ds.report.report import verdict, write_run_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def toy_run(toy_build, tmp_path_factory):
    """4 steps of the real trainer (one process, colocated teacher), W&B left to `auto`
    without an API key, then routing snapshots of the student before and after."""
    from padd_ds.data.math import load_problems
    from padd_ds.eval.routing import RoutingLog, collect_routing, routing_metrics
    from padd_ds.models.loading import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("report_run")
    # No WANDB_MODE and no WANDB_API_KEY: `auto` must choose offline by itself.
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    cmd = [sys.executable, str(REPO / "train.py"), "--recipe", str(REPO / "recipes" / "toy_cpu.yaml"),
           "--set", "train.steps=4", "--set", "train.log_every=2", "--set", "eval.num_problems=8",
           "--set", "eval.max_new_tokens=24", "--set", "logging.progress=false",
           "--set", "logging.wandb_mode=auto", "--set", "topology.colocated=true",
           "--set", "deepspeed.expert_parallel_size=1", "--set", f"run.output_dir={out}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                       env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
                            "MASTER_PORT": str(free_port())})  # not the default 29500 another run may hold
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "W&B disabled" not in p.stdout + p.stderr
    problems = load_problems("math500", limit=16)
    tok = load_tokenizer(str(out / "hf"))
    log = RoutingLog(out / "routing.json")
    for step, model_dir in ((0, toy_build.student_dir), (4, out / "hf")):
        entry = log.add(step, collect_routing(load_causal_lm(str(model_dir), "float32"), tok, problems,
                                              max_tokens_per_problem=128))
        assert set(routing_metrics(entry, entry["drift"])) >= {"routing/load_cv", "routing/nmi"}
    return out, write_run_report(out)


def test_run_leaves_wandb_offline_run_and_jsonl(toy_run):
    out, _ = toy_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no wandb dir"
    data = list(runs[0].glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    assert all(k.split("/")[0] in ("train", "teacher") for r in rows for k in r if k not in ("step", "time"))


def test_figures_are_real_images(toy_run):
    import matplotlib.image

    out, _ = toy_run
    names = {p.name for p in (out / "figures").glob("*.png")}
    assert {"accuracy.png", "training.png", "load_heatmap.png", "drift.png", "specialization.png"} <= names
    for name in names:
        path = out / "figures" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert np.ptp(img[..., :3]) > 0.5, f"{name} is (nearly) blank"


def test_report_links_figures_and_states_the_verdict(toy_run):
    out, report = toy_run
    text = report.read_text()
    results = json.loads((out / "results.json").read_text())
    for png in (out / "figures").glob("*.png"):
        assert f"(figures/{png.name})" in text
    assert "## Did the student match its teacher?" in text
    line = text.split("## Did the student match its teacher?")[1].strip().splitlines()[0]
    assert line.startswith(("**Yes.**", "**No.**", "**No, but within noise.**"))
    assert f"{results['student_after']['accuracy']:.3f}" in line and f"{results['teacher']['accuracy']:.3f}" in line
    assert re.search(r"\| student after \| [0-9.]+ \| 8 \|", text)
    assert "offline-run-" in text and "wandb sync" in text
    assert "## Routing" in text and "| 0 |" in text


@pytest.mark.parametrize("teacher, student, start", [
    ({"accuracy": 0.90, "n": 200}, {"accuracy": 0.95, "n": 200}, "**Yes.**"),
    ({"accuracy": 0.50, "n": 10}, {"accuracy": 0.40, "n": 10}, "**No, but within noise.**"),  # 2 s.e. = 0.44
    ({"accuracy": 0.90, "n": 1000}, {"accuracy": 0.80, "n": 1000}, "**No.**"),  # 2 s.e. = 0.03
    (None, {"accuracy": 0.8, "n": 5}, "Unknown"),
])
def test_verdict(teacher, student, start):
    assert verdict(teacher, student).startswith(start)


def test_metrics_logger_rules(tmp_path, monkeypatch):
    import torch

    logger = MetricsLogger(tmp_path, {"a": 1}, enabled=True, mode="disabled")
    logger.log({"train/loss": torch.tensor(0.5), "eval/acc": 1, "routing/loads": [0.5, 0.5]}, step=3)
    with pytest.raises(ValueError, match="namespace"):
        logger.log({"loss": 1.0}, step=4)
    logger.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["train/loss"] == 0.5 and rows[0]["routing/loads"] == [0.5, 0.5]
    assert not (tmp_path / "wandb").exists()
    MetricsLogger(tmp_path / "off", {}, enabled=False).log({"loss": 1}, 0)  # other ranks: no-op
    assert not (tmp_path / "off").exists()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online" and wandb_mode("disabled") == "disabled"


def test_report_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        write_run_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n{"step": 3, "tr')
    report = write_run_report(tmp_path)  # a torn last line (killed run) is skipped
    assert "2 logged rows" in report.read_text() and (tmp_path / "figures" / "training.png").is_file()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        write_run_report(tmp_path)


def test_wandb_keeps_every_stage_s_steps(tmp_path):
    """Stage I's warmup and the training loop both count steps from 1; W&B drops a row whose
    step is below the last one it saw, unless each namespace has its own step metric."""
    script = ("import sys\nfrom padd_ds.report.metrics import MetricsLogger\n"
              "lg = MetricsLogger(sys.argv[1], {}, enabled=True, mode='offline')\n"
              "for s in (1, 2, 3): lg.log({'stage1/warmup_kd_loss': 1.0 / s}, s)\n"
              "for s in (1, 2): lg.log({'train/kd_loss': 0.5 / s}, s)\n"
              "lg.close()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_MODE")}
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=env, stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "W&B disabled" not in out, out[-3000:]
    assert "less than the current step" not in out, out[-3000:]
    assert re.search(r"train/step 2\b", out), out[-3000:]  # W&B's run summary: both training rows kept
