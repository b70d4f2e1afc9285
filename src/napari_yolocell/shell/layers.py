"""Detection tables <-> napari layer data, without importing napari.

Everything here is plain numpy / pandas so it can be tested without Qt and reused by scripts:

- :func:`detections_to_layers` turns the engine's table into LayerDataTuples (a Shapes layer of
  boxes and a Points layer of centres, both carrying ``confidence`` / ``class`` features);
- :func:`to_layer_coords` / :func:`to_table_coords` convert between the table's pixel-edge
  convention and napari's pixel-centre convention, including the leading (Z, T...) axes;
- :func:`detections_csv_table`, :func:`counts_table` and :func:`write_csv_atomic` make the CSV
  exports of the widget;
- :func:`boxes_in_view` picks the boxes drawn for large results (more than
  :data:`LARGE_RESULT` detections): napari needs about a millisecond per rectangle, so only the
  boxes in the visible region (at most :data:`MAX_BOXES_IN_VIEW`) become shapes, while the
  Points layer always holds every detection.

Coordinates: the engine reports boxes by pixel *edges* (a one-pixel nucleus at row 3 spans
``y0 = 3`` to ``y1 = 4``), while napari puts pixel *centres* on integer coordinates (row 3 spans
2.5 to 3.5). Layer coordinates are therefore the table's minus :data:`PIXEL_CENTER`.
The result layers get the image layer's ``scale`` and ``translate``, so they overlay it in world
(physical) coordinates whatever the pixel size.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "COUNT_COLUMNS",
    "CSV_COLUMNS",
    "BOXES_KEY",
    "LARGE_RESULT",
    "MAX_BOXES_IN_VIEW",
    "LayerDataTuple",
    "PIXEL_CENTER",
    "boxes_in_view",
    "boxes_name",
    "counts_table",
    "detections_csv_table",
    "detections_to_layers",
    "ellipse_polygon",
    "filter_detections",
    "plane_shape_of",
    "result_names",
    "shapes_to_polygons",
    "to_layer_coords",
    "to_table_coords",
    "transform_coords",
    "write_csv_atomic",
]

LayerDataTuple = tuple[Any, dict[str, Any], str]

PIXEL_CENTER = 0.5
CSV_COLUMNS = ["image", "plane", "y", "x", "y0", "x0", "y1", "x1", "confidence", "class"]
COUNT_COLUMNS = ["image", "plane", "roi", "count"]
# Bright at every confidence on a dark fluorescence background (viridis' low end is not).
COLORMAP = "turbo"
# Metadata keys that mark a layer as a detection result of a given source image.
SOURCE_KEY = "yolocell_source"
KIND_KEY = "yolocell_kind"
#: Above this many (shown) detections the boxes layer holds only the boxes in view; the points
#: layer still holds all. napari builds a Shapes layer at roughly 1 ms per rectangle.
LARGE_RESULT = 20_000
#: Most boxes drawn for one view of a large result; zoomed out further, none are drawn (the
#: points show every nucleus) so a button press never freezes the viewer for long.
MAX_BOXES_IN_VIEW = 5_000
#: ``metadata["boxes"]`` of a boxes layer: "all", or "view" when it holds the in-view subset.
BOXES_KEY = "boxes"


def filter_detections(df: pd.DataFrame, conf: float | None) -> pd.DataFrame:
    """Rows with ``confidence >= conf`` (all rows for None); ``attrs`` are kept."""
    if conf is None:
        return df
    out = df[df["confidence"] >= conf]
    out.attrs = dict(df.attrs)
    return out


def plane_shape_of(df: pd.DataFrame, plane_shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """Shape of the leading (non-Y/X) axes: given, else ``df.attrs["plane_shape"]``, else ()."""
    if plane_shape is not None:
        return tuple(int(n) for n in plane_shape)
    attr = df.attrs.get("plane_shape")
    if attr is not None:
        return tuple(int(n) for n in attr)
    if len(df) and int(df["plane"].max()) > 0:
        return (int(df["plane"].max()) + 1,)
    return ()


def _leading(planes: np.ndarray, plane_shape: tuple[int, ...]) -> np.ndarray:
    """(N, len(plane_shape)) indices of the leading axes for flat C-order plane numbers."""
    planes = np.asarray(planes, dtype=np.int64)
    if not plane_shape:
        return np.zeros((len(planes), 0))
    if len(planes) and (planes.min() < 0 or planes.max() >= int(np.prod(plane_shape))):
        raise ValueError(f"plane index out of range for plane shape {plane_shape}")
    return np.stack(np.unravel_index(planes, plane_shape), axis=1).astype(float)


def to_layer_coords(
    df: pd.DataFrame, plane_shape: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Napari data coordinates of the detections.

    Parameters
    ----------
    df : pandas.DataFrame
        Engine table (``plane, y, x, y0, x0, y1, x1, ...``).
    plane_shape : sequence of int, optional
        Shape of the leading axes; default from ``df.attrs`` (see :func:`plane_shape_of`).

    Returns
    -------
    centres : (N, D) array
        ``(*leading, y, x)`` of each centre.
    rectangles : (N, 4, D) array
        Corners of each box, in napari's rectangle vertex order.
    """
    shape = plane_shape_of(df, plane_shape)
    lead = _leading(df["plane"].to_numpy(), shape)
    n, k = len(df), lead.shape[1]
    yx = df[["y", "x"]].to_numpy(float) - PIXEL_CENTER
    centres = np.concatenate([lead, yx], axis=1)
    y0, x0, y1, x1 = (df[c].to_numpy(float) - PIXEL_CENTER for c in ("y0", "x0", "y1", "x1"))
    rects = np.empty((n, 4, k + 2))
    rects[:, :, :k] = lead[:, None, :]
    rects[:, :, k:] = np.stack(
        [
            np.stack([y0, x0], 1),
            np.stack([y0, x1], 1),
            np.stack([y1, x1], 1),
            np.stack([y1, x0], 1),
        ],
        axis=1,
    )
    return centres, rects


