"""Detection table -> LayerDataTuple conversion, coordinates and CSV tables (no Qt, no napari)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from napari_yolocell.analysis.roi import counts_table, in_roi
from napari_yolocell.io.tables import (
    COUNT_COLUMNS,
    CSV_COLUMNS,
    detections_csv_table,
    write_csv_atomic,
)
from napari_yolocell.shell.layers import (
    LARGE_RESULT,
    MAX_BOXES_IN_VIEW,
    boxes_in_view,
    detections_to_layers,
    ellipse_polygon,
    points_to_table,
    roi_polygons,
    shapes_to_polygons,
    to_layer_coords,
    to_table_coords,
    transform_coords,
    view_to_table,
)


def table(rows, plane_shape=None, n_planes=None) -> pd.DataFrame:
    """rows: (plane, y0, x0, y1, x1, confidence)."""
    arr = np.asarray(rows, dtype=float).reshape(-1, 6)
    df = pd.DataFrame(
        {
            "plane": arr[:, 0].astype(np.int64),
            "y": (arr[:, 1] + arr[:, 3]) / 2,
            "x": (arr[:, 2] + arr[:, 4]) / 2,
            "y0": arr[:, 1],
            "x0": arr[:, 2],
            "y1": arr[:, 3],
            "x1": arr[:, 4],
            "confidence": arr[:, 5],
            "class": np.zeros(len(arr), np.int64),
        }
    )
    if plane_shape is not None:
        df.attrs["plane_shape"] = plane_shape
    if n_planes is not None:
        df.attrs["n_planes"] = n_planes
    return df


DF2 = table(
    [(0, 10, 20, 20, 40, 0.9), (0, 50, 50, 60, 60, 0.3), (0, 0, 0, 4, 4, 0.6)],
    plane_shape=(),
    n_planes=1,
)


def test_layers_2d_names_features_metadata_and_filter():
    (rects, skw, stype), (pts, pkw, ptype) = detections_to_layers(
        DF2, "cells", scale=(0.5, 0.25), translate=(1.0, 2.0), conf=0.5
    )
    assert (stype, ptype) == ("shapes", "points")
    assert skw["name"] == "cells boxes (2)" and pkw["name"] == "cells nuclei (2)"
    assert skw["shape_type"] == "rectangle"
    assert skw["scale"] == [0.5, 0.25] and pkw["translate"] == [1.0, 2.0]
    for kw in (skw, pkw):
        assert list(kw["features"].columns) == ["confidence", "class", "id"]
        assert kw["features"]["confidence"].tolist() == [0.9, 0.6]
        assert kw["metadata"]["yolocell_source"] == "cells"
        assert kw["metadata"]["detections"] is DF2  # full table, for re-filtering
        assert kw["ndim"] == 2
    assert skw["edge_color"] == "confidence" and pkw["face_color"] == "confidence"
    assert skw["metadata"]["yolocell_kind"] == "boxes"
    assert pkw["metadata"]["yolocell_kind"] == "nuclei"
    # napari: pixel centres on integers -> table coordinates minus 0.5
    np.testing.assert_allclose(pts, [[14.5, 29.5], [1.5, 1.5]])
    np.testing.assert_allclose(rects[0], [[9.5, 19.5], [9.5, 39.5], [19.5, 39.5], [19.5, 19.5]])


def test_layers_nd_leading_coordinates():
    df = table(
        [(0, 0, 0, 2, 2, 0.5), (4, 10, 10, 12, 12, 0.5), (5, 20, 20, 22, 22, 0.7)],
        plane_shape=(2, 3),
    )
    (rects, skw, _), (pts, pkw, _) = detections_to_layers(df, "zt")
    assert skw["ndim"] == pkw["ndim"] == 4
    # plane 4 of (2, 3) is (1, 1); plane 5 is (1, 2)
    np.testing.assert_allclose(pts[:, :2], [[0, 0], [1, 1], [1, 2]])
    np.testing.assert_allclose(rects[2][:, :2], [[1, 2]] * 4)
    planes, yx = to_table_coords(pts, (2, 3))
    assert planes.tolist() == [0, 4, 5]
    np.testing.assert_allclose(yx, df[["y", "x"]].to_numpy())
    bad = table([(6, 0, 0, 2, 2, 0.5)], plane_shape=(2, 3))
    with pytest.raises(ValueError, match="out of range"):
        to_layer_coords(bad)


def test_plane_shape_fallback_is_a_stack():
    df = table([(0, 0, 0, 2, 2, 0.5), (2, 0, 0, 2, 2, 0.5)])
    (_, skw, _), (pts, _, _) = detections_to_layers(df, "s")
    assert skw["ndim"] == 3 and pts[:, 0].tolist() == [0, 2]


def test_empty_table_gives_empty_layers():
    empty = DF2.iloc[:0]
    empty.attrs = {"plane_shape": (3,)}
    (rects, skw, _), (pts, pkw, _) = detections_to_layers(empty, "void")
    assert rects == [] and pts.shape == (0, 3)
    assert skw["ndim"] == pkw["ndim"] == 3
    assert skw["name"] == "void boxes (0)"
    assert skw["edge_color"] != "confidence"  # no values to map through a colormap
    # everything filtered out behaves the same
    (rects, _, _), (pts, _, _) = detections_to_layers(DF2, "c", conf=0.99)
    assert rects == [] and pts.shape == (0, 2)


def test_transform_coords_through_world():
    pts = np.array([[10.0, 20.0]])
    out = transform_coords(
        pts, from_scale=(1, 1), from_translate=(0, 0), to_scale=(0.5, 0.5), to_translate=(1, 2)
    )
    np.testing.assert_allclose(out, [[18.0, 36.0]])
    # a 2-D ROI over a 3-D image: axes aligned on the right
    out = transform_coords(pts, (2, 2), None, (5.0, 1.0, 1.0), None)
    np.testing.assert_allclose(out, [[20.0, 40.0]])
    assert transform_coords(np.zeros((0, 2))).shape == (0, 2)


def test_counts_table_planes_and_rois():
    df = table(
        [(0, 0, 0, 10, 10, 0.9), (0, 100, 100, 110, 110, 0.9), (2, 0, 0, 10, 10, 0.9)],
        plane_shape=(3,),
        n_planes=3,
    )
    square = np.array([[0, 0], [0, 50], [50, 50], [50, 0]], float)
    out = counts_table(df, "img", [square], ["corner"])
    assert list(out.columns) == COUNT_COLUMNS
    whole = out[out["roi"] == "all"]
    assert whole["count"].tolist() == [2, 0, 1]  # plane 1 has none but is listed
    corner = out[out["roi"] == "corner"]
    assert corner["plane"].tolist() == [0, 1, 2] and corner["count"].tolist() == [1, 0, 1]
    assert (out["image"] == "img").all()


def test_csv_table_and_atomic_write(tmp_path):
    out = detections_csv_table(DF2, "cells")
    assert list(out.columns) == CSV_COLUMNS and (out["image"] == "cells").all()
    path = tmp_path / "sub" / "det.csv"
    write_csv_atomic(out, path)
    write_csv_atomic(out.iloc[:1], path)  # replaces the old file
    back = pd.read_csv(path)
    assert list(back.columns) == CSV_COLUMNS and len(back) == 1
    assert [p.name for p in path.parent.iterdir()] == ["det.csv"]


def test_ellipse_and_shapes_polygons():
    corners = np.array([[0, 0], [0, 20], [10, 20], [10, 0]], float)  # ellipse box
    poly = ellipse_polygon(corners)
    assert in_roi(np.array([[5.0, 10.0]]), poly).all()
    assert not in_roi(np.array([[0.5, 0.5]]), poly).any()  # box corner, outside the ellipse
    polys = shapes_to_polygons([corners, corners, corners[:2]], ["ellipse", "rectangle", "line"])
    assert len(polys) == 2 and len(polys[0]) > 4
    np.testing.assert_array_equal(polys[1], corners)


def test_layers_module_does_not_import_napari():
    code = "import sys, napari_yolocell.shell.layers; sys.exit('napari' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def grid_table(n: int, columns: int = 200, pitch: float = 20.0, side: float = 10.0):
    """``n`` boxes of ``side`` px on a regular grid (row-major), confidences 0..1."""
    i = np.arange(n)
    y0, x0 = (i // columns) * pitch, (i % columns) * pitch
    rows = np.stack([np.zeros(n), y0, x0, y0 + side, x0 + side, (i % 100) / 100], axis=1)
    return table(rows, plane_shape=(), n_planes=1)


def test_large_result_draws_points_for_all_and_boxes_in_view():
    big = grid_table(50_000)  # 250 rows x 200 columns, 5000 x 4000 px
    view = (95.0, 195.0, 405.0, 605.0)  # table coordinates (y0, x0, y1, x1)
    (rects, skw, _), (pts, pkw, _) = detections_to_layers(big, "big", view=view)
    assert pts.shape == (50_000, 2) and len(pkw["features"]) == 50_000
    # boxes overlapping the view: y0 in (85, 405) -> rows 5..20, x0 in (185, 605) -> cols 10..30
    assert len(rects) == 16 * 21 == len(skw["features"])
    corners = np.asarray(rects)
    assert corners[..., 0].max() > view[0] and corners[..., 0].min() < view[2]
    assert skw["metadata"]["boxes"] == "view" and len(skw["metadata"]["detections"]) == 50_000
    assert skw["name"] == "big boxes (336 of 50000 in view)"
    assert pkw["name"] == "big nuclei (50000)"  # the count always covers every detection
    # the confidence filter applies first (half the rows, still large): columns 40..60 are in
    # view, of which 50..60 have a confidence >= 0.5
    view = (95.0, 795.0, 405.0, 1205.0)
    (rects, _, _), (pts, _, _) = detections_to_layers(big, "big", conf=0.5, view=view)
    assert len(pts) == 25_000 and len(rects) == 16 * 11
    # no view known (3-D display...) or zoomed out past MAX_BOXES_IN_VIEW: no boxes
    for v in (None, (0.0, 0.0, 5000.0, 4000.0)):
        (rects, skw, _), (pts, _, _) = detections_to_layers(big, "big", view=v)
        assert rects == [] and len(pts) == 50_000 and skw["edge_color"] == "yellow"


def test_boxes_in_view_small_results_draw_everything():
    small = grid_table(LARGE_RESULT)
    drawn, mode = boxes_in_view(small, (0.0, 0.0, 1.0, 1.0))
    assert mode == "all" and len(drawn) == LARGE_RESULT
    drawn, mode = boxes_in_view(grid_table(LARGE_RESULT + 1), (0.0, 0.0, 1e9, 1e9))
    assert mode == "view" and len(drawn) == 0  # more than MAX_BOXES_IN_VIEW in view
    assert MAX_BOXES_IN_VIEW < LARGE_RESULT


def test_roi_polygons_map_shapes_into_the_image_table():
    """An ROI drawn in world units (no scale) over an image at 2 um/px, shifted by 10 um."""
    rect = np.array([[10, 10], [10, 50], [30, 50], [30, 10]], float)  # world = layer coords
    line = np.array([[0, 0], [5, 5]], float)
    polys, names = roi_polygons(
        [rect, line, rect + 40],
        ["rectangle", "line", "ellipse"],
        image_transform=((2.0, 2.0), (10.0, 10.0)),
    )
    assert names == ["roi_0", "roi_2"]  # the line encloses nothing; names keep the index
    np.testing.assert_allclose(polys[0], (rect - 10) / 2 + 0.5)
    assert len(polys[1]) > 4  # the ellipse as a polygon
    yx = np.array([[5.0, 10.0], [5.0, 25.0]])  # table coordinates of the image
    assert in_roi(yx, polys[0]).tolist() == [True, False]
    _, named = roi_polygons([rect], ["polygon"], names=["tumour"])
    assert named == ["tumour"]


def test_view_to_table_uses_the_image_transform():
    # world view y 100..300, x 50..450 over an image at 0.5 um/px starting at (20, 10) um
    view = view_to_table((200.0, 250.0), (100.0, 200.0), (0.5, 0.5), (20.0, 10.0))
    assert view == (160.5, 80.5, 560.5, 880.5)
    assert view_to_table((5.0, 5.0), (5.0, 5.0)) == (0.5, 0.5, 10.5, 10.5)


def test_points_to_table_of_a_stack():
    """Clicks on a 2-D Points layer in world units over a (Z, Y, X) stack at 2 um per plane."""
    clicks = np.array([[4.0, 10.0, 20.0], [1.9, 0.0, 0.0], [9.0, 5.0, 5.0]])  # (z, y, x) um
    planes, yx = points_to_table(clicks, image_transform=((2.0, 1.0, 1.0), None), plane_shape=(3,))
    assert planes.tolist() == [2, 1, 2]  # nearest plane, clipped into the stack
    np.testing.assert_allclose(yx, clicks[:, 1:] + 0.5)
