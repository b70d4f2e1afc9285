"""Evaluation plots: PR curve, F1-confidence, count error-confidence, predicted vs true count.

Every function takes one result dict of :mod:`napari_yolocell.analysis.evaluate` or a list of them
(several models on one axes) and returns a :class:`matplotlib.figure.Figure`. Figures are made
without ``pyplot`` (no global state, no GUI backend, safe in napari's threads) and use
matplotlib's bundled DejaVu font, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

Result = dict[str, Any]

__all__ = [
    "plot_count_error_curve",
    "plot_count_scatter",
    "plot_f1_curve",
    "plot_pr_curve",
    "plot_training_history",
    "save_plots",
]

#: Training losses drawn by :func:`plot_training_history` (keys of the ``on_epoch`` dicts).
LOSS_KEYS = ("box_loss", "cls_loss", "dfl_loss")


def _as_list(results: Result | Sequence[Result]) -> list[Result]:
    return [results] if isinstance(results, dict) else list(results)


def _label(result: Result, index: int) -> str:
    return str(result.get("name") or result.get("model") or f"model {index + 1}")


def _figure(size: tuple[float, float] = (5.5, 4.5)) -> tuple[Figure, Any]:
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def plot_pr_curve(results: Result | Sequence[Result]) -> Figure:
    """Precision-recall curve at IoU 0.5 (ultralytics' interpolated curve, the one behind mAP50),
    with each model's operating point at its reported confidence."""
    fig, ax = _figure()
    for i, r in enumerate(_as_list(results)):
        pr = r.get("pr_curve") or {}
        (line,) = ax.plot(
            pr.get("recall", []),
            pr.get("precision", []),
            label=f"{_label(r, i)} (mAP50 {r.get('mAP50', np.nan):.3f})",
        )
        ax.plot(
            [r.get("recall", np.nan)], [r.get("precision", np.nan)], "o", color=line.get_color()
        )
    ax.set(
        xlabel="Recall",
        ylabel="Precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="Precision-recall (IoU 0.5)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    return fig


def _curve_plot(results, key: str, ylabel: str, title: str, best_key: str | None) -> Figure:
    fig, ax = _figure()
    for i, r in enumerate(_as_list(results)):
        curves = r.get("curves") or {}
        (line,) = ax.plot(curves.get("conf", []), curves.get(key, []), label=_label(r, i))
        best = r.get(best_key) if best_key else None
        if best is not None and np.isfinite(best):
            ax.axvline(best, color=line.get_color(), ls="--", lw=0.8)
    ax.set(xlabel="Confidence threshold", ylabel=ylabel, xlim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_f1_curve(results: Result | Sequence[Result]) -> Figure:
    """F1 (IoU 0.5) against the confidence threshold; dashed: the F1-maximising threshold."""
    fig = _curve_plot(results, "f1", "F1", "F1-confidence", "conf_best_f1")
    fig.axes[0].set_ylim(0, 1.02)
    return fig


def plot_count_error_curve(results: Result | Sequence[Result]) -> Figure:
    """Mean relative count error against the confidence threshold; dashed: its minimum."""
    return _curve_plot(
        results,
        "count_error",
        "Mean |pred - true| / true",
        "Count error-confidence",
        "conf_min_count_error",
    )


def plot_count_scatter(results: Result | Sequence[Result]) -> Figure:
    """Predicted against true nucleus count per image (at each result's ``conf``)."""
    fig, ax = _figure((5, 5))
    top = 1.0
    for i, r in enumerate(_as_list(results)):
        table = r.get("per_image")
        if table is None or len(table) == 0:
            continue
        true, pred = np.asarray(table["n_true"]), np.asarray(table["n_pred"])
        ax.scatter(
            true,
            pred,
            s=18,
            alpha=0.7,
            label=f"{_label(r, i)} (conf {r.get('conf', np.nan):.2f}, "
            f"error {r.get('count_error', np.nan):.1%})",
        )
        top = max(top, float(true.max()), float(pred.max()))
    ax.plot([0, top * 1.05], [0, top * 1.05], color="grey", lw=1, ls="--", label="pred = true")
    ax.set(
        xlabel="True count",
        ylabel="Predicted count",
        xlim=(0, top * 1.05),
        ylim=(0, top * 1.05),
        title="Nuclei per image",
        aspect="equal",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    return fig


def plot_training_history(
    history: Sequence[dict[str, Any]], figure: Figure | None = None
) -> Figure:
    """Training loss and validation mAP50 per epoch, side by side.

    Parameters
    ----------
    history : sequence of dict
        The ``on_epoch`` dicts of :func:`napari_yolocell.training.train.train` (``epoch``,
        :data:`LOSS_KEYS`, ``mAP50``); missing values are left out.
    figure : matplotlib.figure.Figure, optional
        Redrawn in place (cleared first), e.g. the widget's live plot; default a new figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = figure if figure is not None else Figure(figsize=(5, 3), layout="constrained")
    fig.clear()
    ax, bx = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    for key in LOSS_KEYS:
        values = [h.get(key, np.nan) for h in history]
        if any(np.isfinite(values)):
            ax.plot(epochs, values, marker=".", label=key.replace("_loss", ""))
    bx.plot(epochs, [h.get("mAP50", np.nan) for h in history], marker=".", color="tab:green")
    ax.set_title("training loss", fontsize=9)
    bx.set_title("val mAP50", fontsize=9)
    bx.set_ylim(0, 1)
    for axis in (ax, bx):
        axis.set_xlabel("epoch", fontsize=8)
        axis.tick_params(labelsize=7)
    if ax.lines:
        ax.legend(fontsize=7)
    return fig


PLOTS = {
    "pr_curve": plot_pr_curve,
    "f1_curve": plot_f1_curve,
    "count_error_curve": plot_count_error_curve,
    "count_scatter": plot_count_scatter,
}


def save_plots(
    results: Result | Sequence[Result],
    outdir: str | Path,
    prefix: str = "",
    dpi: int = 150,
) -> list[Path]:
    """Write every plot as PNG.

    Parameters
    ----------
    results : dict or sequence of dict
        Evaluation result(s); several are drawn on the same axes.
    outdir : str or Path
        Output folder (created).
    prefix : str
        File name prefix.
    dpi : int
        Resolution.

    Returns
    -------
    list of Path
        ``<prefix>pr_curve.png``, ``f1_curve.png``, ``count_error_curve.png``,
        ``count_scatter.png``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, plot in PLOTS.items():
        path = outdir / f"{prefix}{name}.png"
        plot(results).savefig(path, dpi=dpi)
        paths.append(path)
    return paths
