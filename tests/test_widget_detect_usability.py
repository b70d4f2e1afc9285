"""Detect widget, issue #16: what a biologist driving it by hand ran into (headless viewer).

ROI table following the ROI layer, progress in the widget, model files that cannot run, boxes
following the view, help and remembered settings, GeoJSON export, multiscale (OME-Zarr) layers.
The classical detector on a clean synthetic image finds every nucleus: counts are exact.
"""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pandas as pd
import pytest

import napari_yolocell.shell.detect_widget as wd
from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import param_help
from napari_yolocell.shell import _qt, session
from napari_yolocell.shell.detect_widget import DetectWidget
from napari_yolocell.shell.layers import KIND_KEY, SOURCE_KEY
from napari_yolocell.shell.settings import settings_path
from napari_yolocell.shell.view_follow import DELAY_MS

TIMEOUT = 30_000
WEIGHTS = wd.Path(wd.__file__).parents[1] / "models" / "weights" / "nucleus_v5n.pt"


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei_image((384, 384), n_nuclei=20, seed=1)


@pytest.fixture
def errors(monkeypatch):
    shown: list[str] = []
    monkeypatch.setattr(_qt, "show_error", shown.append)
    return shown


def make_widget(viewer, image, name="cells"):
    viewer.add_image(image, name=name)
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model.value = "classical"
    widget.tile.value = 256
    return widget


def run(qtbot, widget):
    assert widget.run() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def results(viewer, source="cells"):
    return {
        layer.metadata[KIND_KEY]: layer
        for layer in viewer.layers
        if layer.metadata.get(SOURCE_KEY) == source
    }


def rect(y0, x0, y1, x1):
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)


def walk(container):
    for w in container:
        yield w
        if isinstance(w, wd.Container):
            yield from walk(w)


def table_rows(widget):
    if widget.roi_table.native.isHidden():
        return {}
    data = widget.roi_table.data.to_list()
    return {roi: count for _plane, roi, count in data}


# ------------------------------------------------------------------ 1. ROI table follows ROIs


def test_roi_table_follows_add_move_delete_rename(qtbot, make_napari_viewer, nuclei, tmp_path):
    viewer = make_napari_viewer()
    widget = make_widget(viewer, nuclei.image)
    rois = viewer.add_shapes(name="rois")  # empty, chosen before anything is drawn
    widget.roi.value = rois
    run(qtbot, widget)
    assert table_rows(widget) == {}
    x = nuclei.centers[:, 1]
    y = nuclei.centers[:, 0]

    rois.add_rectangles(rect(0, 0, 383.5, 239.5))  # drawing the first ROI shows the table
    left = int((x < 240).sum())
    assert table_rows(widget) == {"roi_0": left}
    assert list(rois.features["name"]) == ["roi_0"]  # named, and the name shown on the canvas
    assert rois.text.string.format == "{name}"

    rois.add_rectangles(rect(0, 0, 191.5, 383.5))  # a second one: the table and CSV agree
    top = int((y < 192).sum())
    assert table_rows(widget) == {"roi_0": left, "roi_1": top}
    csv = pd.read_csv(widget.export_counts(tmp_path / "counts.csv"))
    assert dict(zip(csv["roi"], csv["count"], strict=True)) == {"all": 20, **table_rows(widget)}

    moved = [d.copy() for d in rois.data]
    moved[0][:, 1] += 1000  # move roi_0 off the image (a drag ends with a "changed" event)
    rois.data = moved
    assert table_rows(widget) == {"roi_0": 0, "roi_1": top}

    rois.selected_data = {1}
    widget.roi_name.value = "upper half"
    widget._on_rename()
    assert table_rows(widget) == {"roi_0": 0, "upper half": top}

    rois.selected_data = {0}
    rois.remove_selected()  # names of the remaining ROIs never change
    assert table_rows(widget) == {"upper half": top}
    rois.add_rectangles(rect(0, 0, 383.5, 239.5))
    # roi_0 and roi_1 were shown (and maybe exported) for other regions: never reused (#22)
    assert table_rows(widget) == {"upper half": top, "roi_2": left}


