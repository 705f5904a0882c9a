"""Metrics sinks: a JSONL file always, W&B when available (offline without an API key).

Only the main student rank logs. Metric names are namespaced (`train/`, `teacher/`,
`routing/`, `eval/`) so dashboards group them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def wandb_mode(requested: str) -> str:
    """`auto` goes online only when a key is configured; a cluster without one still logs."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]  # the user's W&B setting wins over our guess
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, config: dict, enabled: bool, project: str = "padd-ds",
                 mode: str = "auto", run_name: str | None = None, jsonl: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = (self.run_dir / "metrics.jsonl").open("a")
        mode = wandb_mode(mode)
        if mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(project=project, name=run_name, config=config, mode=mode,
                                         dir=str(self.run_dir), reinit="finish_previous")
            except Exception as e:  # noqa: BLE001 - W&B must never take a training run down
                print(f"warning: W&B disabled ({type(e).__name__}: {e})")
                self._wandb = None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, bool)) else v)
                 for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
            self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def summary(self, metrics: dict) -> None:
        if self.enabled and self._wandb is not None:
            for k, v in metrics.items():
                self._wandb.summary[k] = v

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
