"""Figures of a run: metric curves, accuracy bars, expert-load heatmaps, router drift, expert
specialization. Each function writes one PNG and returns its path (None when it has no data).

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot: no global
state, no display needed, safe inside a training process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110  # sharp in a markdown viewer, ~50-150 kB per figure


def _figure(rows: int, cols: int, w: float = 4.2, h: float = 3.0) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(w * cols, h * rows), dpi=DPI, layout="constrained")  # room for titles and colorbars
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(rows, cols)
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, n)
    return math.ceil(n / cols), cols


def numeric_series(rows: list[dict], prefixes: tuple[str, ...]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) for every numeric metric whose name starts with one of ``prefixes``."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in rows:
        step = r.get("step")
        if step is None:
            continue
        for k, v in r.items():
            if k.startswith(prefixes) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs, ys = series.setdefault(k, ([], []))
                xs.append(step)
                ys.append(v)
    return series


def plot_curves(rows: list[dict], prefixes: tuple[str, ...], path: str | Path, title: str,
                max_panels: int = 16) -> Path | None:
    """One panel per metric (name starting with one of ``prefixes``) against the step."""
    series = numeric_series(rows, prefixes)
    if not series:
        return None
    keys = sorted(series)[:max_panels]
    nr, nc = _grid(len(keys))
    fig, axes = _figure(nr, nc)
    for ax, k in zip(axes.flat, keys):
        xs, ys = series[k]
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, lw=1.5)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def plot_accuracy(results: dict[str, Any], path: str | Path) -> Path | None:
    """Bars of held-out accuracy: teacher, student before, student after (with binomial 95% CIs)."""
    names, accs, errs = [], [], []
    for label, key in (("teacher", "teacher"), ("student before", "student_before"), ("student after", "student_after")):
        r = results.get(key)
        acc = accuracy_of(r)
        if acc is None:
            continue
        n = max(1, int(r.get("n", 1)))
        names.append(label)
        accs.append(acc)
        errs.append(1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / n))
    if not names:
        return None
    fig, axes = _figure(1, 1, w=5.0, h=3.4)
    ax = axes[0, 0]
    colors = {"teacher": "#4c72b0", "student before": "#bbbbbb", "student after": "#dd8452"}
    bars = ax.bar(names, accs, yerr=errs, capsize=4, color=[colors[n] for n in names])
    for b, a in zip(bars, accs):
        ax.text(b.get_x() + b.get_width() / 2, a + 0.02, f"{a:.3f}", ha="center", fontsize=9)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy (greedy pass@1)")
    ax.set_title("Held-out accuracy")
    return _save(fig, path)


def accuracy_of(r: Any) -> float | None:
    if not isinstance(r, dict):
        return None
    for key in ("accuracy", "pass@1"):
        if isinstance(r.get(key), (int, float)):
            return float(r[key])
    return None


def plot_load_heatmaps(routing: dict[str, Any], path: str | Path) -> Path | None:
    """Per MoE layer, the load fraction of each expert (x) at each recorded step (y)."""
    snaps = [s for s in routing.get("snapshots", []) if s.get("layers")]
    if not snaps:
        return None
    layer_ids = [x["layer"] for x in snaps[-1]["layers"]]
    nr, nc = _grid(len(layer_ids))
    fig, axes = _figure(nr, nc, w=3.6, h=2.8)
    vmax = max(max(x["fraction"]) for s in snaps for x in s["layers"]) or 1.0
    im = None
    for ax, layer in zip(axes.flat, layer_ids):
        rows = [next((x["fraction"] for x in s["layers"] if x["layer"] == layer), None) for s in snaps]
        grid = np.array([r for r in rows if r is not None])
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        steps = [s["step"] for s in snaps]
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int)
        ax.set_yticks(ticks)
        ax.set_yticklabels([str(steps[i]) for i in ticks], fontsize=7)
        ax.set_ylabel("step", fontsize=8)
    for ax in list(axes.flat)[len(layer_ids):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="load fraction")
    fig.suptitle(f"Expert load per layer (uniform = {1 / len(snaps[-1]['layers'][0]['fraction']):.3f})")
    return _save(fig, path)


def plot_drift(routing: dict[str, Any], path: str | Path) -> Path | None:
    """Left: router drift (mean, p50, p90) over steps. Right: the latest per-token distribution."""
    snaps = [s for s in routing.get("snapshots", []) if s.get("drift")]
    if not snaps:
        return None
    fig, axes = _figure(1, 2)
    ax = axes[0, 0]
    steps = [s["step"] for s in snaps]
    for key, style in (("mean", "-o"), ("p50", "--s"), ("p90", ":^")):
        ax.plot(steps, [s["drift"][key] for s in snaps], style, ms=3, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("||p_t - p_prev||_2 (mean over layers)")
    ax.set_title("Router drift")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[0, 1]
    h = snaps[-1]["drift"]["hist"]
    edges, counts = np.array(h["edges"]), np.array(h["counts"])
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0")
    ax.set_xlim(0, edges[-1])
    ax.set_xlabel("per-token drift")
    ax.set_ylabel("tokens")
    ax.set_title(f"Drift distribution (step {snaps[-1]['step']})")
    return _save(fig, path)


def plot_specialization(routing: dict[str, Any], path: str | Path) -> Path | None:
    """Left: expert-subject NMI per layer. Right: P(expert | subject) in the most specialized layer."""
    spec = routing.get("specialization")
    if not spec or not spec.get("contingency"):
        return None
    nmi = spec["nmi"]
    best = int(np.argmax(nmi))
    table = np.array(spec["contingency"][best], dtype=float)
    table = table / np.maximum(table.sum(1, keepdims=True), 1)
    subjects = routing.get("subjects") or [str(i) for i in range(table.shape[0])]
    fig, axes = _figure(1, 2, w=5.0, h=3.6)
    ax = axes[0, 0]
    ax.bar([str(x) for x in spec["layers"]], nmi, color="#55a868")
    ax.set_xlabel("layer")
    ax.set_ylabel("NMI(expert; subject)")
    ax.set_title(f"Expert specialization (step {spec['step']})")
    ax = axes[0, 1]
    im = ax.imshow(table, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(subjects)))
    ax.set_yticklabels([s[:22] for s in subjects], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title(f"P(expert | subject), layer {spec['layers'][best]}", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)