# ------------------------------------------------------------------ 2. progress in the widget


def test_progress_is_shown_in_the_widget(qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    widget = make_widget(viewer, make_nuclei_image((768, 768), n_nuclei=30, seed=4).image)
    widget.tile.value = 128
    seen = []
    update = widget.progress.update

    def spy(item):
        update(item)
        seen.append((item.done, item.total, widget.progress.text.value))
        assert not widget.progress.bar.native.isHidden()
        assert widget.progress.bar.value == item.done and widget.progress.bar.max == item.total

    widget.progress.update = spy
    run(qtbot, widget)
    total = seen[-1][1]
    assert total > 4 and seen[-1][0] == total
    assert any("left" in text for _d, _t, text in seen[:-1])  # an ETA while running
    assert seen[0][2].startswith("tiles ")
    assert widget.progress.bar.native.isHidden()  # done: the bar goes, a summary stays
    assert widget.progress.text.value.startswith(f"{total:,} of {total:,} tiles in ")


# ------------------------------------------------------------------ 3. model files


def test_missing_or_corrupt_model_file_is_refused_in_one_line(
    make_napari_viewer, nuclei, tmp_path, errors
):
    viewer = make_napari_viewer()
    widget = make_widget(viewer, nuclei.image)
    widget.model_file.value = tmp_path / "typo.pt"
    assert len(errors) == 1 and "model file not found" in errors[0] and "typo.pt" in errors[0]
    assert widget.model.value == "classical"
    # the refused path stays in the field, to be corrected (#22); the model did not change
    assert widget.model_file.line_edit.value == str(tmp_path / "typo.pt")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 half a download")
    widget.model_file.value = corrupt
    assert len(errors) == 2 and "cannot read model weights" in errors[1]
    assert "\n" not in errors[1] and "yolo" not in errors[1].lower().replace("yolocell", "")
    assert widget.model.value == "classical"
    assert widget.model_file.line_edit.value == str(corrupt)

    try:  # a readable checkpoint is selected, and the field keeps showing it
        widget.model_file.value = WEIGHTS
        assert len(errors) == 2
        assert widget.model.value == str(WEIGHTS.resolve())
        assert str(widget.model_file.value) == str(WEIGHTS.resolve())
        widget.model.value = "classical"
        assert widget.model_file.line_edit.value == ""
    finally:
        session.forget_session_model(WEIGHTS)


# ------------------------------------------------------------------ 6. boxes follow the view


def test_large_result_boxes_follow_the_view(qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    widget = DetectWidget(viewer)
    i = np.arange(50_000)
    y0, x0 = (i // 200) * 20.0, (i % 200) * 20.0
    df = pd.DataFrame(
        {
            "plane": 0,
            **{"y": y0 + 5, "x": x0 + 5, "y0": y0, "x0": x0, "y1": y0 + 10, "x1": x0 + 10},
            "confidence": 0.9,
            "class": 0,
        }
    )
    widget._results["big"] = wd._Result("big", df, "classical", 0.0, [1, 1], [0, 0], ())
    widget._active = "big"
    viewer.camera.zoom = 0.01  # all in view: too many boxes
    widget._replace_layers("big", widget.results_to_layers())
    widget._refresh_counts()
    boxes = results(viewer, "big")["boxes"]
    assert boxes.nshapes == 0

    viewer.camera.center = (1000.0, 1000.0)
    viewer.camera.zoom = 4.0  # zoomed in: boxes appear without pressing the button
    qtbot.waitUntil(lambda: boxes.nshapes > 0, timeout=DELAY_MS * 10)
    assert boxes.data[0][:, 0].min() > 500
    viewer.camera.center = (3000.0, 2000.0)
    qtbot.waitUntil(lambda: boxes.data[0][:, 0].min() > 2500, timeout=DELAY_MS * 10)
    assert len(results(viewer, "big")["nuclei"].data) == 50_000


# ------------------------------------------------------------------ 5. help, layout, settings


def test_help_groups_legend_names_and_remembered_settings(
    qtbot, make_napari_viewer, nuclei, tmp_path, monkeypatch
):
    monkeypatch.setenv("YOLOCELL_CONFIG_DIR", str(tmp_path / "config"))
    viewer = make_napari_viewer()
    widget = make_widget(viewer, nuclei.image, name="BBBC039 nuclei")
    for name in ("iou", "tile", "overlap", "normalize", "level"):
        tooltip = getattr(widget, name).tooltip
        assert param_help(name)[1:] in tooltip and len(tooltip) > len(param_help(name)) + 40
    for name in ("backend", "diameter", "conf", "roi", "known_count", "clicked"):
        assert len(getattr(widget, name).tooltip) > 40
    assert "confidence" in widget.legend.value and "qlineargradient" in (
        widget.legend.native.styleSheet()
    )
    # basic controls in sight, advanced ones behind a tick box
    assert widget.advanced.native.isHidden() and not widget.conf.native.isHidden()
    widget.advanced_toggle.value = True
    assert not widget.advanced.native.isHidden()
    assert "Calibrate confidence" in [getattr(w, "value", None) for w in walk(widget.single)]

    run(qtbot, widget)
    assert results(viewer, "BBBC039 nuclei")["nuclei"].name == "BBBC039 nuclei (20)"

    widget.iou.value = 0.3
    widget.normalize.value = "percentile"
    saved = json.loads(settings_path("detect").read_text())
    assert saved["tile"] == 256 and saved["iou"] == 0.3 and saved["model"] == "classical"
    again = DetectWidget(viewer)  # the next session
    assert (again.tile.value, again.iou.value, again.normalize.value) == (256, 0.3, "percentile")
    assert again.model.value == "classical" and again.advanced_toggle.value


# ------------------------------------------------------------------ GeoJSON export


def test_export_geojson_validates(qtbot, make_napari_viewer, nuclei, tmp_path):
    geojson = pytest.importorskip("geojson")
    viewer = make_napari_viewer()
    widget = make_widget(viewer, nuclei.image)
    rois = viewer.add_shapes([rect(0, 0, 383.5, 239.5)], shape_type="rectangle", name="rois")
    widget.roi.value = rois
    rois.selected_data = {0}
    widget.roi_name.value = "left"
    widget._on_rename()
    run(qtbot, widget)
    path = widget.export_geojson(tmp_path / "cells.geojson")
    fc = geojson.loads(path.read_text())
    assert fc.is_valid and fc["type"] == "FeatureCollection"
    kinds = [f["properties"]["objectType"] for f in fc["features"]]
    assert kinds.count("detection") == 20 and kinds.count("annotation") == 1
    (roi,) = [f for f in fc["features"] if f["properties"]["objectType"] == "annotation"]
    assert roi["properties"]["name"] == "left"
    # pixel edges, like the CSV: napari's 0 is the centre of pixel 0, 0.5 in QuPath
    assert min(x for x, _y in roi["geometry"]["coordinates"][0]) == pytest.approx(0.5)


# ------------------------------------------------------------------ OME-Zarr / multiscale


def test_multiscale_dask_layer_like_napari_ome_zarr(qtbot, make_napari_viewer, nuclei):
    viewer = make_napari_viewer()
    full = da.from_array(nuclei.image, chunks=(128, 128))
    viewer.add_image([full, full[::2, ::2], full[::4, ::4]], multiscale=True, name="zarr")
    widget = DetectWidget(viewer)
    widget.model.value = "classical"
    widget.tile.value = 256
    assert widget.level.choices == (0, 1, 2)
    run(qtbot, widget)
    points = results(viewer, "zarr")["nuclei"]
    assert len(points.data) == 20
    dist = np.linalg.norm(points.data[:, None, :] - (nuclei.centers - 0.5)[None], axis=2)
    assert dist.min(axis=1).max() < 1.5


# ------------------------------------------------------------------ marker measurements


def test_marker_histogram_threshold_and_counts(qtbot, make_napari_viewer, nuclei, tmp_path):
    viewer = make_napari_viewer()
    widget = make_widget(viewer, nuclei.image)
    yy, xx = np.mgrid[:384, :384]
    marker = np.full((384, 384), 5.0, np.float32)
    positive = np.arange(20) % 2 == 0
    for (cy, cx), pos in zip(nuclei.centers, positive, strict=True):
        marker[(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = 1000.0 if pos else 12.0
    viewer.add_image(marker, name="Ki67")
    rois = viewer.add_shapes([rect(0, 0, 383.5, 239.5)], shape_type="rectangle", name="rois")
    widget.roi.value = rois
    run(qtbot, widget)
    panel = widget.marker_panel
    panel.marker.value = viewer.layers["Ki67"]
    assert panel.measure() is not None
    qtbot.waitUntil(lambda: not panel.running, timeout=TIMEOUT)

    assert 12 < panel.threshold.value < 1000  # Otsu between the dim and the bright nuclei
    assert "10 positive, 10 negative" in panel.summary.value
    assert not panel.canvas.isHidden() and panel.figure.axes[0].get_xlabel().startswith("mean")
    left = nuclei.centers[:, 1] < 240
    rows = {(r, c): n for _p, r, c, n in panel.table.data.to_list()}
    assert rows[("roi_0", "positive")] == int((left & positive).sum())
    assert rows[("roi_0", "negative")] == int((left & ~positive).sum())
    points = results(viewer)["nuclei"]
    assert {"mean_c0", "marker"} <= set(points.features.columns)
    assert (points.features["marker"] == "positive").sum() == 10

    panel.threshold.value = 1.0  # typed: every nucleus is positive
    assert "20 positive, 0 negative" in panel.summary.value
    csv = pd.read_csv(panel.export_counts(tmp_path / "marker.csv"))
    assert list(csv.columns) == ["image", "plane", "roi", "class", "count"]
    assert csv.loc[(csv["roi"] == "all") & (csv["class"] == "positive"), "count"].item() == 20
    fc = json.loads(widget.export_geojson(tmp_path / "m.geojson").read_text())
    names = {f["properties"].get("classification", {}).get("name") for f in fc["features"]}
    assert "Nucleus: Positive" in names


@pytest.mark.parametrize(
    "sub, name, family",
    [
        ("nuclephaser_dapi_v5", "dapi_v5.pt", "ultralytics/yolov5"),
        ("meituan_yolov6n_bbbc039", "yolov6n_bbbc039_meituan.onnx", "YOLOv5/6 ONNX export"),
    ],
)
def test_thesis_formats_run_from_the_widget(
    make_napari_viewer, qtbot, fixtures_dir, errors, sub, name, family
):
    """Issue #14: a classic YOLOv5 .pt and a meituan ONNX are added, labelled and counted."""
    from napari_yolocell.data.samples import sample_image_path
    from napari_yolocell.io.images import open_image

    viewer = make_napari_viewer()
    widget = make_widget(viewer, np.asarray(open_image(sample_image_path()).data))
    path = fixtures_dir / sub / name
    try:
        widget.model_file.value = path
        assert not errors and widget.model.value == str(path.resolve())
        label = next(lab for lab, value in session.model_choices() if value == widget.model.value)
        assert family in label
        widget.tile.value = 640
        run(qtbot, widget)
        assert not errors
        count = len(results(viewer)["nuclei"].data)
        assert 120 <= count <= 160  # the sample holds 140 nuclei
    finally:
        session.forget_session_model(path)
