"""Regions of interest: which detections fall inside which polygon."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from skimage.measure import points_in_poly

__all__ = ["count_in_rois", "in_roi"]


def in_roi(yx: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Boolean mask of the points ``yx`` (N, 2) lying inside ``polygon`` (M, 2+; last two = y, x).

    napari rectangles, ellipses and polygons all store vertices, so one test fits all
    (an ellipse is approximated by its vertices' polygon only if it was converted; rectangles
    and polygons are exact).
    """
    pts = np.asarray(yx, dtype=float).reshape(-1, 2)
    poly = np.asarray(polygon, dtype=float)[:, -2:]
    if len(pts) == 0:
        return np.zeros(0, dtype=bool)
    return points_in_poly(pts, poly)


def count_in_rois(
    detections: pd.DataFrame, polygons: Sequence[np.ndarray], names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Count detections whose centre lies inside each ROI polygon.

    Returns
    -------
    pandas.DataFrame
        Columns ``plane, roi, count``: one row per plane and ROI (a nucleus in two overlapping
        ROIs counts in both).
    """
    names = list(names) if names is not None else [f"roi_{i}" for i in range(len(polygons))]
    planes = sorted(detections["plane"].unique()) if len(detections) else [0]
    rows = []
    for plane in planes:
        d = detections[detections["plane"] == plane]
        yx = d[["y", "x"]].to_numpy()
        for name, poly in zip(names, polygons, strict=True):
            rows.append({"plane": int(plane), "roi": name, "count": int(in_roi(yx, poly).sum())})
    return pd.DataFrame(rows, columns=["plane", "roi", "count"])
