"""Per-nucleus measurements: mean raw intensity per channel and area.

The region measured is the ellipse inscribed in the detection box (centre = box centre,
semi-axes = half the box's height and width): a box-shaped detector gives no outline, and
nuclei are roughly elliptic, so the inscribed ellipse holds mostly nucleus and little
background. A pixel belongs to it when its centre (``i + 0.5``) lies inside the ellipse;
``area_px`` is the number of such pixels (at least 1: a box smaller than a pixel counts the
pixel holding its centre), ``area_um2`` that count times the pixel area when the pixel size is
known. Intensities are the raw values of the full-resolution level (no normalisation).

Large images stay on disk: nuclei are grouped into blocks of about ``block`` x ``block``
pixels and each block's window (all channels) is read once, so memory is bounded by one window
whatever the image size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

# The engine's own layout rules (which axes are Y, X, channel, planes) and window reads: the
# measurements must address exactly the pixels the detections were found in.
from napari_yolocell.engine.detect import _layout, _materialise

__all__ = ["MEASURE_BLOCK", "measure_columns", "measure_nuclei"]

#: Side of the blocks nuclei are grouped into (one window read per block), full-res pixels.
MEASURE_BLOCK = 1024


def measure_columns(n_channels: int, pixel_size: bool) -> list[str]:
    """Names of the measurement columns: ``mean_c0..``, ``area_px`` (and ``area_um2``)."""
    return [*(f"mean_c{c}" for c in range(n_channels)), "area_px"] + (
        ["area_um2"] if pixel_size else []
    )


def _ellipse_mask(y0: float, x0: float, y1: float, x1: float, oy: int, ox: int, shape) -> tuple:
    """Pixels (rows, cols of the window at ``oy, ox``) whose centres lie in the inscribed
    ellipse of the box, clipped to the window."""
    h, w = shape
    r0, r1 = max(int(math.floor(y0)) - oy, 0), min(int(math.ceil(y1)) - oy, h)
    c0, c1 = max(int(math.floor(x0)) - ox, 0), min(int(math.ceil(x1)) - ox, w)
    cy, cx = (y0 + y1) / 2 - oy, (x0 + x1) / 2 - ox
    ry, rx = max((y1 - y0) / 2, 1e-9), max((x1 - x0) / 2, 1e-9)
    if r1 <= r0 or c1 <= c0:
        return np.zeros(0, int), np.zeros(0, int)
    yy = (np.arange(r0, r1) + 0.5 - cy)[:, None] / ry
    xx = (np.arange(c0, c1) + 0.5 - cx)[None, :] / rx
    rows, cols = np.nonzero(yy * yy + xx * xx <= 1.0)
    if rows.size == 0:  # box smaller than a pixel: the pixel holding its centre
        rows = np.array([min(max(int(cy), r0), r1 - 1) - r0])
        cols = np.array([min(max(int(cx), c0), c1 - 1) - c0])
    return rows + r0, cols + c0


def measure_nuclei(
    image,
    df: pd.DataFrame,
    channel_axis: int | None = None,
    *,
    rgb: bool | None = None,
    pixel_size_um: tuple[float, float] | None = None,
    block: int = MEASURE_BLOCK,
) -> pd.DataFrame:
    """Mean raw intensity of every channel and the area of each nucleus.

    Parameters
    ----------
    image : array-like or list of array-like
        The image the detections come from (numpy, zarr or dask; lazy stays lazy), or its
        pyramid levels (full resolution first; only level 0 is read). Same layout rules as
        :func:`~napari_yolocell.engine.detect.detect_image`.
    df : pandas.DataFrame
        Detections (``plane, y0, x0, y1, x1`` in full-resolution pixels; other columns kept).
    channel_axis : int, optional
        Axis holding channels; every channel is measured. RGB(A) images measure each colour.
    rgb : bool, optional
        Whether the last axis is colour; None guesses as the detection engine does.
    pixel_size_um : (float, float), optional
        Pixel size (y, x) in micrometres; adds ``area_um2``.
    block : int
        Nuclei are grouped by centre into blocks this many pixels wide; one window is read
        per block.

    Returns
    -------
    pandas.DataFrame
        A copy of ``df`` with ``mean_c0, mean_c1, ...`` (mean over the pixels of the inscribed
        ellipse of the box, raw values), ``area_px`` (number of those pixels) and, with a pixel
        size, ``area_um2`` appended after the existing columns; same row order.

    Raises
    ------
    ValueError
        A plane index out of range, or a bad image (as for detection).
    """
    layout = _layout(image, channel_axis, rgb)
    arr = layout.levels[0]
    if layout.channel_axis is not None:
        n_channels = int(arr.shape[layout.channel_axis])
    elif layout.rgb:
        n_channels = int(arr.shape[-1])
    else:
        n_channels = 1
    cols = measure_columns(n_channels, pixel_size_um is not None)
    out = df.copy()
    means = np.full((len(df), n_channels), np.nan)
    areas = np.zeros(len(df), dtype=np.int64)
    if len(df):
        plane_index = list(itertools.product(*(range(n) for n in layout.plane_shape)))
        planes = df["plane"].to_numpy(int) if "plane" in df.columns else np.zeros(len(df), int)
        if planes.min() < 0 or planes.max() >= len(plane_index):
            raise ValueError(
                f"plane {planes.max()} out of range (the image has {len(plane_index)})"
            )
        boxes = df[["y0", "x0", "y1", "x1"]].to_numpy(float)
        height, width = int(arr.shape[layout.y_axis]), int(arr.shape[layout.x_axis])
        by = ((boxes[:, 0] + boxes[:, 2]) / 2 // block).astype(np.int64)
        bx = ((boxes[:, 1] + boxes[:, 3]) / 2 // block).astype(np.int64)
        # one window per (plane, block row, block column), read in file order (rows first)
        order = np.lexsort((bx, by, planes))
        keys = np.stack([planes[order], by[order], bx[order]], axis=1)
        starts = np.flatnonzero(np.r_[True, np.any(keys[1:] != keys[:-1], axis=1)])
        for start, stop in zip(starts, [*starts[1:], len(order)], strict=True):
            rows = order[start:stop]
            b = boxes[rows]
            oy, ox = max(int(math.floor(b[:, 0].min())), 0), max(int(math.floor(b[:, 1].min())), 0)
            ey = min(int(math.ceil(b[:, 2].max())), height)
            ex = min(int(math.ceil(b[:, 3].max())), width)
            if ey <= oy or ex <= ox:
                continue
            window = _read_window(arr, layout, plane_index[planes[rows[0]]], oy, ey, ox, ex)
            for row, (y0, x0, y1, x1) in zip(rows, b, strict=True):
                rr, cc = _ellipse_mask(y0, x0, y1, x1, oy, ox, window.shape[:2])
                if rr.size:
                    means[row] = window[rr, cc].mean(axis=0)
                    areas[row] = rr.size
    for c in range(n_channels):
        out[f"mean_c{c}"] = means[:, c]
    out["area_px"] = areas
    if pixel_size_um is not None:
        out["area_um2"] = areas * float(pixel_size_um[0]) * float(pixel_size_um[1])
    return out[[*df.columns, *(c for c in cols if c not in df.columns)]]


def _read_window(arr, layout, plane: Sequence[int], y0: int, y1: int, x0: int, x1: int):
    """(h, w, C) float64 window of one plane with every channel (C = 1 without channels)."""
    index: list = [slice(None)] * len(arr.shape)
    for axis, i in zip(layout.plane_axes, plane, strict=True):
        index[axis] = i
    index[layout.y_axis], index[layout.x_axis] = slice(y0, y1), slice(x0, x1)
    data = _materialise(arr[tuple(index)]).astype(np.float64, copy=False)
    # axes left, in order: channel (if any), Y, X, colour (if RGB)
    kept = [a for a in range(len(arr.shape)) if not isinstance(index[a], (int, np.integer))]
    if layout.channel_axis is not None:
        data = np.moveaxis(data, kept.index(layout.channel_axis), -1)
    elif not layout.rgb:
        data = data[..., None]
    return data
