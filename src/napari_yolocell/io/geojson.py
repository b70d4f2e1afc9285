"""QuPath-compatible GeoJSON: detections out, annotations in.

QuPath (File > Import objects / Export objects as GeoJSON) uses plain GeoJSON features in
full-resolution pixel coordinates, x right and y down, origin at the top-left corner of the
top-left pixel: the same pixel-edge convention as our tables (pixel ``i`` spans ``[i, i + 1)``),
so coordinates are written and read without any offset. QuPath's own keys sit in
``properties`` (``objectType``, ``classification``, ``name``, ``measurements``) and, for
z-stacks and time series, in ``geometry.plane`` (``{"c": -1, "z": k, "t": n}``).

napari-free; plain dicts and numpy arrays in and out (no GeoJSON library needed at run time).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_yolocell.io.tables import CSV_COLUMNS, roi_name, write_text_atomic

__all__ = [
    "NUCLEUS_CLASS",
    "NUCLEUS_COLOR",
    "GeoJsonAnnotations",
    "detections_to_geojson",
    "geojson_paths",
    "read_geojson_annotations",
    "write_geojson",
]

#: QuPath classification of the exported nuclei.
NUCLEUS_CLASS = "Nucleus"
#: Its display colour (RGB).
NUCLEUS_COLOR = (255, 64, 64)
#: ROI annotations' colour (RGB).
ROI_COLOR = (255, 200, 0)
#: Marker classes (``marker`` column) become QuPath's derived classes ``Nucleus: Positive``.
_MARKER_CLASSES = {"positive": "Positive", "negative": "Negative"}
#: Their colours: QuPath's own for Positive (red) and Negative (blue), so the two differ.
MARKER_COLORS = {"positive": (200, 0, 0), "negative": (112, 112, 225)}


def _ring(yx: np.ndarray) -> list[list[float]]:
    """(M, 2) y, x vertices -> closed GeoJSON ring of ``[x, y]`` pairs."""
    pts = [[float(x), float(y)] for y, x in np.asarray(yx, dtype=float)[:, -2:]]
    if pts and pts[0] != pts[-1]:
        pts.append(pts[0])
    return pts


def _plane_dict(plane: int, plane_shape: Sequence[int], plane_axes: str) -> dict[str, int]:
    """Flat plane index -> QuPath's ``{"c": -1, "z": .., "t": ..}`` (c = -1: all channels)."""
    out = {"c": -1, "z": 0, "t": 0}
    if plane_shape:
        index = np.unravel_index(int(plane), tuple(int(n) for n in plane_shape))
    else:
        index = (int(plane),)
    for letter, value in zip(plane_axes or "Z", index, strict=False):
        key = letter.lower()
        if key in ("z", "t"):
            out[key] = int(value)
    return out


def _measurement_columns(df: pd.DataFrame) -> list[str]:
    """Numeric columns beyond the contract ones (``mean_c0``, ``area_px``...)."""
    skip = set(CSV_COLUMNS) | {"marker"}
    return [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]


