"""What a run prints: a progress bar while training, the Stage I table, the accuracy table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from padd_ds.config import PaddConfig
from padd_ds.launch.world import World


class TrainingProgress:
    SHOWN = {"train/kd_loss": "kd", "train/lm_loss": "lm", "train/reward": "reward", "routing/drift_mean": "drift",
             "routing/load_cv": "load cv", "teacher/wait_fraction": "wait"}

    def __init__(self, total: int, label: str):
        self.p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[info]}"))
        self.task = self.p.add_task("train", total=total, info="")
        self.p.start()

    def update(self, step: int, row: dict) -> None:
        self.p.update(self.task, completed=step,
                      info=" ".join(f"{short} {row[k]:.3f}" for k, short in self.SHOWN.items() if k in row))

    def close(self) -> None:
        self.p.stop()


class _NoProgress:
    def update(self, step: int, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(cfg: PaddConfig, world: World):
    """A bar on the main student rank when logging.progress is on; a silent stand-in elsewhere."""
    if world.is_main and cfg.logging.progress:
        return TrainingProgress(cfg.train.steps, cfg.train.mode)
    return _NoProgress()


def print_stage1(report: dict) -> None:
    t = Table(title=f"Stage I on D_D (router init: {report['router_init']})")
    for col in ("", "agreement top-1", "agreement top-k", "path KL", "KD loss"):
        t.add_column(col, justify="right")
    for name in ("before", "after_init", "after_warmup"):
        r = report[name]
        t.add_row(name.replace("_", " "), f"{r['agreement_top1']:.3f}", f"{r['agreement_topk']:.3f}",
                  f"{r['path_kl']:.3f}", f"{r['kd_loss']:.4f}")
    Console().print(t)


def print_table(result: dict) -> None:
    t = Table(title="Held-out accuracy (greedy pass@1)")
    t.add_column("model")
    t.add_column("accuracy", justify="right")
    t.add_column("n", justify="right")
    for name, key in (("teacher", "teacher"), ("student (before)", "student_before"),
                      ("student (after)", "student_after")):
        r = result[key]
        if r is not None:  # eval.references=false: only the trained student
            t.add_row(name, f"{r['accuracy']:.3f}", str(r["n"]))
    Console().print(t)
    h = result["history"]
    for key in ("train/kd_loss", "train/reward"):
        if h and key in h[0]:
            print(f"{key}: {h[0][key]:.4f} (step {h[0]['step']}) -> {h[-1][key]:.4f} (step {h[-1]['step']})")
    print(f"export: max |logit diff| vs the engine {result['export_max_abs_logit_diff']:.2e}, routing fidelity "
          f"{result['export_routing_fidelity']:.4f}{' (Stage IV bias folded)' if result['export_bias_folded'] else ''}",
          flush=True)
    exact = result.get("export_exact_routing")
    if exact is not None:
        acc = exact["student_after"]
        print(f"export with load_exact_routing: max |logit diff| {exact['max_abs_logit_diff']:.2e}, routing fidelity "
              f"{exact['routing_fidelity']:.4f}" + (f", accuracy {acc['accuracy']:.3f}" if acc else ""), flush=True)
