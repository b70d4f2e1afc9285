"""Detection tables <-> napari layer data, without importing napari.

Everything here is plain numpy / pandas so it can be tested without Qt and reused by scripts:

- :func:`detections_to_layers` turns the engine's table into LayerDataTuples (a Shapes layer of
  boxes and a Points layer of centres, both carrying ``confidence`` / ``class`` features);
- :func:`to_layer_coords` / :func:`~napari_yolocell.io.coords.to_table_coords` convert between
  the table's pixel-edge convention and napari's pixel-centre convention, including the leading
  (Z, T...) axes; :func:`update_result_layers` refreshes existing result layers in place;
- :func:`apply_layer_edits` folds the user's edits of a result layer (deleted, added or moved
  boxes and points) back into the stored table, so the confidence slider filters the user's
  edited set: deleted nuclei never come back, added ones (confidence :data:`USER_CONF`) stay;
- :func:`roi_polygons` turns a Shapes layer into ROI polygons in an image's table coordinates;
- :func:`to_napari_layers` / :func:`import_dataset_layers` show a YOLO dataset for review;
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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_yolocell.io.coords import PIXEL_CENTER, to_table_coords, transform_coords
from napari_yolocell.io.tables import roi_name
from napari_yolocell.io.yolo import SPLITS, YoloDataset, YoloSample, load_image, read_yolo_dataset

__all__ = [
    "BOXES_KEY",
    "DRAWN_KEY",
    "EDITS_KEY",
    "ID",
    "LARGE_RESULT",
    "MAX_BOXES_IN_VIEW",
    "LayerDataTuple",
    "PIXEL_CENTER",
    "USER_CONF",
    "apply_layer_edits",
    "boxes_in_view",
    "boxes_name",
    "boxes_to_rectangles",
    "detections_to_layers",
    "edits_summary",
    "ellipse_polygon",
    "feature_defaults",
    "filter_detections",
    "geojson_to_layers",
    "import_dataset_layers",
    "plane_shape_of",
    "points_to_table",
    "result_names",
    "roi_polygons",
    "set_layer_features",
    "shapes_to_polygons",
    "to_layer_coords",
    "to_napari_layers",
    "to_table_coords",
    "transform_coords",
    "update_result_layers",
    "view_to_table",
]

LayerDataTuple = tuple[Any, dict[str, Any], str]

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
#: Feature of every result box / point: its row (index) in the stored table, so an edit of the
#: layer maps back to the table; items the user adds have -1 until they are given a row.
ID = "id"
#: ``metadata[DRAWN_KEY]``: the ids drawn by the last redraw (what an edit is compared with).
DRAWN_KEY = "drawn_ids"
#: Confidence given to a nucleus the user added: it is shown at every slider position.
USER_CONF = 1.0
#: ``table.attrs[EDITS_KEY]``: how many nuclei the user removed, added and moved so far.
EDITS_KEY = "edits"


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


def result_names(source_name: str, n: int) -> tuple[str, str]:
    """Names of the (boxes, nuclei) result layers of ``source_name`` holding ``n`` detections."""
    return f"{source_name} boxes ({n})", f"{nuclei_base(source_name)} ({n})"


def nuclei_base(source_name: str) -> str:
    """``<image> nuclei``, without doubling a name that already ends in "nuclei"."""
    if source_name.rstrip().lower().endswith("nuclei"):
        return source_name.rstrip()
    return f"{source_name} nuclei"


#: Per-nucleus measurements (``engine.measure`` / ``analysis.measure``) shown as features.
_MEASURED = ("area_px", "area_um2", "marker")


def _features(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "confidence": df["confidence"].to_numpy(float),
            "class": df["class"].to_numpy(np.int64),
        }
    )
    for col in df.columns:  # measured nuclei carry their means, area and marker class
        if col.startswith("mean_c") or col in _MEASURED:
            out[col] = df[col].to_numpy()
    out[ID] = np.asarray(df.index, dtype=np.int64)
    return out


def feature_defaults(features: pd.DataFrame) -> dict[str, Any]:
    """Feature values of a box or point the user adds: no row yet, confidence :data:`USER_CONF`.

    napari would otherwise copy the last item's values, id included, into a new item.
    """
    out: dict[str, Any] = {}
    for col in features.columns:
        kind = features[col].dtype.kind
        out[col] = np.nan if kind == "f" else 0 if kind in "iub" else ""
    out.update({"confidence": USER_CONF, "class": 0, ID: -1})
    return {k: v for k, v in out.items() if k in features.columns}


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
    box_features, point_features = _features(boxes), _features(shown)
    shapes_kwargs = {
        **common,
        "features": box_features,
        "feature_defaults": feature_defaults(box_features),
        "name": boxes_name(source_name, len(boxes), n, mode),
        "shape_type": "rectangle",
        "face_color": "transparent",
        "edge_width": max(1.0, side / 12),
        "metadata": {
            **meta,
            KIND_KEY: "boxes",
            BOXES_KEY: mode,
            DRAWN_KEY: box_features[ID].to_numpy(),
        },
    }
    points_kwargs = {
        **common,
        "features": point_features,
        "feature_defaults": feature_defaults(point_features),
        "name": point_name,
        "size": max(2.0, side / 4),
        "border_width": 0,
        "metadata": {**meta, KIND_KEY: "nuclei", DRAWN_KEY: point_features[ID].to_numpy()},
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


def roi_polygons(
    data: Sequence[np.ndarray],
    shape_types: Sequence[str],
    names: Sequence[Any] | None = None,
    layer_transform: tuple[Any, Any] = (None, None),
    image_transform: tuple[Any, Any] = (None, None),
) -> tuple[list[np.ndarray], list[str]]:
    """ROI polygons of a Shapes layer in an image's table coordinates, and their names.

    Parameters
    ----------
    data, shape_types : sequence
        ``Shapes.data`` and ``Shapes.shape_type`` (lines and paths enclose nothing: skipped).
    names : sequence, optional
        ``Shapes.features["name"]`` if the layer has it; default ``roi_<index>``.
    layer_transform, image_transform : (scale, translate)
        The Shapes layer's and the image's transforms (the shapes are mapped into the image).

    Returns
    -------
    polygons : list of (M, 2) arrays
        ``(y, x)`` vertices in table (pixel-edge) coordinates.
    names : list of str
    """
    polys = shapes_to_polygons(data, shape_types)
    index = [i for i, kind in enumerate(shape_types) if kind not in ("line", "path")]
    out, labels = [], []
    for i, poly in zip(index, polys, strict=True):
        verts = transform_coords(poly, *layer_transform, *image_transform)
        out.append(to_table_coords(verts[:, -2:])[1])
        labels.append(str(names[i]) if names is not None else roi_name(i))
    return out, labels


def points_to_table(
    data: np.ndarray,
    layer_transform: tuple[Any, Any] = (None, None),
    image_transform: tuple[Any, Any] = (None, None),
    plane_shape: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """A Points layer's points as ``(plane, yx)`` in an image's table coordinates.

    Parameters
    ----------
    data : (N, D) array
        ``Points.data``.
    layer_transform, image_transform : (scale, translate)
        The Points layer's and the image's transforms (the points are mapped into the image).
    plane_shape : sequence of int
        Shape of the image's leading axes (a point's plane is the nearest one).

    Returns
    -------
    planes : (N,) int array
    yx : (N, 2) float array
    """
    return to_table_coords(transform_coords(data, *layer_transform, *image_transform), plane_shape)


def view_to_table(
    centre: Sequence[float],
    half: Sequence[float],
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
) -> tuple[float, float, float, float]:
    """The visible world rectangle ``centre +- half`` as ``(y0, x0, y1, x1)`` of an image's table.

    Parameters
    ----------
    centre, half : (2,) sequence of float
        Centre and half size of the view in world ``(y, x)``.
    scale, translate : sequence of float, optional
        The image layer's transform (its last two entries are used).
    """
    c, h = np.asarray(centre, float)[-2:], np.asarray(half, float)[-2:]
    scale = np.asarray(scale if scale is not None else [1.0, 1.0], float)[-2:]
    shift = np.asarray(translate if translate is not None else [0.0, 0.0], float)[-2:]
    a = (c - h - shift) / scale + PIXEL_CENTER
    b = (c + h - shift) / scale + PIXEL_CENTER
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _colour_by_confidence(layer: Any, attr: str, n: int) -> None:
    """A layer created empty has a constant colour: switch it to the confidence colormap."""
    if not n:
        return
    if getattr(layer, f"{attr}_color_mode") != "colormap":
        setattr(layer, f"{attr}_color", "confidence")
        setattr(layer, f"{attr}_colormap", COLORMAP)
        setattr(layer, f"{attr}_contrast_limits", (0.0, 1.0))
    layer.refresh_colors()


def set_layer_features(layer: Any, features: pd.DataFrame) -> None:
    """Give ``layer`` these features (one row per item), napari's defaults for added items,
    and remember the ids drawn (what the user's next edit is compared with)."""
    layer.features = features
    layer.feature_defaults = feature_defaults(features)
    layer.metadata[DRAWN_KEY] = features[ID].to_numpy()


def update_result_layers(
    boxes: Any,
    nuclei: Any,
    shown: pd.DataFrame,
    source: str,
    plane_shape: Sequence[int],
    conf: float,
    view: Sequence[float] | None = None,
    points: bool = True,
    redraw_boxes: bool = True,
) -> None:
    """Show ``shown`` in the existing result layers (keeps user styling and layer order).

    Above :data:`LARGE_RESULT` rows only the boxes in ``view`` are drawn; ``points=False``
    leaves the points layer alone (only the visible region changed), ``redraw_boxes=False``
    leaves the boxes alone but renames the layer (the user has just edited it). ``boxes`` and
    ``nuclei`` are napari Shapes and Points layers (duck-typed: napari is not imported here).
    """
    drawn, mode = boxes_in_view(shown, view)
    if redraw_boxes:
        boxes.data = list(to_layer_coords(drawn, plane_shape)[1])
        set_layer_features(boxes, _features(drawn))
        boxes.metadata[BOXES_KEY] = mode
        _colour_by_confidence(boxes, "edge", len(drawn))
        boxes.name = boxes_name(source, len(drawn), len(shown), mode)
    else:
        boxes.name = boxes_name(source, len(boxes.data), len(shown), mode)
    boxes.metadata["conf"] = conf
    if not points:  # the count may still have changed (an edit of the boxes)
        nuclei.name = result_names(source, len(shown))[1]
        return
    nuclei.data = to_layer_coords(shown, plane_shape)[0]
    set_layer_features(nuclei, _features(shown))
    _colour_by_confidence(nuclei, "face", len(shown))
    nuclei.metadata["conf"] = conf
    nuclei.name = result_names(source, len(shown))[1]


def _geometry(kind: str, data: Any, plane_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(planes, geometry)`` of a layer's items in table coordinates: ``y0 x0 y1 x1`` of each
    box (its vertices' extent) or ``y x`` of each point."""
    if kind == "nuclei":
        pts = np.asarray(data, float)
        return to_table_coords(pts.reshape(len(pts), -1) if len(pts) else pts, plane_shape)
    planes, geom = np.zeros(len(data), np.int64), np.zeros((len(data), 4))
    for i, verts in enumerate(data):
        plane, yx = to_table_coords(np.asarray(verts, float), plane_shape)
        planes[i], geom[i] = plane[0], np.concatenate([yx.min(axis=0), yx.max(axis=0)])
    return planes, geom


def _boxes_of(kind: str, geom: np.ndarray, half: np.ndarray) -> np.ndarray:
    """``y0 x0 y1 x1`` of each item: a box as it is, a point centred in a box of ``half`` sides."""
    if kind == "nuclei":
        return np.concatenate([geom - half, geom + half], axis=1)
    return geom


def apply_layer_edits(
    table: pd.DataFrame,
    kind: str,
    data: Any,
    ids: Sequence[Any],
    drawn: Sequence[Any],
    plane_shape: Sequence[int] = (),
) -> tuple[pd.DataFrame, np.ndarray]:
    """The stored table after the user edited one result layer, and each item's row id.

    Parameters
    ----------
    table : pandas.DataFrame
        The stored (low-threshold) table; its index identifies the rows.
    kind : {"boxes", "nuclei"}
        A Shapes layer of boxes or a Points layer of centres.
    data : sequence
        The layer's data now (rectangle vertices, or point coordinates), in data coordinates.
    ids : sequence of int
        The layer's :data:`ID` feature now; -1 (or a repeated id) marks an item the user added.
    drawn : sequence of int
        The ids drawn by the last redraw: those missing from ``ids`` were deleted.
    plane_shape : sequence of int
        Shape of the image's leading axes.

    Returns
    -------
    table : pandas.DataFrame
        Deleted rows dropped, moved ones updated (a moved point keeps its box size), added
        ones appended with confidence :data:`USER_CONF` (a point gets a box of the median
        size); ``attrs`` kept, with :data:`EDITS_KEY` counting removed / added / moved nuclei.
        The same object when nothing changed.
    ids : (N,) int array
        The row id of each layer item, in layer order (new rows included).
    """
    ids = np.asarray(ids, dtype=float).reshape(-1)
    known = np.isin(ids, np.asarray(table.index, dtype=float))
    known &= ~pd.Series(ids).duplicated().to_numpy()  # a copy of an item is a new item
    removed = np.setdiff1d(np.asarray(drawn, dtype=np.int64), ids[known].astype(np.int64))
    planes, geom = _geometry(kind, data, plane_shape)
    rows = ids[known].astype(np.int64)
    old = table.loc[rows]
    cols = ["y", "x"] if kind == "nuclei" else ["y0", "x0", "y1", "x1"]
    changed = (old["plane"].to_numpy() != planes[known]) | ~np.isclose(
        old[cols].to_numpy(float), geom[known], atol=1e-6
    ).all(axis=1)
    half = (old[["y1", "x1"]].to_numpy(float) - old[["y0", "x0"]].to_numpy(float)) / 2
    next_id = int(max(table.index, default=-1)) + 1
    new_ids = np.empty(len(ids), np.int64)
    new_ids[known] = rows
    new_ids[~known] = np.arange(next_id, next_id + int((~known).sum()))
    if not (len(removed) or changed.any() or (~known).any()):
        return table, new_ids
    out = table.drop(index=removed)
    if changed.any():
        boxes = _boxes_of(kind, geom[known][changed], half[changed])
        _set_boxes(out, rows[changed], planes[known][changed], boxes)
    if (~known).any():
        boxes = _boxes_of(kind, geom[~known], _median_half(table))
        added = pd.DataFrame(index=pd.Index(new_ids[~known]), columns=out.columns)
        _set_boxes(added, new_ids[~known], planes[~known], boxes)
        added["confidence"], added["class"] = USER_CONF, 0
        out = pd.concat([out, added.astype(out.dtypes.to_dict(), errors="ignore")])
    out.attrs = dict(table.attrs)
    before = dict(table.attrs.get(EDITS_KEY) or {})
    counts = {"removed": len(removed), "added": int((~known).sum()), "moved": int(changed.sum())}
    out.attrs[EDITS_KEY] = {k: int(before.get(k, 0)) + n for k, n in counts.items()}
    return out, new_ids


def _set_boxes(df: pd.DataFrame, rows: np.ndarray, planes: np.ndarray, boxes: np.ndarray) -> None:
    """Write planes, boxes and their centres into rows of ``df`` (in place)."""
    df.loc[rows, ["y0", "x0", "y1", "x1"]] = boxes
    df.loc[rows, "plane"] = planes
    df.loc[rows, "y"] = (boxes[:, 0] + boxes[:, 2]) / 2
    df.loc[rows, "x"] = (boxes[:, 1] + boxes[:, 3]) / 2


def _median_half(table: pd.DataFrame) -> np.ndarray:
    """Half the median box side (y, x) of the table: the box given to a clicked nucleus."""
    if not len(table):
        return np.array([5.0, 5.0])
    sides = table[["y1", "x1"]].to_numpy(float) - table[["y0", "x0"]].to_numpy(float)
    return np.median(sides, axis=0) / 2


def edits_summary(table: pd.DataFrame) -> str:
    """``"your edits: 7 removed, 2 added"`` (empty when the user has not edited the result)."""
    edits = table.attrs.get(EDITS_KEY) or {}
    parts = [f"{n} {what}" for what, n in edits.items() if n]
    return f"your edits: {', '.join(parts)}" if parts else ""


# --------------------------------------------------------------------------- YOLO datasets


def boxes_to_rectangles(boxes: np.ndarray) -> list[np.ndarray]:
    """``(N, 4)`` y0, x0, y1, x1 -> napari rectangle vertices ``(4, 2)`` (row, col) each.

    Boxes are by pixel edges (pixel ``i`` spans ``[i, i+1)``); napari puts pixel centres on
    whole numbers, so vertices are shifted by -0.5 to sit on the pixel edges on screen. Reading
    shapes back (:func:`~napari_yolocell.training.annotations.annotation_boxes`) adds the 0.5
    again: boxes round-trip.
    """
    out = []
    for y0, x0, y1, x1 in np.asarray(boxes, float).reshape(-1, 4) - PIXEL_CENTER:
        out.append(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]]))
    return out


