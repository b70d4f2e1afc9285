"""Pick a confidence threshold from what the user knows about one image.

The detector runs once at a low threshold; every candidate threshold is then scored from those
detections alone (no re-run): against a known count, or against clicked nucleus centres.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from napari_yolocell.analysis.roi import in_any_roi

__all__ = [
    "Calibration",
    "calibrate_by_count",
    "calibrate_by_points",
    "calibrate_in_rois",
    "match_points",
    "separate_planes",
]

GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)


@dataclass
class Calibration:
    """Result of a calibration.

    Attributes
    ----------
    conf : float
        The chosen confidence threshold.
    count : int
        Detections at ``conf``.
    target : int
        The known count (or number of clicked points).
    curve : pandas.DataFrame
        ``conf, count`` (and ``tp, precision, recall, f1`` for points) per candidate threshold.
    """

    conf: float
    count: int
    target: int
    curve: pd.DataFrame

    def summary(self, before: float | None = None) -> str:
        text = f"confidence {self.conf:.2f}: {self.count} nuclei (known: {self.target})"
        if before is not None:
            row = self.curve.iloc[int(np.argmin(np.abs(self.curve["conf"] - before)))]
            text = f"confidence {before:.2f}: {int(row['count'])} nuclei -> " + text
        return text


def _counts(conf: np.ndarray, grid: np.ndarray) -> np.ndarray:
    s = np.sort(np.asarray(conf, dtype=float))
    return len(s) - np.searchsorted(s, grid, side="left")


def calibrate_by_count(
    confidences: np.ndarray, true_count: int, grid: np.ndarray = GRID
) -> Calibration:
    """Threshold whose count is closest to ``true_count`` (ties: the highest threshold).

    Parameters
    ----------
    confidences : (N,) array
        Confidences of the detections of a low-threshold run (in the image or ROI).
    true_count : int
        The count the user knows.
    """
    if true_count < 0:
        raise ValueError(f"the known count must be >= 0, got {true_count}")
    grid = np.asarray(grid, dtype=float)
    counts = _counts(confidences, grid)
    err = np.abs(counts - true_count)
    best = np.flatnonzero(err == err.min())[-1]
    curve = pd.DataFrame({"conf": grid, "count": counts})
    return Calibration(float(grid[best]), int(counts[best]), int(true_count), curve)


def match_points(detections: pd.DataFrame, points: np.ndarray) -> np.ndarray:
    """One-to-one match of detections to clicked centres, most confident detection first.

    A detection matches an unmatched point lying inside its box (the nearest one to its
    centre). Returns an (N,) bool array over ``detections`` rows: matched or not. Because
    matching goes by descending confidence, the matches above any threshold are the same as
    if the lower-confidence detections had never existed.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    order = np.argsort(-detections["confidence"].to_numpy(), kind="stable")
    box = detections[["y0", "x0", "y1", "x1"]].to_numpy(dtype=float)
    ctr = detections[["y", "x"]].to_numpy(dtype=float)
    free = np.ones(len(pts), dtype=bool)
    matched = np.zeros(len(detections), dtype=bool)
    for i in order:
        if not free.any():
            break
        y0, x0, y1, x1 = box[i]
        inside = free & (pts[:, 0] >= y0) & (pts[:, 0] < y1) & (pts[:, 1] >= x0) & (pts[:, 1] < x1)
        if inside.any():
            cand = np.flatnonzero(inside)
            j = cand[np.argmin(((pts[cand] - ctr[i]) ** 2).sum(axis=1))]
            free[j] = False
            matched[i] = True
    return matched


