"""Train widget in a real (headless) viewer: export, import, training wiring, evaluation.

One 384 x 384 synthetic image with its 20 nucleus centres as a Points layer is the dataset
(tile 384: one training image). Training is only checked for its wiring (cancel at the first
batch keeps ``last.pt``); tests/test_train.py covers real training runs.
"""

from __future__ import annotations

import numpy as np
import pytest

import napari_yolocell.shell.detect_widget as wd
from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.shell import _qt, session
from napari_yolocell.shell._worker import Outcome
from napari_yolocell.shell.train_widget import TrainWidget

TIMEOUT = 60_000


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei_image((384, 384), n_nuclei=20, seed=1)


@pytest.fixture
def setup(make_napari_viewer, nuclei, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(nuclei.image, name="cells")
    viewer.add_points(nuclei.centers - 0.5, name="clicked")  # napari: pixel centres
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.ex_image.value = viewer.layers["cells"]
    widget.ex_annotations.value = viewer.layers["clicked"]
    widget.ex_tile.value = 384
    errors: list[str] = []
    monkeypatch.setattr(_qt, "show_error", errors.append)
    return viewer, widget, errors


def wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def export(qtbot, widget, out):
    widget.ex_out.value = out
    assert widget.export() is not None
    wait(qtbot, widget)


def label_lines(root):
    return sum(len(p.read_text().splitlines()) for p in root.glob("labels/*/*.txt"))


def test_export_points_then_import_back(qtbot, setup, tmp_path):
    viewer, widget, errors = setup
    out = tmp_path / "ds"
    export(qtbot, widget, out)
    assert errors == []
    assert (out / "data.yaml").is_file()
    assert label_lines(out) == 20
    assert "wrote" in widget.ex_label.value
    assert widget.tr_data.value == out and widget.im_path.value == out

    assert widget.import_dataset() is not None
    wait(qtbot, widget)
    assert errors == []
    shapes = [layer for layer in viewer.layers if layer._type_string == "shapes"]
    images = [layer for layer in viewer.layers if layer._type_string == "image"]
    assert len(images) == 2 and len(shapes) == 1
    assert shapes[0].nshapes == 20
    assert "20 boxes" in widget.im_label.value


def test_export_errors_write_nothing(qtbot, setup, tmp_path):
    viewer, widget, errors = setup
    viewer.add_points(np.zeros((0, 2)), name="empty")
    widget.ex_annotations.value = viewer.layers["empty"]
    widget.ex_out.value = tmp_path / "never"
    assert widget.export() is None
    assert "is empty" in errors[-1] and "'empty'" in errors[-1]
    assert not (tmp_path / "never").exists()

    viewer.add_labels(np.zeros((100, 100), np.int32), name="small labels")
    widget.ex_annotations.value = viewer.layers["small labels"]
    assert widget.export() is None
    assert "(100, 100)" in errors[-1] and "(384, 384)" in errors[-1]

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    widget.ex_annotations.value = viewer.layers["clicked"]
    widget.ex_out.value = full
    assert widget.export() is None
    assert "not empty" in errors[-1]
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert not widget.running


def test_training_cancel_keeps_last_and_resume_is_offered(qtbot, setup, tmp_path):
    viewer, widget, errors = setup
    out = tmp_path / "ds"
    export(qtbot, widget, out)
    widget.tr_model.value = "yolov5n"
    widget.tr_epochs.value = 1
    widget.tr_imgsz.value = 64
    widget.tr_batch.value = 2
    widget.tr_device.value = "cpu"
    widget.tr_out.value = tmp_path / "runs"
    assert widget.start_training() is not None
    assert widget.cancel_button.enabled and not widget.train_button.enabled
    widget.cancel_training()  # should_stop is true from the first batch on
    wait(qtbot, widget)
    assert errors == []
    result = widget.last_result
    assert result.cancelled and result.last.is_file()
    assert "Resume" in widget.tr_label.value
    assert widget.resume_button.enabled and widget.train_button.enabled
    assert widget.training_kwargs(resume=True)["model"] == str(result.last)


def test_train_done_registers_best_in_detect_widget(setup, tmp_path):
    from napari_yolocell.training.train import TrainResult

    viewer, widget, errors = setup
    detect = wd.DetectWidget(viewer)
    viewer.window.add_dock_widget(detect)
    best = tmp_path / "run" / "weights" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"weights")
    result = TrainResult(best=best, last=best, metrics={"mAP50": 0.5}, run_dir=tmp_path / "run")
    try:
        widget._train_done(Outcome(value=result))
        key = str(best.resolve())
        assert key in detect.model.choices
        assert key in widget.tr_model.choices  # fine-tune the new model next
        assert "mAP50 0.500" in widget.tr_label.value
    finally:
        session.forget_session_model(best)


