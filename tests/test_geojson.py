"""QuPath GeoJSON: export detections + ROIs, read annotations back, the CLI's --geojson."""

import json

import geojson
import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_yolocell.cli import main
from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.io.geojson import (
    detections_to_geojson,
    geojson_paths,
    read_geojson_annotations,
    write_geojson,
)
from napari_yolocell.io.tables import DETECTION_COLUMNS


def _detections() -> pd.DataFrame:
    boxes = np.array([[10, 20, 30, 44], [50.5, 60.25, 70, 81], [5, 5, 15, 16]], float)
    df = pd.DataFrame(
        {
            "plane": [0, 0, 1],
            "y": boxes[:, [0, 2]].mean(1),
            "x": boxes[:, [1, 3]].mean(1),
            "y0": boxes[:, 0],
            "x0": boxes[:, 1],
            "y1": boxes[:, 2],
            "x1": boxes[:, 3],
            "confidence": [0.9, 0.5, 0.7],
            "class": [0, 0, 0],
        }
    )
    df["mean_c0"] = [100.0, np.nan, 300.0]
    df["area_px"] = [370, 300, 80]
    return df


def _valid(fc: dict) -> geojson.FeatureCollection:
    obj = geojson.loads(json.dumps(fc))
    assert isinstance(obj, geojson.FeatureCollection) and obj.is_valid, obj.errors()
    return obj


def test_export_is_valid_qupath_geojson():
    df = _detections()
    roi = np.array([[0, 0], [0, 100], [90, 100], [90, 0]], float)
    fc = detections_to_geojson(df, rois=[roi], roi_names=["tumour"], plane_shape=(2,))
    _valid(fc)
    feats = fc["features"]
    assert len(feats) == 4
    nucleus = feats[0]
    ring = nucleus["geometry"]["coordinates"][0]
    # x right, y down, closed ring, full-resolution pixel edges (no offset)
    assert ring == [[20, 10], [44, 10], [44, 30], [20, 30], [20, 10]]
    props = nucleus["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"]["name"] == "Nucleus"
    assert len(props["classification"]["color"]) == 3
    assert props["measurements"] == {"confidence": 0.9, "mean_c0": 100.0, "area_px": 370.0}
    assert "mean_c0" not in feats[1]["properties"]["measurements"]  # NaN left out
    assert [f["geometry"]["plane"]["z"] for f in feats[:3]] == [0, 0, 1]
    assert feats[3]["properties"] == {
        "objectType": "annotation",
        "name": "tumour",
        "color": feats[3]["properties"]["color"],
        "isLocked": False,
    }
    # a single plane: no plane key (QuPath's default plane)
    one = detections_to_geojson(df[df["plane"] == 0])
    assert "plane" not in one["features"][0]["geometry"]
    # time series: planes unravel into t and z
    tz = detections_to_geojson(df, plane_shape=(2, 1), plane_axes="TZ")
    assert tz["features"][2]["geometry"]["plane"] == {"c": -1, "z": 0, "t": 1}


def test_marker_column_becomes_derived_class():
    df = _detections()
    df["marker"] = ["positive", "negative", "positive"]
    fc = detections_to_geojson(df)
    names = [f["properties"]["classification"]["name"] for f in fc["features"]]
    assert names == ["Nucleus: Positive", "Nucleus: Negative", "Nucleus: Positive"]
    colours = [f["properties"]["classification"]["color"] for f in fc["features"]]
    assert colours[0] == colours[2] != colours[1]  # QuPath shows positive and negative apart


def test_round_trip(tmp_path):
    df = _detections()
    roi = np.array([[0, 0], [0, 100], [90, 100]], float)
    path = write_geojson(tmp_path / "a.geojson", detections_to_geojson(df, rois=[roi]))
    _valid(json.loads(path.read_text()))
    ann = read_geojson_annotations(path)
    assert len(ann.points) == 0
    assert ann.polygon_types == ["detection"] * 3 + ["annotation"]
    assert ann.polygon_classes[:3] == ["Nucleus"] * 3 and ann.polygon_names[3] == "roi_0"
    np.testing.assert_allclose(ann.boxes()[:3], df[["y0", "x0", "y1", "x1"]].to_numpy())
    np.testing.assert_allclose(ann.polygons[3], roi)
    assert ann.polygon_z.tolist() == [0, 0, 1, 0]


