"""The user's edits of Detect's result layers survive the confidence slider (issue #20).

A biologist deletes false boxes and clicks missed nuclei in the result layers; moving the
slider must not bring the deleted ones back nor drop the added ones, and the count, the layer
names and the CSV / GeoJSON exports must follow the edits. Real (headless) viewer, classical
detector on a clean synthetic image (20 nuclei).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.shell import _qt
from napari_yolocell.shell.detect_widget import DetectWidget
from napari_yolocell.shell.layers import KIND_KEY, SOURCE_KEY, apply_layer_edits

TIMEOUT = 30_000


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei_image((384, 384), n_nuclei=20, seed=1)


@pytest.fixture
def setup(make_napari_viewer, nuclei, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(nuclei.image, name="cells")
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model.value = "classical"
    widget.tile.value = 256
    infos: list[str] = []
    monkeypatch.setattr(_qt, "show_info", infos.append)
    return viewer, widget, infos


def run(qtbot, widget):
    assert widget.run() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def results(viewer, source="cells"):
    return {
        layer.metadata[KIND_KEY]: layer
        for layer in viewer.layers
        if layer.metadata.get(SOURCE_KEY) == source
    }


def wiggle(widget):
    """The slider up and back, as in the report (0.20 -> 0.21 -> 0.20)."""
    before = float(widget.conf.value)
    widget.conf.value = before + 0.01
    widget.conf.value = before


def test_edits_survive_the_slider_and_reach_the_exports(qtbot, setup, tmp_path):
    viewer, widget, infos = setup
    run(qtbot, widget)
    layers = results(viewer)
    boxes, points = layers["boxes"], layers["nuclei"]
    assert boxes.nshapes == 20

    boxes.selected_data = {0, 1, 2}
    boxes.remove_selected()  # three false positives
    assert len(points.data) == 17 and points.name == "cells nuclei (17)"
    assert boxes.name == "cells boxes (17)"
    assert "17 nuclei" in widget.count_label.value
    assert "3 removed" in widget.count_label.value
    wiggle(widget)
    assert boxes.nshapes == len(points.data) == 17
    assert "17 nuclei" in widget.count_label.value

    points.add([[200.0, 300.0]])  # a missed nucleus, clicked
    assert len(points.data) == 18 and boxes.nshapes == 18
    assert points.features["confidence"].iloc[-1] == 1.0
    widget.conf.value = 0.99  # added nuclei count at any confidence
    assert len(points.data) >= 1 and "1 added" in widget.count_label.value
    widget.conf.value = 0.0
    assert boxes.nshapes == len(points.data) == 18
    assert boxes.name == "cells boxes (18)" and points.name == "cells nuclei (18)"

    det = pd.read_csv(widget.export_detections(tmp_path / "det.csv"))
    assert len(det) == 18
    added = det[det["confidence"] == 1.0]
    assert len(added) == 1 and added["y"].item() == pytest.approx(200.5)
    counts = pd.read_csv(widget.export_counts(tmp_path / "counts.csv"))
    assert counts["count"].tolist() == [18]
    fc = json.loads(widget.export_geojson(tmp_path / "nuclei.geojson").read_text())
    assert len(fc["features"]) == 18

    points.selected_data = {0}
    points.remove_selected()  # deleting a point deletes its box too
    wiggle(widget)
    assert boxes.nshapes == len(points.data) == 17

    run(qtbot, widget)  # a re-run replaces the result but keeps the edited layers
    assert any("edited" in m for m in infos)
    kept = [layer.name for layer in viewer.layers if layer.name.endswith("edited")]
    assert sorted(kept) == ["cells boxes (17) edited", "cells nuclei (17) edited"]
    assert results(viewer)["boxes"].nshapes == 20


def test_moved_box_updates_the_table():
    df = pd.DataFrame(
        {
            "plane": [0, 0],
            "y": [10.0, 30.0],
            "x": [10.0, 30.0],
            "y0": [5.0, 25.0],
            "x0": [5.0, 25.0],
            "y1": [15.0, 35.0],
            "x1": [15.0, 35.0],
            "confidence": [0.9, 0.3],
            "class": [0, 0],
        }
    )
    moved = np.array([[6, 6], [6, 16], [16, 16], [16, 6]], float) - 0.5
    box1 = np.array([[25, 25], [25, 35], [35, 35], [35, 25]], float) - 0.5
    table, ids = apply_layer_edits(df, "boxes", [moved, box1], [0, 1], [0, 1])
    assert ids.tolist() == [0, 1]
    assert table.loc[0, ["y0", "x0", "y1", "x1"]].tolist() == [6, 6, 16, 16]
    assert table.loc[0, "y"] == 11 and table.attrs["edits"]["moved"] == 1
    same, _ = apply_layer_edits(table, "boxes", [moved, box1], [0, 1], [0, 1])
    assert same is table  # nothing changed: no copy
