"""Metrics sinks: a JSONL file always, W&B when available (offline without an API key), and
progress bars for long work.

Only the main student rank logs (``enabled``). Metric names are namespaced (``train/``,
``teacher/``, ``routing/``, ``eval/``, ``stage1/``) so dashboards and the run report group
them; an unnamespaced name is a bug caught at the first ``log``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

NAMESPACES = ("train", "teacher", "rollout", "routing", "eval", "stage1")


def wandb_mode(requested: str) -> str:
    """`auto` goes online only when a key is configured; a cluster without one still logs."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]  # the user's W&B setting wins over our guess
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def check_names(metrics: dict) -> None:
    bad = [k for k in metrics if not isinstance(k, str) or k.split("/", 1)[0] not in NAMESPACES or "/" not in k]
    if bad:
        raise ValueError(f"metric names {bad} need a namespace prefix, one of {[n + '/' for n in NAMESPACES]}")


def _scalar(v):
    """Tensors and numpy scalars as Python numbers; lists and dicts stay (JSONL only)."""
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) or hasattr(v, "__float__"):
        v = float(v)
        return v if math.isfinite(v) else None
    return v


class MetricsLogger:
    """``log(metrics, step)`` to ``run_dir/metrics.jsonl`` and W&B (config logged at start).

    W&B mode ``auto``: online with ``WANDB_API_KEY``, else offline into ``run_dir/wandb``
    (``wandb sync`` uploads it later). Any W&B failure, at start or mid-run (its service
    process dies, e.g. torn down by a launcher), is one warning and disables W&B; the JSONL
    goes on. Each namespace's step is its own W&B step metric (``train/step``...): Stage I's
    warmup and the training loop both count from 1, and W&B drops a step lower than the last."""

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
                for ns in NAMESPACES:
                    self._wandb.define_metric(f"{ns}/*", step_metric=f"{ns}/step")
            except Exception as e:  # noqa: BLE001 - W&B must never take a training run down
                self._wandb_failed(e)

    @property
    def wandb_run(self):
        return self._wandb

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        check_names(metrics)
        clean = {k: _scalar(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
            self._jsonl.flush()
        if self._wandb is not None:
            data = {k: v for k, v in clean.items() if isinstance(v, (int, float))}
            data.update({f"{ns}/step": step for ns in {k.split("/", 1)[0] for k in clean}})
            self._guarded(lambda run: run.log(data))

    def summary(self, metrics: dict) -> None:
        if self.enabled and self._wandb is not None:
            self._guarded(lambda run: run.summary.update({k: _scalar(v) for k, v in metrics.items()}))

    def log_images(self, images: dict[str, str | os.PathLike]) -> None:
        """Figures (name -> PNG path) to W&B; the JSONL keeps only scalars."""
        if self.enabled and self._wandb is not None:
            import wandb

            self._guarded(lambda run: run.log({k: wandb.Image(str(p)) for k, p in images.items()}))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._guarded(lambda run: run.finish())
            self._wandb = None

    def _guarded(self, call: Callable) -> None:
        try:
            call(self._wandb)
        except Exception as e:  # noqa: BLE001 - a dead W&B service must not stop training or be blamed for a stop
            self._wandb_failed(e)

    def _wandb_failed(self, e: BaseException) -> None:
        print(f"padd-ds: warning: W&B disabled ({type(e).__name__}: {e}); metrics continue in "
              f"{self.run_dir / 'metrics.jsonl'}", file=sys.stderr, flush=True)
        self._wandb = None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (a killed run) is skipped, others are errors."""
    path = Path(path)
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (elapsed, remaining) for long work; yields ``advance(n)``.
    Pass ``enabled=False`` on all ranks but the main one."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)