def detections_to_geojson(
    df: pd.DataFrame,
    *,
    class_name: str = NUCLEUS_CLASS,
    color: Sequence[int] = NUCLEUS_COLOR,
    rois: Sequence[np.ndarray] | None = None,
    roi_names: Sequence[str] | None = None,
    plane_shape: Sequence[int] | None = None,
    plane_axes: str = "Z",
) -> dict[str, Any]:
    """Detections (and ROIs) as a GeoJSON FeatureCollection for QuPath's File > Import objects.

    Parameters
    ----------
    df : pandas.DataFrame
        Detections table (``plane, y, x, y0, x0, y1, x1, confidence, class``; an ``image``
        column is ignored). Extra numeric columns (``mean_c0``, ``area_px``, ``area_um2``...)
        become measurements; a ``marker`` column (``positive`` / ``negative``) makes the class
        ``Nucleus: Positive`` / ``Nucleus: Negative``.
    class_name : str
        QuPath classification of the nuclei.
    color : sequence of int
        RGB colour of that class (marker classes have their own: :data:`MARKER_COLORS`).
    rois : sequence of (M, 2+) arrays, optional
        ROI polygons in table coordinates (last two columns y, x), written as annotations.
    roi_names : sequence of str, optional
        Their names (default ``roi_0``...).
    plane_shape : sequence of int, optional
        Shape of the plane axes (``df.attrs["plane_shape"]``); the ``plane`` column is a flat
        C-order index over them. Default: one plane axis.
    plane_axes : str
        Letters of the plane axes (``"Z"``, ``"T"``, ``"TZ"``...); Z and T go to QuPath's
        ``z`` / ``t``. Default: planes are z-slices.

    Returns
    -------
    dict
        ``{"type": "FeatureCollection", "features": [...]}``: one ``Polygon`` feature per
        nucleus (its box, closed ring, ``objectType: "detection"``), then one per ROI
        (``objectType: "annotation"``). ``geometry.plane`` is set only for images with more
        than one plane.
    """
    if plane_shape is None:
        plane_shape = tuple(df.attrs.get("plane_shape", ()) or ())
    n_planes = int(np.prod(plane_shape)) if plane_shape else None
    stack = (n_planes or 0) > 1 or bool(len(df) and int(df["plane"].max()) > 0)
    extra = _measurement_columns(df)
    marker = df["marker"].astype(str).str.lower().tolist() if "marker" in df.columns else None
    rgb = [int(c) for c in color]
    features = []
    boxes = df[["y0", "x0", "y1", "x1"]].to_numpy(float)
    planes = df["plane"].to_numpy(int) if "plane" in df.columns else np.zeros(len(df), int)
    conf = df["confidence"].to_numpy(float) if "confidence" in df.columns else None
    values = df[extra].to_numpy(float) if extra else None
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        geometry: dict[str, Any] = {
            "type": "Polygon",
            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
        }
        if stack:
            geometry["plane"] = _plane_dict(planes[i], plane_shape, plane_axes)
        measurements = {}
        if conf is not None and math.isfinite(conf[i]):
            measurements["confidence"] = float(conf[i])
        if values is not None:
            # NaN is not JSON: a missing measurement is left out
            measurements.update(
                {k: float(v) for k, v in zip(extra, values[i], strict=True) if math.isfinite(v)}
            )
        name, colour = class_name, rgb
        if marker is not None and marker[i] in _MARKER_CLASSES:
            name = f"{class_name}: {_MARKER_CLASSES[marker[i]]}"
            colour = list(MARKER_COLORS[marker[i]])
        features.append(
            {
                "type": "Feature",
                "geometry": geometry,
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": name, "color": colour},
                    "measurements": measurements,
                },
            }
        )
    rois = list(rois or [])
    names = list(roi_names) if roi_names is not None else [roi_name(i) for i in range(len(rois))]
    if len(names) != len(rois):
        raise ValueError(f"{len(rois)} ROIs but {len(names)} names")
    for name, poly in zip(names, rois, strict=True):
        ring = _ring(poly)
        if len(ring) < 4:
            raise ValueError(f"ROI {name!r} needs at least 3 vertices")
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": str(name),
                    "color": list(ROI_COLOR),
                    "isLocked": False,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, fc: dict[str, Any]) -> Path:
    """Write a FeatureCollection atomically (temporary file + rename); returns the path.

    Compact JSON (no indentation): a slide holds a million nuclei.
    """
    return write_text_atomic(path, json.dumps(fc, separators=(",", ":"), allow_nan=False))


