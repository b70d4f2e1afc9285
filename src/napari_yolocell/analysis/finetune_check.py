"""Is a fine-tuned model better than the model it started from? The verdict of a fine-tune.

Both models are scored on the same held-out images (never trained on), each the way Detect
will run it: its own default confidence (what the Detect widget's slider is set to when the
model is chosen, and what ``yolocell detect`` uses), the default runtime, the automatic size
(a fine-tuned model detects at its lab's scale). The verdict is
:func:`~napari_yolocell.analysis.evaluate.is_better` (higher F1; equal F1: lower count error),
and its line says how many held-out nuclei it rests on. The CLI (``yolocell train``) and the
Train widget's Fine-tune tab both print it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_yolocell.analysis.evaluate import evaluate_model, is_better
from napari_yolocell.models.registry import resolve_model

__all__ = ["FEW_NUCLEI", "Verdict", "detect_conf", "judge", "score_on_held_out", "verdict_of"]

#: Below this many held-out nuclei the verdict line warns that it is a rough one.
FEW_NUCLEI = 100

Item = tuple[Any, np.ndarray, str]


def detect_conf(model: Any) -> float:
    """The confidence Detect uses for ``model``: its default (sidecar or registry)."""
    return float(resolve_model(model).default_conf)


def score_on_held_out(
    model: Any,
    items: Sequence[Item],
    backend: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """:func:`~napari_yolocell.analysis.evaluate.evaluate_model` of one model on ``items`` at
    the confidence Detect uses for it (reported as ``conf``)."""
    return evaluate_model(
        model,
        list(items),
        split=None,
        conf=detect_conf(model),
        backend=backend,
        progress=progress,
    )


@dataclass
class Verdict:
    """The two scores and what they mean.

    Attributes
    ----------
    better : bool
        The fine-tuned model beats its start.
    start, tuned : dict
        Their results (``f1``, ``count_error``, ``conf``, ``n_true``...).
    start_name : str
        The starting model as the user named it.
    n_images, n_nuclei : int
        Held-out images and true nuclei the verdict rests on.
    """

    better: bool
    start: dict[str, Any]
    tuned: dict[str, Any]
    start_name: str
    n_images: int
    n_nuclei: int

    def line(self) -> str:
        """One line: better or not, both scores, what they rest on."""
        s, t = self.start, self.tuned
        numbers = (
            f"F1 {t['f1']:.3f} vs {s['f1']:.3f}, count error {_pct(t)} vs {_pct(s)} on "
            f"{self.n_images} held-out image(s) ({self.n_nuclei} nuclei), each model at the "
            f"confidence Detect uses ({_conf(t)} / {_conf(s)})"
        )
        if self.n_nuclei < FEW_NUCLEI:
            numbers += f"; under {FEW_NUCLEI} nuclei: a rough verdict, hold out more"
        if self.better:
            return f"the fine-tuned model beats {self.start_name}: {numbers}"
        return (
            f"the fine-tuned model is NOT better than {self.start_name}: {numbers}; "
            f"keep using {self.start_name}"
        )


def verdict_of(start: dict[str, Any], tuned: dict[str, Any], start_name: str) -> Verdict:
    """The :class:`Verdict` of two results on the same held-out images."""
    return Verdict(
        better=is_better(tuned, start),
        start=start,
        tuned=tuned,
        start_name=start_name,
        n_images=int(start.get("n_images") or 0),
        n_nuclei=int(start.get("n_true") or 0),
    )


def judge(
    start: str | Path,
    tuned: str | Path,
    items: Sequence[Item],
    backend: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> Verdict:
    """Score the starting and the fine-tuned model on the held-out ``items`` and compare.

    Parameters
    ----------
    start, tuned : str or Path
        The starting model (name or path) and the fine-tuned ``best.pt``.
    items : sequence of (image, true boxes, name)
        Held-out images (paths or arrays) and their boxes ``y0 x0 y1 x1``.
    backend : str
        Runtime, as Detect picks it (``auto``).
    progress : callable, optional
        ``progress(done, total)`` over both models' images.

    Returns
    -------
    Verdict
    """
    n = len(items)

    def part(offset: int) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, _total: progress(offset + done, 2 * n)

    first = score_on_held_out(start, items, backend, part(0))
    second = score_on_held_out(tuned, items, backend, part(n))
    return verdict_of(first, second, str(start))


def _pct(result: dict[str, Any]) -> str:
    value = result.get("count_error")
    return f"{100 * value:.1f} %" if value is not None and np.isfinite(value) else "n/a"


def _conf(result: dict[str, Any]) -> str:
    value = result.get("conf")
    return f"{value:.2f}" if value is not None else "?"
