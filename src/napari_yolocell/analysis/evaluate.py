"""Detection and counting metrics: precision/recall/F1, mAP, count error, model comparison.

Everything is computed from ONE set of low-confidence detections per image: predictions are
matched to the truth once, greedily by descending confidence (a prediction takes the unclaimed
truth box it overlaps most), which is what ultralytics' validator does. Because a greedy
match processed in score order never changes for higher-scoring predictions, the matching at
any confidence threshold ``t`` is the restriction of that single matching to scores ``>= t``,
so precision, recall, F1 and count error can be swept over ``t`` for free.

mAP50 and mAP50-95 come from :func:`ultralytics.utils.metrics.ap_per_class` (101-point
interpolated AP, the number ultralytics reports), fed with the same true-positive matrix at the
10 IoU thresholds 0.50:0.05:0.95.

Counting is class-agnostic (a nucleus is a nucleus); boxes are ``(N, 4)`` ``y0, x0, y1, x1``
(any consistent corner order works: IoU does not depend on it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_yolocell.engine.detect import DetectParams, counted, detect_image
from napari_yolocell.engine.match import Match, as_boxes, box_iou, greedy_match, match_detections
from napari_yolocell.io.yolo import YoloDataset, load_image, read_yolo_dataset
from napari_yolocell.models.loading import load_detector
from napari_yolocell.models.ultralytics_env import import_ultralytics

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
DEFAULT_LOW_CONF = 0.01

__all__ = [
    "IOU_THRESHOLDS",
    "Match",
    "box_iou",
    "compare_models",
    "evaluate",
    "evaluate_model",
    "evaluate_predictions",
    "is_better",
    "match_detections",
    "results_table",
]


# --------------------------------------------------------------------------- metrics


@dataclass
class _Image:
    """One image's predictions in descending score order with their match at 10 IoUs."""

    name: str
    scores: np.ndarray
    correct: np.ndarray  # (N, 10)
    n_true: int

    def counts_at(self, conf: np.ndarray, column: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(n_pred, n_tp at ``IOU_THRESHOLDS[column]``) for each threshold in ``conf``."""
        n_pred = np.searchsorted(-self.scores, -np.asarray(conf), side="right")
        tp_cum = np.concatenate([[0], np.cumsum(self.correct[:, column])])
        return n_pred, tp_cum[n_pred]


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _prepare_image(item: Sequence, index: int, min_area: float) -> _Image:
    if len(item) not in (3, 4):
        raise ValueError("per_image items must be (pred_boxes, scores, true_boxes[, name])")
    pred, scores, truth = as_boxes(item[0]), np.asarray(item[1], float).reshape(-1), item[2]
    truth = as_boxes(truth)
    name = str(item[3]) if len(item) == 4 else str(index)
    if len(scores) != len(pred):
        raise ValueError(f"image {name}: {len(pred)} boxes but {len(scores)} scores")
    if min_area > 0:  # left out on both sides, so a found small nucleus is not a FP either
        truth = truth[_area(truth) >= min_area]
        keep = _area(pred) >= min_area
        pred, scores = pred[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    correct, _ = greedy_match(box_iou(truth, pred[order]), IOU_THRESHOLDS)
    return _Image(name=name, scores=scores[order], correct=correct, n_true=len(truth))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, float), np.asarray(den, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _sweep(images: list[_Image], conf: Sequence[float], column: int = 0) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and count errors at each threshold of ``conf``."""
    conf = np.atleast_1d(np.asarray(conf, float))
    n_true_img = np.array([im.n_true for im in images], float)
    n_pred_img = np.zeros((len(images), len(conf)))
    tp_img = np.zeros_like(n_pred_img)
    for i, im in enumerate(images):
        n_pred_img[i], tp_img[i] = im.counts_at(conf, column)
    n_true, n_pred, tp = n_true_img.sum(), n_pred_img.sum(0), tp_img.sum(0)
    diff = n_pred_img - n_true_img[:, None]
    has_truth = n_true_img > 0
    rel = diff[has_truth] / n_true_img[has_truth, None]
    nan = np.full(len(conf), np.nan)
    return {
        "conf": conf,
        "precision": _ratio(tp, n_pred),
        "recall": _ratio(tp, np.full(len(conf), n_true)),
        "f1": _ratio(2 * tp, n_pred + n_true),  # = 2PR / (P + R), defined even when P is not
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_true - tp,
        "n_pred": n_pred,
        "count_error": np.abs(rel).mean(0) if has_truth.any() else nan,
        "count_bias": rel.mean(0) if has_truth.any() else nan,
        "count_mae": np.abs(diff).mean(0) if len(images) else nan,
        "count_mean_signed": diff.mean(0) if len(images) else nan,
        "n_pred_per_image": n_pred_img,
        "tp_per_image": tp_img,
    }


def _ap(images: list[_Image]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """AP at the 10 IoU thresholds and the interpolated PR curve (IoU 0.5), via ultralytics."""

    import_ultralytics()
    from ultralytics.utils.metrics import ap_per_class

    n_true = sum(im.n_true for im in images)
    if n_true == 0:
        return np.full(len(IOU_THRESHOLDS), np.nan), {
            "recall": np.zeros(0),
            "precision": np.zeros(0),
        }
    correct = np.concatenate([im.correct for im in images] + [np.zeros((0, 10), bool)])
    scores = np.concatenate([im.scores for im in images] + [np.zeros(0)])
    out = ap_per_class(correct, scores, np.zeros(len(scores)), np.zeros(n_true))
    ap, x, prec_values = out[5], out[10], out[11]
    return ap[0], {"recall": np.asarray(x), "precision": np.asarray(prec_values[0])}


def _best_index(values: np.ndarray, mode: str) -> int | None:
    if not np.isfinite(values).any():
        return None
    return int(np.nanargmax(values) if mode == "max" else np.nanargmin(values))


def _scalar(value: Any) -> float:
    return float(np.asarray(value).reshape(-1)[0])


def evaluate_predictions(
    per_image: Iterable[Sequence],
    conf: float | None = None,
    iou: float = 0.5,
    min_area: float = 0.0,
    conf_grid: Sequence[float] | None = None,
    name: str = "",
) -> dict[str, Any]:
    """Detection and counting metrics from predictions and truth boxes.

    Parameters
    ----------
    per_image : iterable of tuple
        ``(pred_boxes (N, 4), scores (N,), true_boxes (M, 4)[, image_name])`` per image.
        Predictions should be made at a low confidence (e.g. 0.01) so curves and mAP cover
        the whole range.
    conf : float, optional
        Confidence threshold for the reported P/R/F1/count error; None uses the threshold that
        maximises F1.
    iou : float
        IoU threshold for P/R/F1 and counting matches (mAP always uses 0.50:0.95). Only 0.5
        and the other ``IOU_THRESHOLDS`` values are supported.
    min_area : float
        Truth AND predicted boxes smaller than this (pixels²) are left out (e.g. 25).
    conf_grid : sequence of float, optional
        Thresholds of the sweep (default 0.01, 0.02, ... 0.99).
    name : str
        Label stored as ``result["name"]`` (model name in comparisons and plots).

    Returns
    -------
    dict
        ``name, n_images, n_true, n_images_no_truth, conf, precision, recall, f1, tp, fp, fn,
        n_pred, count_error`` (mean |pred - true| / true over images with truth),
        ``count_bias`` (mean (pred - true) / true), ``count_mae``, ``count_mean_signed``
        (absolute, all images), ``mAP50, mAP50-95, ap`` (10 values), ``conf_best_f1,
        f1_best, conf_min_count_error, count_error_min``, ``per_image`` (DataFrame),
        ``curves`` (sweep arrays) and ``pr_curve`` (ultralytics' interpolated PR at IoU 0.5).
    """
    column = _iou_column(iou)
    images = [_prepare_image(item, i, min_area) for i, item in enumerate(per_image)]
    grid = np.round(np.arange(1, 100) / 100, 2) if conf_grid is None else np.asarray(conf_grid)
    curves = _sweep(images, grid, column)
    i_f1 = _best_index(curves["f1"], "max")
    i_count = _best_index(curves["count_error"], "min")
    if i_count is None:  # no image has truth: fall back to the absolute error
        i_count = _best_index(curves["count_mae"], "min")
    conf_best = float(grid[i_f1]) if i_f1 is not None else float(grid[0])
    conf_used = conf_best if conf is None else float(conf)
    at = _sweep(images, [conf_used], column)
    ap, pr_curve = _ap(images)
    return {
        "name": name,
        "n_images": len(images),
        "n_true": int(sum(im.n_true for im in images)),
        "n_images_no_truth": int(sum(im.n_true == 0 for im in images)),
        "conf": conf_used,
        "iou": float(IOU_THRESHOLDS[column]),
        "min_area": float(min_area),
        **{
            k: _scalar(at[k])
            for k in (
                "precision",
                "recall",
                "f1",
                "count_error",
                "count_bias",
                "count_mae",
                "count_mean_signed",
            )
        },
        **{k: int(_scalar(at[k])) for k in ("tp", "fp", "fn", "n_pred")},
        "mAP50": float(ap[0]),
        "mAP50-95": float(np.mean(ap)),
        "ap": [float(a) for a in ap],
        "conf_best_f1": conf_best,
        "f1_best": float(curves["f1"][i_f1]) if i_f1 is not None else float("nan"),
        "conf_min_count_error": float(grid[i_count]) if i_count is not None else float("nan"),
        "count_error_min": (
            float(curves["count_error"][i_count]) if i_count is not None else float("nan")
        ),
        "per_image": _per_image_table(images, at),
        "curves": {k: v for k, v in curves.items() if not k.endswith("per_image")},
        "pr_curve": pr_curve,
    }


def _iou_column(iou: float) -> int:
    hits = np.flatnonzero(np.isclose(IOU_THRESHOLDS, iou))
    if not len(hits):
        raise ValueError(f"iou must be one of {list(np.round(IOU_THRESHOLDS, 2))}, got {iou}")
    return int(hits[0])


def _per_image_table(images: list[_Image], at: dict[str, np.ndarray]) -> pd.DataFrame:
    n_true = np.array([im.n_true for im in images], int)
    n_pred = at["n_pred_per_image"][:, 0].astype(int)
    tp = at["tp_per_image"][:, 0].astype(int)
    return pd.DataFrame(
        {
            "image": [im.name for im in images],
            "n_true": n_true,
            "n_pred": n_pred,
            "tp": tp,
            "fp": n_pred - tp,
            "fn": n_true - tp,
            "error": n_pred - n_true,
            "rel_error": _ratio(n_pred - n_true, n_true),
        }
    )


# --------------------------------------------------------------------------- models


def _load_model(model: Any, backend: str):
    if isinstance(model, (str, Path)):
        return load_detector(model, backend=backend)
    return model


def _truth_items(dataset: Any, split: str | None) -> list[tuple[Any, np.ndarray, str]]:
    """(image or path, truth boxes, name) from a YOLO dataset, its path, or explicit pairs."""

    if isinstance(dataset, (str, Path)):
        dataset = read_yolo_dataset(dataset)
    if isinstance(dataset, YoloDataset):
        samples = dataset.split(split) if split else list(dataset)
        if not samples:
            raise ValueError(
                f"dataset {dataset.root} has no images in split {split!r} "
                f"(splits: {dataset.splits})"
            )
        return [(s.image_path, s.boxes, s.image_path.name) for s in samples]
    items = []
    for i, item in enumerate(dataset):
        image, truth = item[0], item[1]
        name = (
            item[2]
            if len(item) > 2
            else (Path(image).name if isinstance(image, (str, Path)) else str(i))
        )
        items.append((image, as_boxes(truth), str(name)))
    return items


def _read_image(image: Any) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return load_image(image)
    return image


def evaluate_model(
    model: Any,
    dataset: Any,
    split: str | None = "test",
    params: Any = None,
    conf: float | None = None,
    low_conf: float = DEFAULT_LOW_CONF,
    iou: float = 0.5,
    min_area: float = 0.0,
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    backend: str = "torch",
) -> dict[str, Any]:
    """Run our tiled detection on every image of a test set and score it.

    Each image is read at full resolution and passed to
    :func:`napari_yolocell.engine.detect.detect_image` once, at ``low_conf``; every metric and curve
    is derived from that single run (see :func:`evaluate_predictions`).

    Parameters
    ----------
    model : Detector, str or Path
        A loaded detector or anything :func:`napari_yolocell.models.loading.load_detector` accepts.
    dataset : YoloDataset, str, Path or sequence
        A YOLO dataset (object, folder or ``data.yaml``), or ``(image, true_boxes[, name])``
        items where ``image`` is an array or an image path (truth from instance masks:
        :func:`napari_yolocell.training.annotations.boxes_from_labels`).
    split : str or None
        Split of a YOLO dataset to use (None: all images).
    params : DetectParams, optional
        Detection settings (tile, normalisation, diameter...); ``conf`` is replaced by
        ``low_conf``.
    conf : float, optional
        Threshold for the reported P/R/F1/count error (None: the F1-maximising one).
    low_conf : float
        Detection threshold of the single run; the sweep starts there.
    iou, min_area
        See :func:`evaluate_predictions`.
    name : str, optional
        Model label in tables and plots (default: the model's name).
    progress : callable, optional
        Called as ``progress(done_images, total_images)``.
    backend : str
        Forward-pass runtime for a model given by name or path; ``"torch"`` by default, the
        reference precision (``"auto"`` scores what ``yolocell detect`` runs, e.g. INT8).

    Returns
    -------
    dict
        :func:`evaluate_predictions` output plus ``model``, ``split``, ``model_default_conf``,
        ``seconds_per_image``.
    """

    detector = _load_model(model, backend)
    items = _truth_items(dataset, split)
    params = dataclasses.replace(params or DetectParams(), conf=float(low_conf))
    per_image, start = [], time.perf_counter()
    for done, (image, truth, image_name) in enumerate(items, start=1):
        df = detect_image(_read_image(image), detector, params)
        df = counted(df)  # DetectParams.min_relative_area: not counted, not scored
        per_image.append(
            (
                df[["y0", "x0", "y1", "x1"]].to_numpy(float),
                df["confidence"].to_numpy(float),
                truth,
                image_name,
            )
        )
        if progress is not None:
            progress(done, len(items))
    elapsed = time.perf_counter() - start
    spec = getattr(detector, "spec", None)
    label = name or (spec.name if spec is not None else str(model))
    grid = np.round(np.arange(max(1, round(low_conf * 100)), 100) / 100, 2)
    result = evaluate_predictions(
        per_image, conf=conf, iou=iou, min_area=min_area, conf_grid=grid, name=label
    )
    result.update(
        model=label,
        split=split,
        model_default_conf=float(spec.default_conf) if spec is not None else None,
        seconds_per_image=elapsed / max(len(items), 1),
    )
    return result


evaluate = evaluate_model  # the name in docs/DESIGN.md


TABLE_COLUMNS = {
    "name": "model",
    "precision": "P",
    "recall": "R",
    "f1": "F1",
    "mAP50": "mAP50",
    "mAP50-95": "mAP50-95",
    "conf": "conf",
    "conf_best_f1": "best-F1 conf",
    "conf_min_count_error": "min-count-error conf",
    "count_error": "count error",
    "count_bias": "bias",
    "n_images": "n_images",
    "n_true": "n_true",
    "n_pred": "n_pred",
}


def results_table(results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per evaluation result (the thesis' Table 3 layout).

    Columns: model, P, R, F1, mAP50, mAP50-95, conf (of P/R/F1/count error), best-F1 conf,
    min-count-error conf, count error (mean |pred - true| / true), bias (mean signed relative
    error), n_images, n_true, n_pred.
    """
    rows = [{label: r.get(key) for key, label in TABLE_COLUMNS.items()} for r in results]
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS.values()))


def compare_models(
    models: Sequence[Any],
    dataset: Any = None,
    split: str | None = "test",
    params: Any = None,
    return_results: bool = False,
    **kwargs: Any,
) -> pd.DataFrame | tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Evaluate several models on the same images; one table row per model.

    Parameters
    ----------
    models : sequence
        Detectors, model names/paths, or ready results from :func:`evaluate_model` /
        :func:`evaluate_predictions` (dicts, used as they are).
    dataset, split, params
        As in :func:`evaluate_model` (not needed when all items are results).
    return_results : bool
        Also return the full result dicts (for :mod:`napari_yolocell.analysis.plots`).
    **kwargs
        Passed to :func:`evaluate_model` (``conf``, ``low_conf``, ``min_area``, ``iou``,
        ``backend``).

    Returns
    -------
    pandas.DataFrame or (DataFrame, list of dict)
    """
    results = []
    for model in models:
        if isinstance(model, dict):
            results.append(model)
            continue
        if dataset is None:
            raise ValueError("a dataset is needed to evaluate models")
        results.append(evaluate_model(model, dataset, split=split, params=params, **kwargs))
    table = results_table(results)
    return (table, results) if return_results else table


def is_better(new: dict[str, Any], start: dict[str, Any], tol: float = 1e-9) -> bool:
    """Whether a model's result beats another's: higher F1, or equal F1 and lower count error.

    The rule that decides whether a fine-tuned model replaces its start in Detect: F1 says
    whether the nuclei are found, the count error breaks ties (what the user reports).

    Parameters
    ----------
    new, start : dict
        :func:`evaluate_model` results on the same images at the same threshold (``f1``,
        ``count_error``; a missing or NaN F1 counts as 0, a count error as the worst).
    tol : float
        F1 values closer than this are equal.

    Examples
    --------
    >>> is_better({"f1": 0.9, "count_error": 0.2}, {"f1": 0.8, "count_error": 0.1})
    True
    >>> is_better({"f1": 0.8, "count_error": 0.05}, {"f1": 0.8, "count_error": 0.1})
    True
    >>> is_better({"f1": 0.8, "count_error": 0.1}, {"f1": 0.8, "count_error": 0.1})
    False
    """

    def value(result: dict[str, Any], key: str, missing: float) -> float:
        v = result.get(key)
        return float(v) if v is not None and np.isfinite(v) else missing

    def count_error(result: dict[str, Any]) -> float:
        return value(result, "count_error", float("inf"))

    f1_new, f1_start = value(new, "f1", 0.0), value(start, "f1", 0.0)
    if abs(f1_new - f1_start) > tol:
        return f1_new > f1_start
    return count_error(new) < count_error(start)