def calibrate_by_points(
    detections: pd.DataFrame, points: np.ndarray, grid: np.ndarray = GRID
) -> Calibration:
    """Threshold with the best F1 between detections and clicked nucleus centres.

    Give only detections and points of the region the user annotated completely (an ROI):
    outside it, unclicked nuclei would count as false positives.
    Ties go to the threshold whose count is closest to the number of points.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    if len(pts) == 0:
        raise ValueError("no points given: click the nuclei of a region first")
    grid = np.asarray(grid, dtype=float)
    matched = match_points(detections, pts)
    conf = detections["confidence"].to_numpy(dtype=float)
    counts = _counts(conf, grid)
    tp = _counts(conf[matched], grid)
    precision = np.divide(tp, counts, out=np.zeros(len(grid)), where=counts > 0)
    recall = tp / len(pts)
    f1 = np.divide(
        2 * precision * recall,
        precision + recall,
        out=np.zeros(len(grid)),
        where=(precision + recall) > 0,
    )
    key = np.lexsort((-np.abs(counts - len(pts)), np.round(f1, 6)))
    best = key[-1]
    curve = pd.DataFrame(
        {
            "conf": grid,
            "count": counts,
            "tp": tp,
            "precision": precision,
            "recall": recall,
            "f1": f1,
        }
    )
    return Calibration(float(grid[best]), int(counts[best]), len(pts), curve)


def separate_planes(
    detections: pd.DataFrame, planes: np.ndarray, yx: np.ndarray
) -> tuple[pd.DataFrame, np.ndarray]:
    """Shift each plane far apart in y so nuclei of different planes can never match.

    :func:`match_points` compares positions only; shifting plane ``k`` by ``k`` times more than
    the largest y lets it match a stack's detections and clicks plane by plane in one go.

    Parameters
    ----------
    detections : pandas.DataFrame
        Detections with ``plane, y, y0, y1`` (and the rest of the engine's columns).
    planes : (N,) int array
        Plane of each point.
    yx : (N, 2) array
        Points in table coordinates.

    Returns
    -------
    detections : pandas.DataFrame
        A copy with ``y, y0, y1`` shifted by plane.
    yx : (N, 2) array
        The points, shifted the same way.
    """
    pts = np.asarray(yx, dtype=float).reshape(-1, 2)
    span = float(
        max(detections["y1"].max() if len(detections) else 0.0, pts[:, 0].max(initial=0.0))
    )
    span += 1e3
    shifted = detections.copy()
    for col in ("y", "y0", "y1"):
        shifted[col] = detections[col] + detections["plane"].to_numpy() * span
    pts = pts.copy()
    pts[:, 0] += np.asarray(planes) * span
    return shifted, pts


def calibrate_in_rois(
    detections: pd.DataFrame,
    *,
    known_count: int | None = None,
    points: tuple[np.ndarray, np.ndarray] | None = None,
    polygons: Sequence[np.ndarray] = (),
    grid: np.ndarray = GRID,
) -> Calibration:
    """Calibrate on the detections inside ROIs: from clicked points, or from a known count.

    Parameters
    ----------
    detections : pandas.DataFrame
        The low-threshold run (table coordinates; ``plane`` for stacks).
    known_count : int, optional
        Nuclei in the ROIs (the image without ROIs); used when no ``points`` are given.
    points : (planes, yx), optional
        Clicked nucleus centres: flat plane index (N,) and table coordinates (N, 2). Only the
        points inside the ROIs count; without ROIs every nucleus of the image must be clicked.
    polygons : sequence of (M, 2+) arrays
        ROIs in table coordinates; none means the whole image.
    grid : array
        Candidate thresholds.

    Returns
    -------
    Calibration

    Raises
    ------
    ValueError
        Neither points nor a positive known count, or no clicked point inside the ROIs.
    """
    inside = in_any_roi(detections[["y", "x"]].to_numpy(float), polygons)
    dets = detections[inside]
    if points is not None:
        planes, yx = np.asarray(points[0]), np.asarray(points[1], float).reshape(-1, 2)
        keep = in_any_roi(yx, polygons)
        if not keep.any():
            raise ValueError("no clicked nucleus lies inside the ROI")
        return calibrate_by_points(*separate_planes(dets, planes[keep], yx[keep]), grid=grid)
    if known_count is None or known_count <= 0:
        raise ValueError(
            "give the known number of nuclei, or choose a Points layer of clicked nuclei"
        )
    return calibrate_by_count(dets["confidence"].to_numpy(float), int(known_count), grid=grid)
