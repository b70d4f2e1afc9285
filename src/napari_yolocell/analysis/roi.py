"""Regions of interest: which detections fall inside which polygon."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from skimage.measure import points_in_poly

from napari_yolocell.engine.detect import counted, n_planes_of
from napari_yolocell.io.tables import COUNT_COLUMNS, WHOLE_IMAGE_ROI, roi_name

__all__ = ["count_in_rois", "counts_table", "in_any_roi", "in_roi"]


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


def in_any_roi(yx: np.ndarray, polygons: Sequence[np.ndarray]) -> np.ndarray:
    """Boolean mask of the points ``yx`` (N, 2) inside at least one polygon.

    Parameters
    ----------
    yx : (N, 2) array
        Points in table coordinates.
    polygons : sequence of (M, 2+) arrays
        ROI vertices (last two = y, x). None given means the whole image: every point is in.

    Returns
    -------
    (N,) bool array
    """
    pts = np.asarray(yx, dtype=float).reshape(-1, 2)
    if not len(polygons):
        return np.ones(len(pts), dtype=bool)
    return np.any([in_roi(pts, p) for p in polygons], axis=0)


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
    names = list(names) if names is not None else [roi_name(i) for i in range(len(polygons))]
    planes = sorted(detections["plane"].unique()) if len(detections) else [0]
    rows = []
    for plane in planes:
        d = detections[detections["plane"] == plane]
        yx = d[["y", "x"]].to_numpy()
        for name, poly in zip(names, polygons, strict=True):
            rows.append({"plane": int(plane), "roi": name, "count": int(in_roi(yx, poly).sum())})
    return pd.DataFrame(rows, columns=["plane", "roi", "count"])


def counts_table(
    df: pd.DataFrame,
    image: str,
    polygons: Sequence[np.ndarray] | None = None,
    names: Sequence[str] | None = None,
    n_planes: int | None = None,
) -> pd.DataFrame:
    """Counts per plane (``roi`` = :data:`~napari_yolocell.io.tables.WHOLE_IMAGE_ROI`) and,
    with ROIs, per plane and ROI.

    Parameters
    ----------
    df : pandas.DataFrame
        Detections already filtered by confidence.
    image : str
        Image name for the ``image`` column.
    polygons : sequence of (M, 2+) arrays, optional
        ROI vertices in table coordinates (last two = y, x); see :func:`to_table_coords`.
    names : sequence of str, optional
        ROI names (default ``roi_0``...).
    n_planes : int, optional
        Number of planes (default ``df.attrs["n_planes"]``): planes without detections count 0.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COUNT_COLUMNS`.
    """
    n_planes = n_planes_of(df, n_planes)
    df = counted(df)
    per_plane = df.groupby("plane").size().reindex(range(n_planes), fill_value=0)
    rows = [
        {"image": image, "plane": int(p), "roi": WHOLE_IMAGE_ROI, "count": int(c)}
        for p, c in per_plane.items()
    ]
    out = pd.DataFrame(rows, columns=COUNT_COLUMNS)
    if polygons:
        roi = count_in_rois(df, polygons, names)
        # count_in_rois only lists planes that have detections: complete the grid with zeros.
        names = list(roi["roi"].unique()) if names is None else list(names)
        grid = pd.MultiIndex.from_product([range(n_planes), names], names=["plane", "roi"])
        roi = roi.set_index(["plane", "roi"])["count"].reindex(grid, fill_value=0).reset_index()
        roi.insert(0, "image", image)
        out = pd.concat([out, roi[COUNT_COLUMNS]], ignore_index=True)
    out["count"] = out["count"].astype(np.int64)
    return out
