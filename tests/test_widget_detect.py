"""Detect widget in a real (headless) viewer, with the deterministic classical detector.

The classical detector finds every blob of a clean synthetic image exactly, so counts can be
compared with the truth. Images are small (384 x 384, one or two tiles) to keep this quick.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import napari_yolocell.shell.detect_widget as wd
from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.io.tables import CSV_COLUMNS
from napari_yolocell.shell import _qt, session
from napari_yolocell.shell.detect_widget import DetectWidget
from napari_yolocell.shell.layers import KIND_KEY, SOURCE_KEY

TIMEOUT = 30_000


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei_image((384, 384), n_nuclei=20, seed=1)


@pytest.fixture
def setup(make_napari_viewer, nuclei):
    viewer = make_napari_viewer()
    viewer.add_image(nuclei.image, name="cells")
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model.value = "classical"
    widget.tile.value = 256
    return viewer, widget


def run(qtbot, widget):
    worker = widget.run()
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def results(viewer, source="cells"):
    return {
        layer.metadata[KIND_KEY]: layer
        for layer in viewer.layers
        if layer.metadata.get(SOURCE_KEY) == source
    }


def test_detect_layers_count_rerun_and_slider(qtbot, setup, nuclei):
    viewer, widget = setup
    assert widget.conf.value == 0.0  # the classical model's default confidence
    run(qtbot, widget)
    layers = results(viewer)
    assert set(layers) == {"boxes", "nuclei"}
    boxes, points = layers["boxes"], layers["nuclei"]
    assert boxes._type_string == "shapes" and points._type_string == "points"
    assert boxes.nshapes == len(points.data) == nuclei.count == 20
    assert boxes.name == "cells boxes (20)" and points.name == "cells nuclei (20)"
    assert list(boxes.features.columns) == ["confidence", "class", "id"]
    assert list(points.features.columns) == ["confidence", "class", "id"]
    assert len(boxes.metadata["detections"]) == 20
    assert "20 nuclei" in widget.count_label.value
    # centres land on the truth (napari puts pixel centres on integers: truth - 0.5)
    truth = nuclei.centers - 0.5
    dist = np.linalg.norm(points.data[:, None, :] - truth[None], axis=2).min(axis=1)
    assert dist.max() < 1.5

    run(qtbot, widget)  # re-running replaces, never piles up
    assert len(viewer.layers) == 3
    assert set(results(viewer)) == {"boxes", "nuclei"}

    conf = np.sort(boxes.metadata["detections"]["confidence"].to_numpy())
    widget.conf.value = float(np.round(conf[12], 2) + 0.005)
    expected = int((conf >= widget.conf.value).sum())
    layers = results(viewer)
    assert 0 < expected < 20
    assert layers["boxes"].nshapes == len(layers["nuclei"].data) == expected
    assert len(layers["nuclei"].features) == expected
    assert layers["nuclei"].name == f"cells nuclei ({expected})"
    assert f"{expected} nuclei" in widget.count_label.value
    widget.conf.value = 0.0
    assert results(viewer)["boxes"].nshapes == 20


def test_roi_counts_and_csv_export(qtbot, setup, nuclei, tmp_path):
    viewer, widget = setup
    # the edge x = 240 lies in a wide gap between nuclei (x = 196 and 278)
    viewer.add_shapes(
        [np.array([[0, 0], [0, 239.5], [383.5, 239.5], [383.5, 0]])],
        shape_type="rectangle",
        name="left",
    )
    widget.roi.value = viewer.layers["left"]
    run(qtbot, widget)
    truth_left = int((nuclei.centers[:, 1] < 240).sum())
    counts = widget.counts()
    assert list(counts.columns) == ["image", "plane", "roi", "count"]
    assert counts.loc[counts["roi"] == "all", "count"].item() == 20
    assert counts.loc[counts["roi"] == "roi_0", "count"].item() == truth_left
    assert not widget.roi_table.native.isHidden()
    assert widget.roi_table.column_headers == ("plane", "roi", "count")
    assert widget.roi_table.data[0, 2] == truth_left

    det = pd.read_csv(widget.export_detections(tmp_path / "det.csv"))
    assert list(det.columns) == CSV_COLUMNS
    assert len(det) == 20 and (det["image"] == "cells").all()
    cnt = pd.read_csv(widget.export_counts(tmp_path / "counts.csv"))
    assert list(cnt.columns) == ["image", "plane", "roi", "count"]
    assert sorted(cnt["count"]) == sorted([20, truth_left])
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_calibrate_by_count_and_points(qtbot, setup, nuclei):
    viewer, widget = setup
    widget.known_count.value = 12
    widget._on_calibrate_clicked()  # no run yet: runs once, then calibrates on its table
    qtbot.waitUntil(lambda: widget.last_calibration is not None, timeout=TIMEOUT)
    cal = widget.last_calibration
    assert widget.conf.value == pytest.approx(cal.conf)
    assert len(widget.filtered()) == cal.count
    assert abs(cal.count - 12) <= 1
    assert "known: 12" in widget.calibration_label.value
    assert "->" in widget.calibration_label.value  # before -> after

    # every nucleus clicked: the best F1 keeps all 20 detections
    viewer.add_points(nuclei.centers - 0.5, name="clicked")
    widget.clicked.value = viewer.layers["clicked"]
    cal = widget.calibrate()
    assert cal.count == 20 and len(widget.filtered()) == 20
    assert widget._calibrated["classical"] == cal.conf  # kept for the session


def test_cancel_leaves_no_layers(qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(make_nuclei_image((1024, 1024), n_nuclei=50, seed=2).image, name="big")
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model.value = "classical"
    widget.tile.value = 64  # hundreds of tiles: the cancel lands long before the end
    worker = widget.run()
    assert worker is not None and widget.cancel_button.enabled
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert len(viewer.layers) == 1
    assert widget.result() is None
    assert widget.count_label.value == "detection cancelled"
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_error_is_shown_and_run_reenabled(qtbot, setup, monkeypatch):
    viewer, widget = setup
    errors = []
    monkeypatch.setattr(_qt, "show_error", errors.append)

    def broken(name, **_):
        raise ValueError(f"unknown model {name!r}")

    monkeypatch.setattr(wd, "load_detector", broken)
    run(qtbot, widget)
    assert len(errors) == 1 and "Detection failed" in errors[0]
    assert "unknown model 'classical'" in errors[0]
    assert widget.run_button.enabled and len(viewer.layers) == 1


def test_stack_planes_map_to_leading_axis(qtbot, make_napari_viewer, nuclei):
    viewer = make_napari_viewer()
    other = make_nuclei_image((384, 384), n_nuclei=12, seed=5)
    viewer.add_image(
        np.stack([nuclei.image, other.image]),
        name="stack",
        scale=(2.0, 0.5, 0.5),
        translate=(0.0, 10.0, 20.0),
    )
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model.value = "classical"
    widget.tile.value = 256
    widget.channel.value = "planes"  # an unlabelled 2-long first axis: the user says (#22)
    run(qtbot, widget)
    layers = results(viewer, "stack")
    points = layers["nuclei"]
    assert points.ndim == 3 and layers["boxes"].ndim == 3
    assert list(points.scale) == [2.0, 0.5, 0.5]
    assert list(points.translate) == [0.0, 10.0, 20.0]
    z = points.data[:, 0]
    assert (z == 0).sum() == 20 and (z == 1).sum() == 12
    assert "of 2 planes" in widget.count_label.value
    counts = widget.counts()
    assert counts["count"].tolist() == [20, 12]

    # only the plane shown
    viewer.dims.set_point(0, 2.0)  # world z = 2.0 -> plane 1
    widget.current_plane.value = True
    run(qtbot, widget)
    points = results(viewer, "stack")["nuclei"]
    assert len(points.data) == 12 and (points.data[:, 0] == 1).all()


def test_multiscale_level_boxes_in_full_resolution(qtbot, make_napari_viewer, nuclei):
    viewer = make_napari_viewer()
    viewer.add_image([nuclei.image, nuclei.image[::2, ::2]], multiscale=True, name="pyramid")
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.level.choices == (0, 1)
    widget.model.value = "classical"
    widget.tile.value = 256
    widget.level.value = 1
    run(qtbot, widget)
    points = results(viewer, "pyramid")["nuclei"]
    assert len(points.data) >= 10  # small blobs at half resolution are partly missed
    dist = np.linalg.norm(points.data[:, None, :] - (nuclei.centers - 0.5)[None], axis=2)
    assert dist.min(axis=1).max() < 2.0  # full-resolution coordinates


def test_untrained_yolo_runs(qtbot, make_napari_viewer, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(make_nuclei_image((128, 128), n_nuclei=5, seed=3).image, name="small")
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    errors = []
    monkeypatch.setattr(_qt, "show_error", errors.append)
    widget.model.value = "yolov5n.yaml"
    widget.tile.value = 128
    run(qtbot, widget)
    assert errors == []
    assert set(results(viewer, "small")) == {"boxes", "nuclei"}


def test_session_models_reach_the_combo(setup, tmp_path):
    _, widget = setup
    weights = tmp_path / "run" / "weights" / "best.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not really a model")
    key = session.register_session_model(weights)
    try:
        assert key in widget.model.choices
        widget.add_model(weights)
        assert widget.model.value == key
        with pytest.raises(FileNotFoundError):
            widget.add_model(tmp_path / "missing.pt")
    finally:
        session.forget_session_model(key)
    assert key not in widget.model.choices


def test_large_result_boxes_only_in_view(make_napari_viewer):
    """50,000 detections (no model run): every point, boxes only for the visible region."""
    from napari_yolocell.shell.layers import MAX_BOXES_IN_VIEW

    viewer = make_napari_viewer()
    widget = DetectWidget(viewer)
    i = np.arange(50_000)
    y0, x0 = (i // 200) * 20.0, (i % 200) * 20.0  # 250 x 200 grid of 10 px boxes
    df = pd.DataFrame(
        {
            "plane": 0,
            "y": y0 + 5,
            "x": x0 + 5,
            "y0": y0,
            "x0": x0,
            "y1": y0 + 10,
            "x1": x0 + 10,
            "confidence": 0.9,
            "class": 0,
        }
    )
    widget._results["big"] = wd._Result(
        source="big",
        df=df,
        model="classical",
        run_conf=0.0,
        scale=[1.0, 1.0],
        translate=[0.0, 0.0],
        plane_shape=(),
    )
    widget._active = "big"
    viewer.camera.center = (1000.0, 1000.0)
    viewer.camera.zoom = 4.0  # the viewbox spans a few hundred pixels of the image
    y_lo, x_lo, y_hi, x_hi = widget.view_region()
    assert y_lo < 1000 < y_hi and x_lo < 1000 < x_hi and y_hi - y_lo < 500

    widget._replace_layers("big", widget.results_to_layers())
    widget._refresh_counts()
    layers = results(viewer, "big")
    expected = int(((df.y1 > y_lo) & (df.y0 < y_hi) & (df.x1 > x_lo) & (df.x0 < x_hi)).sum())
    assert len(layers["nuclei"].data) == 50_000
    assert 0 < layers["boxes"].nshapes == expected <= MAX_BOXES_IN_VIEW
    assert "50000 nuclei" in widget.count_label.value  # the full count, always
    assert f"boxes drawn for the {expected:,} in view" in widget.count_label.value
    assert not widget.boxes_button.native.isHidden()

    # pan elsewhere: nothing changes until the button is pressed, then the new view's boxes
    viewer.camera.center = (3000.0, 2000.0)
    assert layers["boxes"].nshapes == expected
    assert widget.show_boxes_in_view() == layers["boxes"].nshapes > 0
    assert layers["boxes"].data[0][:, 0].min() > 2500
    assert len(layers["nuclei"].data) == 50_000

    viewer.camera.zoom = 0.01  # everything in view: too many boxes, only points
    assert widget.show_boxes_in_view() == 0
    assert "zoom in" in widget.count_label.value


@pytest.mark.parametrize("answer", [True, False])
def test_untrusted_weights_ask_then_trust_and_run(qtbot, setup, tmp_path, monkeypatch, answer):
    """A user-added .pt that could run code: the dialog shows path, size and SHA-256."""
    from napari_yolocell.models.safety import UntrustedModelError, is_trusted

    viewer, widget = setup
    monkeypatch.setenv("YOLOCELL_CONFIG_DIR", str(tmp_path / "config"))
    weights = tmp_path / "run" / "weights" / "best.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"a pickle that calls os.system" * 10)
    widget.add_model(weights)
    real_load = wd.load_detector
    loads, asked, errors = [], [], []

    def load(model, **kwargs):
        loads.append(model)
        if not is_trusted(UntrustedModelError(model, "posix.system").sha256):
            raise UntrustedModelError(model, "posix.system")
        return real_load("classical", **kwargs)

    def confirm(path, size, sha256, parent=None, references=""):
        asked.append((path, size, sha256))
        return answer

    monkeypatch.setattr(wd, "load_detector", load)
    monkeypatch.setattr(_qt, "confirm_untrusted", confirm)
    monkeypatch.setattr(_qt, "show_error", errors.append)
    try:
        run(qtbot, widget)
        qtbot.waitUntil(lambda: not widget.running and len(loads) == (2 if answer else 1))
        ((path, size, sha256),) = asked
        assert path == weights.resolve() and size == weights.stat().st_size == 290
        assert len(sha256) == 64
        if answer:  # trusted: recorded, loaded again, result layers shown
            assert is_trusted(sha256) and errors == []
            assert set(results(viewer)) == {"boxes", "nuclei"}
        else:  # refused: one line, nothing loaded or trusted
            assert not is_trusted(sha256) and len(errors) == 1
            assert "refusing to load" in errors[0] and "\n" not in errors[0]
            assert len(viewer.layers) == 1
    finally:
        session.forget_session_model(weights)