def to_table_coords(
    coords: np.ndarray, plane_shape: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`to_layer_coords` for points: ``(plane, yx)`` in table convention.

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


def result_names(source_name: str, n: int) -> tuple[str, str]:
    """Names of the (boxes, nuclei) result layers of ``source_name`` holding ``n`` detections."""
    return f"{source_name} boxes ({n})", f"{source_name} nuclei ({n})"


def _features(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "confidence": df["confidence"].to_numpy(float),
            "class": df["class"].to_numpy(np.int64),
        }
    )


def boxes_in_view(
    shown: pd.DataFrame,
    view: Sequence[float] | None,
    large: int = LARGE_RESULT,
    max_boxes: int = MAX_BOXES_IN_VIEW,
) -> tuple[pd.DataFrame, str]:
    """The detections to draw as boxes, and whether that is ``"all"`` or the ``"view"`` subset.

    Parameters
    ----------
    shown : pandas.DataFrame
        Detections after the confidence filter.
    view : (y0, x0, y1, x1), optional
        Visible region in table (pixel-edge) coordinates of the image, every plane; None when
        unknown (e.g. a 3-D view).
    large : int
        Up to this many detections, all boxes are drawn.
    max_boxes : int
        Above ``large``: boxes overlapping ``view`` are drawn if there are at most this many,
        otherwise none (zoom in).

    Returns
    -------
    boxes : pandas.DataFrame
        A subset of ``shown`` (same columns, ``attrs`` kept).
    mode : {"all", "view"}
    """
    if len(shown) <= large:
        return shown, "all"
    if view is None:
        keep = np.zeros(len(shown), bool)
    else:
        y0, x0, y1, x1 = (float(v) for v in view)
        keep = (
            (shown["y1"].to_numpy(float) > y0)
            & (shown["y0"].to_numpy(float) < y1)
            & (shown["x1"].to_numpy(float) > x0)
            & (shown["x0"].to_numpy(float) < x1)
        )
        if keep.sum() > max_boxes:
            keep[:] = False
    out = shown[keep]
    out.attrs = dict(shown.attrs)
    return out, "view"


def boxes_name(source_name: str, n_boxes: int, n_total: int, mode: str) -> str:
    """Name of the boxes layer; large results say how many of the boxes are drawn."""
    if mode == "all":
        return result_names(source_name, n_total)[0]
    return f"{source_name} boxes ({n_boxes} of {n_total} in view)"


