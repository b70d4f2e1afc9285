"""Turn the annotations a biologist has (napari Shapes, Points, Labels) into bounding boxes.

All boxes are ``(N, 4)`` float arrays ``y0, x0, y1, x1`` in pixels of the image they annotate,
with ``y1``/``x1`` exclusive (a one-pixel object at row 3, column 5 is ``3, 5, 4, 6``): pixel
``i`` spans ``[i, i+1)``. napari's layer coordinates put pixel centres on whole numbers, so add
0.5 to Shapes vertices and Points before calling these functions (the widgets and the CLI do),
or give the layer data as it is to :func:`annotation_boxes`, which does it and checks the
annotations against the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from skimage.measure import regionprops

from napari_yolocell.io.coords import PIXEL_CENTER, to_table_coords, transform_coords

__all__ = [
    "BoxReport",
    "annotation_boxes",
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


def annotation_boxes(
    kind: str,
    annotations: Any,
    image_shape: Sequence[int],
    *,
    diameter: float = 20.0,
    shape_types: Sequence[str] | None = None,
    image_scale: Sequence[float] | None = None,
    image_translate: Sequence[float] | None = None,
    ann_scale: Sequence[float] | None = None,
    ann_translate: Sequence[float] | None = None,
    name: str = "annotations",
) -> dict[int, np.ndarray]:
    """Boxes per annotated plane, in image pixels, from a napari annotation layer's data.

    Parameters
    ----------
    kind : {"shapes", "points", "labels"}
        Annotation layer type.
    annotations : list of arrays, or array
        ``Shapes.data``, ``Points.data`` or ``Labels.data``, in napari data coordinates.
    image_shape : sequence of int
        Shape of the annotated image without a colour axis: ``(..., Y, X)``.
    diameter : float
        Nucleus diameter (image pixels) for the square box around each clicked point.
    shape_types : sequence of str, optional
        ``Shapes.shape_type`` (lines and paths are rejected; default all rectangles).
    image_scale, image_translate, ann_scale, ann_translate : sequence of float, optional
        Layer transforms; shapes and points are mapped into image pixels through world
        coordinates. A Labels layer must match the image pixel for pixel.
    name : str
        The annotation layer's name, for the messages.

    Returns
    -------
    dict of int to (N, 4) array
        ``y0, x0, y1, x1`` boxes (exclusive ends) by flat (C-order) index of the leading axes;
        only planes holding annotations are present.

    Raises
    ------
    ValueError
        Empty annotations, dimensionality or shape not matching the image, lines or paths in
        a Shapes layer, or no annotation inside the image.
    """
    shape = tuple(int(n) for n in image_shape)
    if kind == "labels":
        per_plane = _label_boxes(annotations, shape, name)
    elif kind in ("shapes", "points"):
        items = list(annotations) if kind == "shapes" else np.asarray(annotations)
        if len(items) == 0:
            what = "draw boxes around nuclei" if kind == "shapes" else "click nuclei"
            raise ValueError(f"annotation layer {name!r} is empty: {what} first")
        ann_ndim = np.asarray(items[0]).shape[-1]
        if ann_ndim != len(shape):
            raise ValueError(
                f"annotation layer {name!r} is {ann_ndim}-D but the image is "
                f"{len(shape)}-D {shape}: annotate on a layer matching the image"
            )
        transform = (ann_scale, ann_translate, image_scale, image_translate)
        if kind == "shapes":
            types = list(shape_types) if shape_types is not None else ["rectangle"] * len(items)
            if any(t in ("line", "path") for t in types):
                raise ValueError(
                    f"annotation layer {name!r} holds lines or paths: use "
                    "rectangles, ellipses or polygons around nuclei"
                )
            verts = [transform_coords(v, *transform) for v in items]
            planes = np.array([to_table_coords(v[:1], shape[:-2])[0][0] for v in verts])
            boxes = boxes_from_shapes([v[:, -2:] for v in verts]) + PIXEL_CENTER
        else:
            planes, yx = to_table_coords(transform_coords(items, *transform), shape[:-2])
            boxes = boxes_from_points(yx, diameter)  # to_table_coords added the 0.5
        per_plane = {int(p): boxes[planes == p] for p in np.unique(planes)}
    else:
        raise ValueError(f"unknown annotation kind {kind!r} (shapes, points or labels)")
    _check_inside(per_plane, shape[-2:], name)
    return per_plane


def _label_boxes(labels: Any, shape: tuple[int, ...], name: str) -> dict[int, np.ndarray]:
    """One box per label, plane by plane, of a Labels layer painted on the image."""
    if tuple(labels.shape) != shape:
        raise ValueError(
            f"annotation layer {name!r} has shape {tuple(labels.shape)} "
            f"but the image has {shape}: paint the labels on this image"
        )
    plane_shape = shape[:-2]
    per_plane = {}
    for index in np.ndindex(*plane_shape):
        boxes = boxes_from_labels(np.asarray(labels[index]))
        if len(boxes):
            per_plane[int(np.ravel_multi_index(index, plane_shape)) if plane_shape else 0] = boxes
    if not per_plane:
        raise ValueError(f"annotation layer {name!r} is empty: paint nuclei first")
    return per_plane


def _check_inside(per_plane: dict[int, np.ndarray], hw: Sequence[int], name: str) -> None:
    """Refuse annotations that all miss the image: a scale or translate went wrong."""
    h, w = hw
    inside = sum(
        int(np.sum((b[:, 2] > 0) & (b[:, 3] > 0) & (b[:, 0] < h) & (b[:, 1] < w)))
        for b in per_plane.values()
    )
    if inside == 0:
        raise ValueError(
            f"none of the annotations of {name!r} lies inside the {h} x {w} "
            "image: check the layers' scale and translate"
        )


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
