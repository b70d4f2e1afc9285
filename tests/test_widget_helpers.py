"""Qt-free helpers behind the issue #16 widget changes: ROI names, export warnings, progress
text, remembered settings, QuPath annotations as layer data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_yolocell.io.geojson import GeoJsonAnnotations
from napari_yolocell.io.tables import unique_roi_names
from napari_yolocell.shell.layers import geojson_to_layers, result_names
from napari_yolocell.shell.progress_row import progress_text
from napari_yolocell.shell.settings import load_settings, persist, settings_path
from napari_yolocell.training.dataset import Sample, coverage_warning, export_dataset


def test_unique_roi_names_keep_given_and_fill_the_rest():
    assert unique_roi_names([None, None]) == ["roi_0", "roi_1"]
    assert unique_roi_names(["a", float("nan"), "a", " "]) == ["a", "roi_1", "roi_2", "roi_3"]
    # after roi_0 was deleted, a new ROI does not take a name already in use
    assert unique_roi_names(["roi_1", None]) == ["roi_1", "roi_2"]


def test_coverage_warning_and_empty_splits(tmp_path):
    img = np.zeros((200, 200), np.uint8)
    everywhere = np.array([[5, 5, 15, 15], [180, 180, 190, 190], [5, 180, 15, 190]])
    assert coverage_warning(Sample(img, everywhere, "full")) is None
    corner = np.array([[5, 5, 15, 15], [30, 30, 40, 40]])
    assert "cover only ~" in coverage_warning(Sample(img, corner, "part"))
    assert "no annotations" in coverage_warning(Sample(img, np.zeros((0, 4)), "none"))

    report = export_dataset([Sample(img, corner, "part")], tmp_path / "ds", tile=200)
    text = " | ".join(report.warnings)
    assert "part: annotations cover only" in text
    assert "val split is empty" in text and "test split is empty" in text
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["warnings"]


def test_progress_text_estimates_time_left():
    assert progress_text(0, 40, 3.0) == "tiles 0 / 40"
    assert progress_text(10, 40, 5.0) == "tiles 10 / 40, about 15 s left"
    assert progress_text(1, 100, 60.0, "images") == "images 1 / 100, about 1 h 39 min left"
    assert progress_text(40, 40, 9.0) == "tiles 40 / 40"


class _Value:
    """A stand-in for a magicgui value widget: ``value`` and a ``changed`` signal."""

    def __init__(self, value, allowed=None):
        self._value, self.allowed, self.slots = value, allowed, []
        self.changed = self
        self.connect = self.slots.append

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        if self.allowed is not None and v not in self.allowed:
            raise ValueError(v)
        self._value = v
        for slot in self.slots:
            slot(v)


def test_settings_round_trip_in_the_config_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("YOLOCELL_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert settings_path("w") == tmp_path / "xdg" / "napari-yolocell" / "widgets" / "w.json"
    widgets = {"tile": _Value(640), "model": _Value("a", allowed={"a", "b"})}
    persist("w", widgets)
    widgets["tile"].value = 320
    widgets["model"].value = "b"
    assert load_settings("w") == {"tile": 320, "model": "b"}

    again = {"tile": _Value(640), "model": _Value("a", allowed={"a"})}  # "b" is gone
    persist("w", again)
    assert again["tile"].value == 320 and again["model"].value == "a"
    settings_path("w").write_text("{not json")
    assert load_settings("w") == {}


def test_geojson_annotations_to_layer_data_and_names():
    ann = GeoJsonAnnotations(
        points=np.array([[10.0, 20.0]]),
        point_classes=["Nucleus"],
        point_names=[None],
        point_z=np.array([0]),
        polygons=[np.array([[0.0, 0.0], [0, 4], [4, 4], [4, 0]])],
        polygon_classes=[None],
        polygon_names=["r"],
        polygon_types=["annotation"],
        polygon_z=np.array([2]),
    )
    (pts, pmeta, pkind), (polys, smeta, skind) = geojson_to_layers(ann, "q")
    assert (pkind, skind) == ("points", "shapes")
    assert pts.tolist() == [[0.0, 9.5, 19.5]]  # z added: one object is on plane 2
    assert polys[0][0].tolist() == [2.0, -0.5, -0.5]
    assert list(smeta["features"]["name"]) == ["r"]
    assert result_names("BBBC039 nuclei", 7) == ("BBBC039 nuclei boxes (7)", "BBBC039 nuclei (7)")
    assert result_names("cells", 7)[1] == "cells nuclei (7)"


@pytest.mark.parametrize("name", ["iou", "tile", "overlap", "normalize", "level"])
def test_tooltips_start_with_the_engine_help(name):
    from napari_yolocell.engine.detect import param_help
    from napari_yolocell.shell.help import TOOLTIPS

    assert TOOLTIPS[name].lower().startswith(param_help(name).lower())