def detections_to_layers(
    df: pd.DataFrame,
    source_name: str,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    conf: float | None = None,
    plane_shape: Sequence[int] | None = None,
    view: Sequence[float] | None = None,
) -> list[LayerDataTuple]:
    """Shapes (boxes) and Points (centres) layer data for one image's detections.

    Parameters
    ----------
    df : pandas.DataFrame
        Engine table for the whole image (typically run at a low threshold).
    source_name : str
        Name of the analysed image layer; the result layers are named after it and remember it
        in ``metadata["yolocell_source"]`` (re-runs replace them).
    scale, translate : sequence of float, optional
        The image layer's, so the boxes overlay it in world coordinates.
    conf : float, optional
        Only detections with at least this confidence are drawn; the full table is kept in
        ``metadata["detections"]`` so a viewer can re-filter without re-running.
    plane_shape : sequence of int, optional
        Shape of the leading axes (default ``df.attrs["plane_shape"]``): detections of plane
        ``p`` of a (Z, Y, X) stack get coordinates ``(z, y, x)``.
    view : (y0, x0, y1, x1), optional
        Visible region in table coordinates. Used only when more than :data:`LARGE_RESULT`
        detections are shown: then the boxes layer holds only those in view (see
        :func:`boxes_in_view`; none without a view) and ``metadata["boxes"] == "view"``.
        The points layer always holds every shown detection.

    Returns
    -------
    list of LayerDataTuple
        ``[(rectangles, kwargs, "shapes"), (centres, kwargs, "points")]``. Features
        ``confidence`` and ``class``; edge (boxes) and face (points) colours map confidence
        0..1 through a colormap.
    """
    shape = plane_shape_of(df, plane_shape)
    shown = filter_detections(df, conf)
    boxes, mode = boxes_in_view(shown, view)
    centres, rects = to_layer_coords(shown, shape)
    if mode == "view":
        rects = to_layer_coords(boxes, shape)[1]
    ndim = len(shape) + 2
    n = len(shown)
    sides = (shown[["y1", "x1"]].to_numpy(float) - shown[["y0", "x0"]].to_numpy(float)).ravel()
    side = float(np.median(sides)) if n else 10.0
    common: dict[str, Any] = {"ndim": ndim}
    if scale is not None:
        common["scale"] = list(scale)
    if translate is not None:
        common["translate"] = list(translate)
    point_name = result_names(source_name, n)[1]
    meta = {SOURCE_KEY: source_name, "detections": df, "conf": conf, "plane_shape": list(shape)}
    shapes_kwargs = {
        **common,
        "features": _features(boxes),
        "name": boxes_name(source_name, len(boxes), n, mode),
        "shape_type": "rectangle",
        "face_color": "transparent",
        "edge_width": max(1.0, side / 12),
        "metadata": {**meta, KIND_KEY: "boxes", BOXES_KEY: mode},
    }
    points_kwargs = {
        **common,
        "features": _features(shown),
        "name": point_name,
        "size": max(2.0, side / 4),
        "border_width": 0,
        "metadata": {**meta, KIND_KEY: "nuclei"},
    }
    # a colour *property* on an empty layer has no values to map
    if len(boxes):
        shapes_kwargs.update(
            edge_color="confidence", edge_colormap=COLORMAP, edge_contrast_limits=(0.0, 1.0)
        )
    else:
        shapes_kwargs["edge_color"] = "yellow"
    if n:
        points_kwargs.update(
            face_color="confidence", face_colormap=COLORMAP, face_contrast_limits=(0.0, 1.0)
        )
    else:
        points_kwargs["face_color"] = "yellow"
    return [(list(rects), shapes_kwargs, "shapes"), (centres, points_kwargs, "points")]


def detections_csv_table(df: pd.DataFrame, image: str) -> pd.DataFrame:
    """The detections CSV: columns exactly :data:`CSV_COLUMNS` (table coordinates)."""
    out = df.reindex(columns=[c for c in CSV_COLUMNS if c != "image"]).copy()
    out.insert(0, "image", image)
    return out.reset_index(drop=True)


def counts_table(
    df: pd.DataFrame,
    image: str,
    polygons: Sequence[np.ndarray] | None = None,
    names: Sequence[str] | None = None,
    n_planes: int | None = None,
) -> pd.DataFrame:
    """Counts per plane (``roi = "image"``) and, with ROIs, per plane and ROI.

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
    from napari_yolocell.analysis.roi import count_in_rois

    if n_planes is None:
        n_planes = int(df.attrs.get("n_planes", int(df["plane"].max()) + 1 if len(df) else 1))
    per_plane = df.groupby("plane").size().reindex(range(n_planes), fill_value=0)
    rows = [
        {"image": image, "plane": int(p), "roi": "image", "count": int(c)}
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


def write_csv_atomic(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``table`` as CSV via a temporary file in the same folder and ``os.replace``.

    A crash or a full disk never leaves a truncated file under ``path`` (an existing file is
    only replaced once the new one is complete).
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            table.to_csv(fh, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def ellipse_polygon(corners: np.ndarray, n: int = 48) -> np.ndarray:
    """Polygon approximating a napari ellipse given by its 4 bounding-box corners (any rotation).

    Returns (n, D) vertices; leading coordinates are copied from the first corner.
    """
    c = np.asarray(corners, dtype=float)
    centre = c[:, -2:].mean(axis=0)
    u = (c[1, -2:] - c[0, -2:]) / 2
    w = (c[3, -2:] - c[0, -2:]) / 2
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
    yx = centre + np.cos(t) * u + np.sin(t) * w
    lead = np.repeat(c[:1, :-2], n, axis=0)
    return np.concatenate([lead, yx], axis=1)


def shapes_to_polygons(
    data: Sequence[np.ndarray], shape_types: Sequence[str] | None = None
) -> list[np.ndarray]:
    """ROI polygons from napari ``Shapes.data``: ellipses become polygons, lines/paths are dropped
    (they enclose nothing); rectangles and polygons are used as they are."""
    types = list(shape_types) if shape_types is not None else ["polygon"] * len(data)
    out = []
    for verts, kind in zip(data, types, strict=True):
        if kind in ("line", "path"):
            continue
        out.append(ellipse_polygon(verts) if kind == "ellipse" else np.asarray(verts, float))
    return out
