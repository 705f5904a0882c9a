"""The run report: ``write_run_report(run_dir)`` -> ``run_dir/report.md`` + ``run_dir/figures/*.png``.

Reads what a run leaves behind - ``metrics.jsonl`` (per-step metrics), ``results.json``
(teacher / student accuracies, history) and, when present, ``routing.json`` (written by
``padd_ds.eval.routing.RoutingLog``) and ``config.yaml`` - and states plainly whether the
student matched its teacher.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from padd_ds.report import plots
from padd_ds.report.metrics import read_jsonl

# Namespaces plotted as "reward / accuracy over training" rather than as training losses.
REWARD_ACCURACY_PREFIXES = ("train/reward", "train/accuracy", "eval/")
TRAINING_PREFIXES = ("train/", "teacher/")
STAGE1_PREFIXES = ("stage1/",)
# Layer-averaged routing scalars (per-layer `routing/layerN/...` would crowd the figure).
ROUTING_CURVE_PREFIXES = ("routing/load_", "routing/drift_", "routing/nmi", "routing/bias", "routing/max_over_mean")


def verdict(teacher: dict | None, student: dict | None) -> str:
    """Did the student match its teacher? Yes when its accuracy is at least the teacher's;
    otherwise say whether the gap is within two standard errors (sampling noise) or not."""
    t, s = plots.accuracy_of(teacher), plots.accuracy_of(student)
    if t is None or s is None:
        return "Unknown: results.json has no teacher and trained-student accuracy to compare."
    nt, ns = int(teacher.get("n") or 0), int(student.get("n") or 0)
    if s >= t:
        return (f"**Yes.** The trained student matched its teacher: accuracy {s:.3f} (n={ns}) vs the "
                f"teacher's {t:.3f} (n={nt})." + (" Both are 0, so this says nothing about the distillation."
                                                   if t == 0 else ""))
    se = math.sqrt(t * (1 - t) / max(nt, 1) + s * (1 - s) / max(ns, 1))
    gap = t - s
    if gap <= 2 * se:
        return (f"**No, but within noise.** The trained student reached {s:.3f} (n={ns}) vs the teacher's "
                f"{t:.3f} (n={nt}); the gap {gap:.3f} is under two standard errors ({2 * se:.3f}), so this sample "
                f"cannot tell them apart.")
    return (f"**No.** The trained student reached {s:.3f} (n={ns}), {gap:.3f} below the teacher's {t:.3f} "
            f"(n={nt}); the gap exceeds two standard errors ({2 * se:.3f}).")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _wandb_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "wandb").glob("*run-*") if p.is_dir()) if (run_dir / "wandb").is_dir() else []


@dataclass
class RunFiles:
    """What a run left behind; ``rows`` are the logged metric rows (the JSONL, else the history
    that results.json keeps when JSONL logging was off)."""

    rows: list[dict]
    results: dict
    routing: dict | None
    cfg: dict


def read_run(run_dir: Path) -> RunFiles:
    """The run's files; FileNotFoundError when the directory is missing or holds nothing to report."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    metrics_path = run_dir / "metrics.jsonl"
    rows = read_jsonl(metrics_path) if metrics_path.is_file() else []
    results = _read_json(run_dir / "results.json") or {}
    routing = _read_json(run_dir / "routing.json")
    cfg = _config(run_dir)
    if not rows and not results and routing is None:
        raise FileNotFoundError(f"{run_dir} has none of metrics.jsonl, results.json, routing.json: nothing to report")
    return RunFiles(rows or results.get("history") or [], results, routing, cfg)


