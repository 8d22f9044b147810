"""Training plots (matplotlib, Agg backend, no display needed): loss / metric curves and the PR curve."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_pr_curve", "plot_results"]

_PLOTTED_PREFIXES = ("train/", "val/", "metrics/")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_results(results_csv: str | Path, out_png: str | Path) -> Path:
    """One panel per loss and metric column of results.csv against the epoch; works from one epoch on."""
    results_csv, out_png = Path(results_csv), Path(out_png)
    with open(results_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{results_csv} has no rows yet: plot after at least one epoch")
    columns = [c for c in rows[0] if c.strip().startswith(_PLOTTED_PREFIXES)]
    epochs = [_number(r.get("epoch")) for r in rows]
    if any(math.isnan(e) for e in epochs):
        epochs = list(range(1, len(rows) + 1))
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    ncols = min(5, max(1, len(columns)))
    nrows = max(1, math.ceil(len(columns) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False, tight_layout=True)
    for ax, col in zip(axes.flat, columns):
        ax.plot(epochs, [_number(r.get(col)) for r in rows], marker="o", markersize=3, linewidth=1.5)
        ax.set_title(col.strip(), fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=150)
    plt.close(fig)
    return out_png


def plot_pr_curve(metrics: Any, out_png: str | Path) -> Path:
    """Precision-recall at IoU 0.50 per class and their mean, from `DetectionMetrics` or the validation dict."""
    recall, precision, ap50 = _pr_data(metrics)
    out_png = Path(out_png)
    plt = _pyplot()
    fig, ax = plt.subplots(1, 1, figsize=(8, 6), tight_layout=True)
    curves = {name: np.clip(np.asarray(p, dtype=float), 0, None) for name, p in precision.items()}
    labelled = len(curves) <= 20
    for name, p in curves.items():
        label = f"{name} {ap50.get(name, float(p.mean())):.3f}" if labelled else None
        ax.plot(recall, p, linewidth=1, label=label, color=None if labelled else "grey", alpha=0.8)
    if curves:
        mean = np.mean(list(curves.values()), axis=0)
        ax.plot(recall, mean, linewidth=3, color="blue", label=f"all classes {mean.mean():.3f} mAP@0.5")
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no labelled classes", ha="center", va="center")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall (IoU 0.50)")
    ax.grid(alpha=0.3)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=150)
    plt.close(fig)
    return out_png


def _pr_data(metrics: Any) -> tuple[np.ndarray, dict[str, Any], dict[str, float]]:
    if hasattr(metrics, "pr_precision"):  # DetectionMetrics
        return (np.asarray(metrics.pr_recall), metrics.pr_precision,
                {k: v["ap50"] for k, v in metrics.per_class.items()})
    curve = metrics.get("pr_curve") if isinstance(metrics, dict) else None
    if not curve or "recall" not in curve:
        raise ValueError("no PR curve: pass DetectionMetrics or the dict validation returns (with 'pr_curve')")
    return np.asarray(curve["recall"]), curve["precision"], dict(curve.get("ap50", {}))


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