def geojson_to_layers(ann: Any, name: str) -> list[LayerDataTuple]:
    """QuPath annotations (:class:`~napari_yolocell.io.geojson.GeoJsonAnnotations`) as a
    Points layer (clicked centres) and a Shapes layer (polygons), for training.

    Table coordinates (pixel edges) become layer coordinates (pixel centres on whole numbers,
    -:data:`PIXEL_CENTER`); with any object off plane 0, coordinates get a leading ``z``.
    Features ``class`` and ``name`` keep QuPath's classification and name.
    """
    out: list[LayerDataTuple] = []
    stack = bool(np.any(ann.point_z) or np.any(ann.polygon_z))

    def features(classes, names) -> pd.DataFrame:
        return pd.DataFrame({"class": [c or "" for c in classes], "name": [n or "" for n in names]})

    if len(ann.points):
        yx = np.asarray(ann.points, float) - PIXEL_CENTER
        data = np.column_stack([ann.point_z, yx]) if stack else yx
        meta = {
            "name": f"{name} points",
            "features": features(ann.point_classes, ann.point_names),
            "size": 6,
        }
        out.append((data, meta, "points"))
    if ann.polygons:
        polys = []
        for z, poly in zip(ann.polygon_z, ann.polygons, strict=True):
            yx = np.asarray(poly, float) - PIXEL_CENTER
            polys.append(np.column_stack([np.full(len(yx), z), yx]) if stack else yx)
        meta = {
            "name": f"{name} polygons",
            "shape_type": "polygon",
            "features": features(ann.polygon_classes, ann.polygon_names),
            "edge_color": "yellow",
            "face_color": "transparent",
        }
        out.append((polys, meta, "shapes"))
    return out