def geojson_paths(target: str | os.PathLike, images: Sequence[str]) -> list[Path]:
    """Where ``yolocell detect --geojson TARGET`` writes each image's FeatureCollection.

    One image: ``TARGET`` itself. Several: one file per image beside ``TARGET``, named
    ``<TARGET stem>.<image stem>.geojson`` (QuPath imports objects one image at a time); an image
    stem that repeats gets ``_1``, ``_2``... in input order.
    """
    target = Path(target)
    if len(images) == 1:
        return [target]
    out, seen = [], {}
    for image in images:
        stem = Path(str(image).rstrip("/\\")).name
        for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        else:
            stem = Path(stem).stem
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        name = stem if n == 0 else f"{stem}_{n}"
        out.append(target.with_name(f"{target.stem}.{name}.geojson"))
    return out


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class GeoJsonAnnotations:
    """Objects read from a (QuPath) GeoJSON file, in table coordinates (y, x; pixel edges).

    Attributes
    ----------
    points : (N, 2) float array
        Point coordinates ``y, x`` (from Point and MultiPoint geometries).
    point_classes, point_names : list of str or None
        Classification and name of each point's feature.
    point_z : (N,) int array
        z-slice of each point (``geometry.plane.z``, 0 when absent).
    polygons : list of (M, 2) float arrays
        Exterior rings ``y, x`` without the closing vertex (Polygon and MultiPolygon; holes
        are dropped). Rectangles drawn in QuPath are polygons of 4 vertices.
    polygon_classes, polygon_names : list of str or None
        Classification and name of each polygon's feature.
    polygon_types : list of str
        QuPath ``objectType`` (``annotation``, ``detection``, ``cell``...; ``annotation`` when
        absent).
    polygon_z : (N,) int array
        z-slice of each polygon.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_classes: list[str | None] = field(default_factory=list)
    point_names: list[str | None] = field(default_factory=list)
    point_z: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    polygons: list[np.ndarray] = field(default_factory=list)
    polygon_classes: list[str | None] = field(default_factory=list)
    polygon_names: list[str | None] = field(default_factory=list)
    polygon_types: list[str] = field(default_factory=list)
    polygon_z: np.ndarray = field(default_factory=lambda: np.zeros(0, int))

    def boxes(self) -> np.ndarray:
        """(K, 4) bounding boxes ``y0, x0, y1, x1`` of the polygons (what training needs)."""
        if not self.polygons:
            return np.zeros((0, 4))
        return np.array([[*p.min(axis=0), *p.max(axis=0)] for p in self.polygons], dtype=float)


def _class_name(props: dict[str, Any]) -> str | None:
    cls = props.get("classification")
    if isinstance(cls, dict):
        if cls.get("name"):
            return str(cls["name"])
        if cls.get("names"):  # QuPath >= 0.5 writes derived classes as a list
            return ": ".join(str(n) for n in cls["names"])
    if isinstance(cls, str):
        return cls
    return None


def _features(data: Any) -> list[dict[str, Any]] | None:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        kind = data.get("type")
        if kind == "FeatureCollection" and isinstance(data.get("features"), list):
            return data["features"]
        if kind == "Feature":
            return [data]
        if kind in _GEOMETRIES:  # a bare geometry
            return [{"type": "Feature", "geometry": data, "properties": {}}]
    return None


_GEOMETRIES = {
    "Point",
    "MultiPoint",
    "Polygon",
    "MultiPolygon",
    "LineString",
    "MultiLineString",
    "GeometryCollection",
}


def read_geojson_annotations(path: str | os.PathLike) -> GeoJsonAnnotations:
    """Read points and polygons from a QuPath GeoJSON export (or any GeoJSON).

    Parameters
    ----------
    path : path
        A FeatureCollection, a bare list of features (QuPath's "Export objects" without the
        collection), a single Feature or geometry. Point / MultiPoint / Polygon / MultiPolygon
        geometries are read (GeometryCollections are opened); lines are skipped.

    Returns
    -------
    GeoJsonAnnotations

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not JSON, not GeoJSON, or no supported geometry at all (one line naming the file).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read GeoJSON: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from exc
    features = _features(data)
    if features is None:
        raise ValueError(
            f"{path}: not GeoJSON (need a FeatureCollection, a Feature or a list of features)"
        )
    out = GeoJsonAnnotations()
    points, p_cls, p_name, p_z = [], [], [], []
    polys, g_cls, g_name, g_type, g_z = [], [], [], [], []
    skipped: set[str] = set()

    def add(geom: dict[str, Any], props: dict[str, Any], z: int) -> None:
        kind = geom.get("type")
        coords = geom.get("coordinates")
        cls, name = _class_name(props), props.get("name")
        name = None if name is None else str(name)
        try:
            if kind == "Point":
                pts = [coords]
            elif kind == "MultiPoint":
                pts = list(coords)
            elif kind == "Polygon":
                rings = [coords[0]] if coords else []
            elif kind == "MultiPolygon":
                rings = [poly[0] for poly in coords if poly]
            elif kind == "GeometryCollection":
                for sub in geom.get("geometries") or []:
                    if isinstance(sub, dict):
                        add(sub, props, z)
                return
            else:
                skipped.add(str(kind))
                return
            if kind in ("Point", "MultiPoint"):
                for pt in pts:
                    points.append((float(pt[1]), float(pt[0])))
                    p_cls.append(cls)
                    p_name.append(name)
                    p_z.append(z)
                return
            for ring in rings:
                yx = np.array([[float(p[1]), float(p[0])] for p in ring], dtype=float)
                if len(yx) > 1 and np.array_equal(yx[0], yx[-1]):
                    yx = yx[:-1]
                if len(yx) < 3:
                    continue
                polys.append(yx)
                g_cls.append(cls)
                g_name.append(name)
                g_type.append(str(props.get("objectType") or "annotation"))
                g_z.append(z)
        except (TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"{path}: bad {kind} coordinates: {exc}") from exc

    for feat in features:
        if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
            continue
        props = feat.get("properties") or {}
        plane = feat["geometry"].get("plane") or {}
        add(feat["geometry"], props, int(plane.get("z", 0) or 0))
    if features and not points and not polys:
        kinds = ", ".join(sorted(skipped)) or "no geometry"
        raise ValueError(
            f"{path}: no Point/MultiPoint/Polygon/MultiPolygon geometry (found: {kinds})"
        )
    out.points = np.array(points, dtype=float).reshape(-1, 2)
    out.point_classes, out.point_names = p_cls, p_name
    out.point_z = np.array(p_z, dtype=int)
    out.polygons = polys
    out.polygon_classes, out.polygon_names, out.polygon_types = g_cls, g_name, g_type
    out.polygon_z = np.array(g_z, dtype=int)
    return out
