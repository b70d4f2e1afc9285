"""Turn the annotations a biologist has (napari Shapes, Points, Labels) into bounding boxes.

All boxes are ``(N, 4)`` float arrays ``y0, x0, y1, x1`` in pixels of the image they annotate,
with ``y1``/``x1`` exclusive (a one-pixel object at row 3, column 5 is ``3, 5, 4, 6``): pixel
``i`` spans ``[i, i+1)``. napari's layer coordinates put pixel centres on whole numbers, so add
0.5 to Shapes vertices and Points before calling these functions (the widgets and the CLI do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from skimage.measure import regionprops

__all__ = [
    "BoxReport",
    "boxes_from_labels",
    "boxes_from_points",
    "boxes_from_shapes",
    "clip_boxes",
]


def _as_boxes(boxes) -> np.ndarray:
    arr = np.asarray(boxes, dtype=float)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {arr.shape}")
    return arr


def boxes_from_shapes(data: Sequence[np.ndarray]) -> np.ndarray:
    """Bounding boxes of napari shapes (rectangles, polygons, ellipses, paths).

    Parameters
    ----------
    data : sequence of (M, D) arrays
        ``Shapes.data``: vertices per shape; the last two coordinates are (y, x).
        An ellipse in napari is stored by the four corners of its bounding box, so its
        vertices' extent is its box too.

    Returns
    -------
    (N, 4) float array of ``y0, x0, y1, x1``.
    """
    boxes = []
    for verts in data:
        v = np.asarray(verts, dtype=float)[:, -2:]
        (y0, x0), (y1, x1) = v.min(axis=0), v.max(axis=0)
        boxes.append((y0, x0, y1, x1))
    return _as_boxes(boxes)


def boxes_from_points(points: np.ndarray, diameter: float) -> np.ndarray:
    """Square boxes of side ``diameter`` centred on clicked nucleus centres.

    Parameters
    ----------
    points : (N, D) array
        ``Points.data``; the last two coordinates are (y, x).
    diameter : float
        Typical nucleus diameter in pixels.
    """
    if diameter <= 0:
        raise ValueError(f"diameter must be > 0 px, got {diameter}")
    pts = np.asarray(points, dtype=float)
    if pts.size == 0:
        return np.zeros((0, 4), dtype=float)
    yx = pts.reshape(len(pts), -1)[:, -2:]
    r = diameter / 2.0
    return np.column_stack([yx[:, 0] - r, yx[:, 1] - r, yx[:, 0] + r, yx[:, 1] + r])


def boxes_from_labels(labels: np.ndarray, min_area: int = 0) -> np.ndarray:
    """One box per label of an instance mask (0 = background), via ``regionprops``.

    Parameters
    ----------
    labels : (H, W) int array
        Instance labels, e.g. painted in napari or made by another segmenter.
    min_area : int
        Labels with fewer pixels are left out (specks, fragments).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (H, W), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer instance mask, got dtype {labels.dtype}")
    boxes = [r.bbox for r in regionprops(labels) if r.area >= min_area]
    return _as_boxes(boxes)


@dataclass
class BoxReport:
    """What :func:`clip_boxes` changed, to tell the user instead of silently fixing it."""

    n_in: int = 0
    n_kept: int = 0
    n_clipped: int = 0
    n_outside: int = 0
    n_degenerate: int = 0
    messages: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.n_kept} of {self.n_in} boxes kept"]
        if self.n_clipped:
            parts.append(f"{self.n_clipped} clipped to the image")
        if self.n_outside:
            parts.append(f"{self.n_outside} wholly outside the image dropped")
        if self.n_degenerate:
            parts.append(f"{self.n_degenerate} of zero size dropped")
        return ", ".join(parts)


def clip_boxes(
    boxes: np.ndarray, shape: tuple[int, int], min_size: float = 1.0
) -> tuple[np.ndarray, np.ndarray, BoxReport]:
    """Clip boxes to an image; drop those wholly outside or (after clipping) too small.

    Returns
    -------
    boxes : (K, 4) array
        The kept, clipped boxes.
    keep : (N,) bool array
        Which input boxes were kept (to carry classes along).
    report : BoxReport
    """
    b = _as_boxes(boxes)
    h, w = shape[-2], shape[-1]
    rep = BoxReport(n_in=len(b))
    # Normalise corner order: napari lets users draw rectangles from any corner.
    b = (
        np.column_stack(
            [
                np.minimum(b[:, 0], b[:, 2]),
                np.minimum(b[:, 1], b[:, 3]),
                np.maximum(b[:, 0], b[:, 2]),
                np.maximum(b[:, 1], b[:, 3]),
            ]
        )
        if len(b)
        else b
    )
    outside = (b[:, 2] <= 0) | (b[:, 3] <= 0) | (b[:, 0] >= h) | (b[:, 1] >= w)
    clipped = b.copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, h)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, w)
    changed = np.any(clipped != b, axis=1) & ~outside
    degenerate = ~outside & (
        ((clipped[:, 2] - clipped[:, 0]) < min_size) | ((clipped[:, 3] - clipped[:, 1]) < min_size)
    )
    keep = ~outside & ~degenerate
    rep.n_outside = int(outside.sum())
    rep.n_degenerate = int(degenerate.sum())
    rep.n_clipped = int((changed & keep).sum())
    rep.n_kept = int(keep.sum())
    if rep.n_outside:
        rep.messages.append(f"{rep.n_outside} box(es) lie wholly outside the {h} x {w} image")
    if rep.n_degenerate:
        rep.messages.append(f"{rep.n_degenerate} box(es) have zero size")
    return clipped[keep], keep, rep