def write_run_report(run_dir: str | os.PathLike, logger=None) -> Path:
    """Make ``run_dir/figures/*.png`` and ``run_dir/report.md`` from the run's files; with a
    ``MetricsLogger`` the figures also go to W&B. Returns the report's path."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    figures = _figures(run, run_dir / "figures")
    md = [*_header(run_dir, run.cfg), *_verdict_section(run.results, figures), *_training_section(run, figures)]
    if run.routing is not None:
        md += _routing_section(run.routing, figures)
    md += _files_section(run_dir)
    report = run_dir / "report.md"
    report.write_text("\n".join(md))
    if logger is not None:
        logger.log_images({f"report/{k}": v for k, v in figures.items()})
    return report


def _figures(run: RunFiles, fig_dir: Path) -> dict[str, Path]:
    """name -> PNG path of every figure that had data."""
    rows = run.rows
    figures = {
        "accuracy": plots.plot_accuracy(run.results, fig_dir / "accuracy.png"),
        "training": plots.plot_curves(rows, TRAINING_PREFIXES, fig_dir / "training.png", "Training"),
        "reward_accuracy": plots.plot_curves(rows, REWARD_ACCURACY_PREFIXES, fig_dir / "reward_accuracy.png",
                                             "Reward and accuracy over training"),
        "routing_curves": plots.plot_curves(rows, ROUTING_CURVE_PREFIXES, fig_dir / "routing_curves.png",
                                            "Routing over training"),
        "stage1": plots.plot_curves(rows, STAGE1_PREFIXES, fig_dir / "stage1.png", "Stage I warmup"),
    }
    if run.routing is not None:
        figures["load_heatmap"] = plots.plot_load_heatmaps(run.routing, fig_dir / "load_heatmap.png")
        figures["drift"] = plots.plot_drift(run.routing, fig_dir / "drift.png")
        figures["specialization"] = plots.plot_specialization(run.routing, fig_dir / "specialization.png")
    return {k: v for k, v in figures.items() if v is not None}


def _header(run_dir: Path, cfg: dict) -> list[str]:
    """Title, when and from where, and the run's main settings."""
    run, models, train = cfg.get("run", {}), cfg.get("models", {}), cfg.get("train", {})
    title = run.get("name") or run_dir.name
    md = [f"# Run report: {title}", "",
          f"Written {datetime.now().strftime('%Y-%m-%d %H:%M')} from `{run_dir}`.", ""]
    if cfg:
        md += ["| setting | value |", "|---|---|",
               f"| mode | {_fmt(train.get('mode'))} |", f"| teacher | `{_fmt(models.get('teacher'))}` |",
               f"| student | `{_fmt(models.get('student'))}` |", f"| steps | {_fmt(train.get('steps'))} |",
               f"| data | {_fmt(cfg.get('data', {}).get('source'))} |", ""]
    return md


def _verdict_section(results: dict, figures: dict[str, Path]) -> list[str]:
    """The verdict, then the held-out accuracies it rests on."""
    md = ["## Did the student match its teacher?", "",
          verdict(results.get("teacher"), results.get("student_after")), ""]
    acc_rows = [(label, results.get(key)) for label, key in (("teacher", "teacher"), ("student before", "student_before"),
                                                             ("student after", "student_after"))]
    if any(plots.accuracy_of(r) is not None for _, r in acc_rows):
        md += ["| model | accuracy | n |", "|---|---|---|"]
        md += [f"| {label} | {plots.accuracy_of(r):.3f} | {r.get('n', '-')} |" for label, r in acc_rows
               if plots.accuracy_of(r) is not None]
        md += [""]
    if "accuracy" in figures:
        md += ["![held-out accuracy](figures/accuracy.png)", ""]
    return md


def _training_section(run: RunFiles, figures: dict[str, Path]) -> list[str]:
    """First and last value of every logged metric, the curves, the export check."""
    md = ["## Training", ""]
    logged = run.rows
    series = plots.numeric_series(logged, TRAINING_PREFIXES + REWARD_ACCURACY_PREFIXES + ROUTING_CURVE_PREFIXES
                                  + STAGE1_PREFIXES)
    if logged:
        md += [f"{len(logged)} logged rows, the last at step {logged[-1].get('step')}.", ""]
    if series:
        md += ["| metric | first (step) | last (step) |", "|---|---|---|"]
        md += [f"| {k} | {_fmt(ys[0])} ({xs[0]}) | {_fmt(ys[-1])} ({xs[-1]}) |" for k, (xs, ys) in sorted(series.items())]
        md += [""]
    for key, caption in (("stage1", "Stage I warmup"), ("training", "training curves"),
                         ("reward_accuracy", "reward and accuracy"), ("routing_curves", "routing metrics over training")):
        if key in figures:
            md += [f"![{caption}](figures/{figures[key].name})", ""]
    if "export_max_abs_logit_diff" in run.results:
        md += [f"Exported HF checkpoint reproduces the engine's logits to "
               f"{run.results['export_max_abs_logit_diff']:.2e} (max |difference|).", ""]
    return md