def test_reads_qupath_exports(tmp_path):
    features = [  # QuPath "Export objects": a bare list of features
        {
            "type": "Feature",
            "geometry": {"type": "MultiPoint", "coordinates": [[10.5, 20.5], [30, 40]]},
            "properties": {"objectType": "annotation", "classification": {"name": "Nucleus"}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [1, 2], "plane": {"c": -1, "z": 3}},
            "properties": {"objectType": "annotation"},
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [[[0, 0], [4, 0], [4, 3], [0, 3], [0, 0]]],
                    [[[10, 10], [12, 10], [12, 14], [10, 10]]],
                ],
            },
            "properties": {
                "name": "two",
                "classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]},
            },
        },
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}},
    ]
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(features))
    ann = read_geojson_annotations(path)
    np.testing.assert_allclose(ann.points, [[20.5, 10.5], [40, 30], [2, 1]])
    assert ann.point_classes == ["Nucleus", "Nucleus", None] and ann.point_z.tolist() == [0, 0, 3]
    assert len(ann.polygons) == 2 and ann.polygon_names == ["two", "two"]
    assert ann.polygon_classes == ["Tumor: Positive"] * 2
    np.testing.assert_allclose(ann.boxes(), [[0, 0, 3, 4], [10, 10, 14, 12]])


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not JSON"),
        ('{"type": "Topology"}', "not GeoJSON"),
        ("[1, 2]", "no Point"),
        (
            '{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
            '{"type": "LineString", "coordinates": [[0, 0], [1, 1]]}}]}',
            "LineString",
        ),
    ],
)
def test_bad_files_raise_one_line(tmp_path, text, match):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        read_geojson_annotations(path)
    assert "bad.geojson" in str(info.value) and "\n" not in str(info.value)


def test_paths_for_several_images(tmp_path):
    target = tmp_path / "nuclei.geojson"
    assert geojson_paths(target, ["a/x.tif"]) == [target]
    got = geojson_paths(target, ["a/x.tif", "b/x.tif", "c/y.ome.zarr", "d/z.ome.tif"])
    assert [p.name for p in got] == [
        "nuclei.x.geojson",
        "nuclei.x_1.geojson",
        "nuclei.y.geojson",
        "nuclei.z.geojson",
    ]


def test_cli_geojson(tmp_path, capsys):
    paths = []
    for i, n in enumerate((9, 5)):
        p = tmp_path / f"img{i}.tif"
        tifffile.imwrite(p, make_nuclei_image((256, 300), n_nuclei=n, seed=i).image)
        paths.append(p)
    one = tmp_path / "one.geojson"
    args = ["--model", "classical", "--tile", "256", "--quiet"]
    assert main(["detect", str(paths[0]), *args, "--geojson", str(one)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{paths[0]}\t9", "total\t9"]
    fc = json.loads(one.read_text())
    _valid(fc)
    assert len(fc["features"]) == 9
    out = tmp_path / "d.csv"
    many = tmp_path / "many.geojson"
    assert main(["detect", *map(str, paths), *args, "--geojson", str(many), "--out", str(out)]) == 0
    assert not many.exists()
    det = pd.read_csv(out)
    assert list(det.columns) == ["image", *DETECTION_COLUMNS]
    for i, n in enumerate((9, 5)):
        ann = read_geojson_annotations(tmp_path / f"many.img{i}.geojson")
        assert len(ann.polygons) == n
        mine = det[det["image"] == str(paths[i])]
        np.testing.assert_allclose(ann.boxes(), mine[["y0", "x0", "y1", "x1"]].to_numpy())
