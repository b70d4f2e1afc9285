"""Detections matched to true boxes one-to-one, as ultralytics' validator matches them.

A prediction, from the most confident down, takes the still unclaimed true box it overlaps
most if that IoU reaches the threshold; two predictions on one nucleus give one true and one
false positive. Scoring (:mod:`napari_yolocell.analysis.evaluate`) and a fine-tune's look at
how its start counts the lab's images (:mod:`napari_yolocell.training.fewshot`) both match
here. Boxes are ``(N, 4)`` corners; IoU does not depend on the corner order as long as it is
the same for both sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Match", "as_boxes", "box_iou", "greedy_match", "match_detections"]


def as_boxes(boxes: Any) -> np.ndarray:
    """``boxes`` as a float ``(N, 4)`` array (``(0, 4)`` when empty)."""
    arr = np.asarray(boxes, dtype=float)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {arr.shape}")
    return arr


def box_iou(a: np.ndarray, b: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Pairwise IoU of two box sets (same formula as ``ultralytics.utils.metrics.box_iou``).

    Parameters
    ----------
    a, b : numpy.ndarray
        ``(N, 4)`` and ``(M, 4)`` boxes, corners ``(lo0, lo1, hi0, hi1)``.
    eps : float
        Guards against division by zero.

    Returns
    -------
    numpy.ndarray
        ``(N, M)`` IoU.
    """
    a, b = as_boxes(a), as_boxes(b)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + eps)


def greedy_match(iou: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ultralytics ``DetectionValidator.match_predictions`` (greedy path), also returning
    which truth each prediction took.

    Parameters
    ----------
    iou : numpy.ndarray
        ``(M truths, N predictions)``, predictions in descending confidence order.
    thresholds : numpy.ndarray
        ``(T,)`` IoU thresholds.

    Returns
    -------
    correct : numpy.ndarray
        ``(N, T)`` bool.
    truth : numpy.ndarray
        ``(N, T)`` int, matched truth index or -1.
    """
    n_true, n_pred = iou.shape
    correct = np.zeros((n_pred, len(thresholds)), dtype=bool)
    truth = np.full((n_pred, len(thresholds)), -1, dtype=int)
    if n_true == 0 or n_pred == 0:
        return correct, truth
    cols = np.arange(len(thresholds))
    claimed = np.zeros((n_true, len(thresholds)), dtype=bool)
    for j in np.flatnonzero((iou >= thresholds.min()).any(0)):
        available = np.where(claimed, 0.0, iou[:, j, None])  # (M, T)
        k = available.argmax(0)
        correct[j] = available[k, cols] >= thresholds
        truth[j] = np.where(correct[j], k, -1)
        claimed[k, cols] |= correct[j]
    return correct, truth


@dataclass
class Match:
    """One-to-one matching of predictions to truth at one IoU threshold.

    Attributes
    ----------
    tp : numpy.ndarray
        ``(N,)`` bool per prediction (input order): matched to a truth box.
    truth_index : numpy.ndarray
        ``(N,)`` index of the matched truth box, -1 if none.
    iou : numpy.ndarray
        ``(N,)`` IoU with the matched truth box (0 if none).
    n_true : int
        Number of truth boxes.
    """

    tp: np.ndarray
    truth_index: np.ndarray
    iou: np.ndarray
    n_true: int

    @property
    def n_tp(self) -> int:
        """True positives."""
        return int(self.tp.sum())

    @property
    def n_fp(self) -> int:
        """False positives (unmatched predictions)."""
        return int(len(self.tp) - self.tp.sum())

    @property
    def n_fn(self) -> int:
        """False negatives (unmatched truth boxes)."""
        return int(self.n_true - self.tp.sum())


def match_detections(
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    true_boxes: np.ndarray,
    iou: float = 0.5,
    centres: bool = False,
) -> Match:
    """Match predictions to truth one-to-one, greedily by descending score.

    Each prediction, from the most confident down, takes the still unclaimed truth box it
    overlaps most if that IoU is ``>= iou``; two predictions on one nucleus give 1 TP + 1 FP.
    With ``centres`` a pair qualifies instead when each box's centre lies inside the other
    box, however much they overlap: a detection on a nucleus marked by a point (its box drawn
    at a guessed diameter) is then a match whatever the two boxes' sizes.

    Parameters
    ----------
    pred_boxes : numpy.ndarray
        ``(N, 4)`` predicted boxes.
    pred_scores : numpy.ndarray
        ``(N,)`` confidences.
    true_boxes : numpy.ndarray
        ``(M, 4)`` truth boxes.
    iou : float
        Minimum IoU of a match (without ``centres``).
    centres : bool
        Match by mutual centre containment (the largest IoU first) instead of an IoU.

    Returns
    -------
    Match
    """
    pred_boxes, true_boxes = as_boxes(pred_boxes), as_boxes(true_boxes)
    scores = np.asarray(pred_scores, float).reshape(-1)
    if len(scores) != len(pred_boxes):
        raise ValueError(f"{len(pred_boxes)} boxes but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    ious = box_iou(true_boxes, pred_boxes[order])
    if centres:
        ious = np.where(_centre_inside(true_boxes, pred_boxes[order]), np.maximum(ious, 1e-6), 0)
        iou = 1e-6
    correct, truth = greedy_match(ious, np.array([iou]))
    tp = np.zeros(len(scores), bool)
    index = np.full(len(scores), -1)
    tp[order], index[order] = correct[:, 0], truth[:, 0]
    matched_iou = np.zeros(len(scores))
    if tp.any():
        matched_iou[tp] = box_iou(true_boxes[index[tp]], pred_boxes[tp]).diagonal()
    return Match(tp=tp, truth_index=index, iou=matched_iou, n_true=len(true_boxes))


def _centre_inside(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N, M)``: box ``a[i]``'s centre lies in ``b[j]`` and ``b[j]``'s in ``a[i]``."""

    def inside(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:  # (P, B)
        return (
            (points[:, None, :] >= boxes[None, :, :2]) & (points[:, None, :] <= boxes[None, :, 2:])
        ).all(-1)

    ca, cb = (a[:, :2] + a[:, 2:]) / 2, (b[:, :2] + b[:, 2:]) / 2
    return inside(ca, b) & inside(cb, a).T