def _files_section(run_dir: Path) -> list[str]:
    """Links to the run's files and its W&B runs."""
    md = ["## Files", ""]
    for name in ("metrics.jsonl", "results.json", "routing.json", "config.yaml", "ds_config.json", "hf", "checkpoints"):
        if (run_dir / name).exists():
            md.append(f"- [`{name}`]({name})")
    for d in _wandb_dirs(run_dir):
        md.append(f"- W&B run: [`{d.relative_to(run_dir)}`]({d.relative_to(run_dir)})"
                  + (" (offline; upload with `wandb sync`)" if d.name.startswith("offline-") else ""))
    md.append("")
    return md


def _routing_section(routing: dict, figures: dict[str, Path]) -> list[str]:
    """Per-layer load balance and specialization, router drift, the routing figures."""
    snaps = routing.get("snapshots") or []
    md = ["## Routing", ""]
    if not snaps:
        return md + ["routing.json holds no snapshots.", ""]
    first, last = snaps[0], snaps[-1]
    md += [f"{len(snaps)} snapshots (steps {first['step']} to {last['step']}), {routing.get('num_experts')} experts, "
           f"top-{routing.get('top_k')}. Load CV: 0 is perfectly balanced; entropy: 1 is uniform.", "",
           "| layer | load CV (first -> last) | entropy (last) | max/mean load (last) | NMI with subject (last) |",
           "|---|---|---|---|---|"]
    before = {x["layer"]: x for x in first["layers"]}
    for x in last["layers"]:
        b = before.get(x["layer"], {})
        md.append(f"| {x['layer']} | {_fmt(b.get('cv'))} -> {_fmt(x['cv'])} | {_fmt(x['entropy'])} | "
                  f"{_fmt(x['max_over_mean'])} | {_fmt(x.get('nmi'))} |")
    md.append("")
    if last.get("drift"):
        d = last["drift"]
        md += [f"Router drift at step {last['step']} (per token, vs the previous snapshot): mean {d['mean']:.4g}, "
               f"p90 {d['p90']:.4g}, max {d['max']:.4g} over {d['tokens']} tokens.", ""]
    for key, caption in (("load_heatmap", "expert load per layer"), ("drift", "router drift"),
                         ("specialization", "expert specialization")):
        if key in figures:
            md += [f"![{caption}](figures/{figures[key].name})", ""]
    prov = routing.get("provenance")
    if prov and prov.get("layers"):
        md += _provenance_table(prov, last)
    return md


def _provenance_table(prov: dict, last: dict) -> list[str]:
    """Which teacher layer and how many neurons each Stage I expert came from, beside its final load."""
    loads = {x["layer"]: x["fraction"] for x in last["layers"]}
    md = ["### Expert provenance (Stage I)", "",
          f"Experts were cut from the teacher `{prov.get('teacher')}`: expert j of a layer holds neuron cluster j "
          "of the mapped teacher layer.", "",
          "| student layer | teacher layer | neurons per expert | final load fraction per expert |",
          "|---|---|---|---|"]
    for layer in prov["layers"]:
        frac = loads.get(layer["student_layer"])
        md.append(f"| {layer['student_layer']} | {layer['teacher_layer']} | "
                  f"{', '.join(str(e['neurons']) for e in layer['experts'])} | "
                  f"{', '.join(f'{f:.3f}' for f in frac) if frac else '-'} |")
    md.append("")
    return md
