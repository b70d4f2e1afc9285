"""Layer coordinates -> table coordinates: napari's pixel centres and layer transforms.

The tables (detections, boxes of annotations) give positions by pixel *edges*: pixel ``i``
spans ``[i, i + 1)``. napari puts pixel *centres* on whole numbers (pixel ``i`` spans
``i - 0.5`` to ``i + 0.5``), so table coordinates are layer coordinates plus
:data:`PIXEL_CENTER`. Layers of one viewer are aligned through world coordinates (``scale``
and ``translate``), so annotations drawn on one layer are mapped into another's pixels with
:func:`transform_coords` first. Plain numpy: the napari shell and the core share these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["PIXEL_CENTER", "to_table_coords", "transform_coords"]

#: Table coordinate minus napari layer coordinate of the same point.
PIXEL_CENTER = 0.5


def to_table_coords(
    coords: np.ndarray, plane_shape: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Points in napari data coordinates -> ``(plane, yx)`` in table convention.

    Leading coordinates are rounded to the nearest plane (and clipped into range).

    Parameters
    ----------
    coords : (N, D) array
        Napari data coordinates of an image-aligned layer; the last two are (y, x).
    plane_shape : sequence of int
        Shape of the image's leading axes.

    Returns
    -------
    planes : (N,) int array
        Flat (C-order) plane index of each point.
    yx : (N, 2) float array
    """
    pts = np.asarray(coords, dtype=float)
    pts = pts.reshape(len(pts), -1) if pts.size else np.zeros((0, 2 + len(plane_shape)))
    yx = pts[:, -2:] + PIXEL_CENTER
    shape = tuple(plane_shape)
    if not shape or pts.shape[1] < 2 + len(shape):
        return np.zeros(len(pts), dtype=np.int64), yx
    lead = np.rint(pts[:, -2 - len(shape) : -2]).astype(np.int64)
    lead = np.clip(lead, 0, np.asarray(shape) - 1)
    return np.ravel_multi_index(lead.T, shape).astype(np.int64), yx


def transform_coords(
    coords: np.ndarray,
    from_scale: Sequence[float] | None = None,
    from_translate: Sequence[float] | None = None,
    to_scale: Sequence[float] | None = None,
    to_translate: Sequence[float] | None = None,
) -> np.ndarray:
    """Map data coordinates of one layer into another's through world coordinates.

    Only scale and translate are handled (what readers set); axes are aligned on the right,
    like napari aligns layers of different dimensionality.

    Parameters
    ----------
    coords : (N, D) array
        Data coordinates in the first layer.
    from_scale, from_translate : sequence of float, optional
        The first layer's transform (default identity).
    to_scale, to_translate : sequence of float, optional
        The second layer's transform (default identity).

    Returns
    -------
    (N, D) float array
        Data coordinates in the second layer.
    """
    pts = np.asarray(coords, dtype=float)
    if pts.size == 0:
        return pts.reshape(0, pts.shape[-1] if pts.ndim > 1 else 2)
    d = pts.shape[-1]

    def _vec(values, default):
        if values is None:
            return np.full(d, default, dtype=float)
        arr = np.asarray(values, dtype=float)
        out = np.full(d, default, dtype=float)
        n = min(d, len(arr))
        out[d - n :] = arr[len(arr) - n :]
        return out

    world = pts * _vec(from_scale, 1.0) + _vec(from_translate, 0.0)
    return (world - _vec(to_translate, 0.0)) / _vec(to_scale, 1.0)