def test_evaluate_classical_table_and_plots(qtbot, setup, tmp_path):
    viewer, widget, errors = setup
    out = tmp_path / "ds"
    export(qtbot, widget, out)
    widget.ev_models.value = ["classical"]
    widget.ev_split.value = "train"  # the only image is in train
    assert widget.evaluate() is not None
    wait(qtbot, widget)
    assert errors == []
    table, results = widget.last_evaluation
    assert table["model"].tolist() == ["classical"]
    assert table["n_true"].item() == 20
    assert widget.ev_table.shape[0] == 1
    for plot in ("pr_curve", "f1_curve", "count_error_curve", "count_scatter"):
        widget.ev_plot.value = plot
        assert widget.ev_canvas.figure.axes


# ------------------------------------------------------------------ issue #16: training traps


def test_point_diameter_only_for_points(setup):
    viewer, widget, _errors = setup
    assert not widget.ex_diameter.native.isHidden()  # Points chosen
    viewer.add_shapes([np.array([[0, 0], [0, 9], [9, 9], [9, 0]])], name="boxes")
    widget.ex_annotations.value = viewer.layers["boxes"]
    assert widget.ex_diameter.native.isHidden()
    assert "pixels" in widget.ex_diameter.tooltip


def test_export_warns_of_partial_annotation_and_empty_splits(
    qtbot, setup, nuclei, tmp_path, monkeypatch
):
    viewer, widget, errors = setup
    corner = nuclei.centers[(nuclei.centers < 130).all(axis=1)] - 0.5
    assert 0 < len(corner) < 20
    viewer.add_points(corner, name="corner only")
    widget.ex_annotations.value = viewer.layers["corner only"]
    warnings: list[str] = []
    monkeypatch.setattr(_qt, "show_warning", warnings.append)
    export(qtbot, widget, tmp_path / "ds")
    assert errors == []
    text = widget.ex_label.value
    assert "cover only" in text and "taught as background" in text
    assert "val split is empty" in text and "own training images" in text
    assert len(warnings) == 1 and "cover only" in warnings[0]


def test_useless_model_not_added_and_cancel_message_kept(setup, tmp_path):
    from napari_yolocell.training.train import TrainResult

    viewer, widget, _errors = setup
    detect = wd.DetectWidget(viewer)
    best = tmp_path / "run" / "weights" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"weights")
    key = str(best.resolve())
    zero = TrainResult(best=best, last=best, metrics={"mAP50": 0.0}, run_dir=tmp_path / "run")
    widget._train_done(Outcome(value=zero))
    assert key not in detect.model.choices
    assert "mAP50 0.000" in widget.tr_label.value and "not added to Detect" in widget.tr_label.value

    cancelled = TrainResult(
        best=best, last=best, metrics={"mAP50": 0.4}, run_dir=tmp_path / "run", cancelled=True
    )
    try:
        widget._train_done(Outcome(value=cancelled))
        text = widget.tr_label.value  # both: what was kept and how to go on
        assert "cancelled: mAP50 0.400" in text and "press Resume to continue" in text
        assert key in detect.model.choices
    finally:
        session.forget_session_model(best)


def test_import_qupath_geojson_then_export(qtbot, setup, nuclei, tmp_path):
    import json

    viewer, widget, errors = setup
    y, x = nuclei.centers[:, 0], nuclei.centers[:, 1]
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [float(xi), float(yi)]},
            "properties": {"objectType": "annotation", "classification": {"name": "Nucleus"}},
        }
        for yi, xi in zip(y, x, strict=True)
    ]
    feats.append(
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[0, 0], [50, 0], [50, 40], [0, 40], [0, 0]]],
            },
            "properties": {"objectType": "annotation", "name": "region"},
        }
    )
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    widget.ex_geojson.value = path
    added = widget.import_geojson()
    assert [layer._type_string for layer in added] == ["points", "shapes"]
    points, shapes = added
    assert len(points.data) == 20 and shapes.nshapes == 1
    assert np.allclose(points.data, nuclei.centers - 0.5)  # QuPath pixel edges -> napari
    assert list(shapes.features["name"]) == ["region"]
    assert "20 points and 1 polygons" in widget.ex_label.value

    widget.ex_annotations.value = points
    export(qtbot, widget, tmp_path / "ds")
    assert errors == [] and label_lines(tmp_path / "ds") == 20