def to_napari_layers(sample: YoloSample, image: np.ndarray | None = None) -> list[LayerDataTuple]:
    """Image + Shapes layer data tuples for reviewing one dataset image in napari.

    Parameters
    ----------
    sample : YoloSample
        Sample from :func:`~napari_yolocell.io.yolo.read_yolo_dataset`.
    image : numpy.ndarray, optional
        Pixels if already loaded; read from ``sample.image_path`` otherwise.

    Returns
    -------
    list of LayerDataTuple
        ``[(image, image_kwargs, "image"), (rectangles, shapes_kwargs, "shapes")]``; the shapes
        carry ``features`` ``class`` (id) and ``class_name``. No viewer is touched.
    """
    data = load_image(sample.image_path) if image is None else np.asarray(image)
    stem = sample.image_path.stem
    image_kwargs: dict[str, Any] = {
        "name": stem,
        "rgb": data.ndim == 3 and data.shape[-1] in (3, 4),
        "metadata": {"path": str(sample.image_path), "split": sample.split},
    }
    features = {
        "class": np.asarray(sample.classes, int),
        "class_name": np.asarray(sample.class_names, dtype=object),
    }
    shapes_kwargs: dict[str, Any] = {
        "name": f"{stem} boxes",
        "shape_type": "rectangle",
        "features": features,
        "edge_color": "yellow",
        "face_color": "transparent",
        "edge_width": max(1.0, min(sample.shape) / 500),
        "metadata": {
            "label_path": str(sample.label_path) if sample.label_path else None,
            "names": list(sample.names),
        },
    }
    return [
        (data, image_kwargs, "image"),
        (boxes_to_rectangles(sample.boxes), shapes_kwargs, "shapes"),
    ]


def import_dataset_layers(
    path: str | Path, split: str | None = None, max_images: int = 20
) -> tuple[list[LayerDataTuple], YoloDataset]:
    """Image + Shapes LayerDataTuples for the first images of a YOLO dataset.

    Parameters
    ----------
    path : str or Path
        Dataset folder or its ``data.yaml``.
    split : str, optional
        ``train``, ``val`` or ``test``; None = all.
    max_images : int
        At most this many images are loaded (review, not bulk loading); each file once.

    Returns
    -------
    layers : list of LayerDataTuple
    dataset : YoloDataset
        With ``problems`` (orphan labels, bad lines...) to report.
    """
    dataset = read_yolo_dataset(path, splits=(split,) if split else SPLITS, warn=False)
    layers: list[LayerDataTuple] = []
    for sample in dataset.unique_images(max_images):
        layers += to_napari_layers(sample)
    return layers, dataset
