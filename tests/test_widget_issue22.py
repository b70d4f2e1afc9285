"""Issue 22 in a headless viewer: the widgets give the CLI's numbers and refusals.

Ambiguous stacks (asked once per layer), marker layers, pyramid levels, the size filter, the
trust dialog, the model field, model labels and ROI names. The classical detector keeps the
counts exact and quick.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import write_two_level_pyramid

from napari_yolocell.cli import main
from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import channel_refusal
from napari_yolocell.shell import _qt
from napari_yolocell.shell.detect_widget import AXIS_KEY, DetectWidget

TIMEOUT = 60_000


@pytest.fixture
def errors(monkeypatch):
    shown: list[str] = []
    monkeypatch.setattr(_qt, "show_error", shown.append)
    return shown


def make_widget(viewer):
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model.value = "classical"
    widget.tile.value = 256
    return widget


def run(qtbot, widget):
    assert widget.run() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def cli_total(capsys, *args) -> str:
    rc = main(["detect", *map(str, args), "--model", "classical", "--tile", "256", "--quiet"])
    out = capsys.readouterr()
    return out.out.splitlines()[-1] if rc == 0 else out.err


@pytest.fixture(scope="module")
def plain_tiff(tmp_path_factory):
    """A plain 2-plane TIFF (QYX): 12 nuclei in the stain, 5 other blobs in the marker."""
    stain = make_nuclei_image((256, 256), n_nuclei=12, seed=3)
    other = make_nuclei_image((256, 256), n_nuclei=5, seed=4)
    folder = tmp_path_factory.mktemp("plain")
    path = folder / "plain.tif"
    tifffile.imwrite(path, np.stack([stain.image, other.image]))
    return path


# ------------------------------------------------------------------ 1. ambiguous stacks


def test_unlabelled_two_plane_layer_asks_once(
    make_napari_viewer, qtbot, monkeypatch, plain_tiff, errors, capsys
):
    viewer = make_napari_viewer()
    viewer.open(str(plain_tiff), plugin="napari-yolocell")
    widget = make_widget(viewer)
    assert widget.channel.enabled and widget.channel.value == "ask"
    asked = []

    def answer(name, n, parent=None):
        asked.append((name, n))
        return 0

    monkeypatch.setattr(_qt, "ask_axis_meaning", answer)
    run(qtbot, widget)
    assert asked == [("plain", 2)] and not errors
    assert widget.channel.value == 0 and viewer.layers["plain"].metadata[AXIS_KEY] == 0
    assert widget.count_label.value.startswith("plain: 12 nuclei")
    assert "planes" not in widget.count_label.value
    assert cli_total(capsys, plain_tiff, "--channel", "0") == "total\t12"
    run(qtbot, widget)  # asked once per layer
    assert len(asked) == 1

    widget.channel.value = "planes"  # the user changes the answer: both planes counted
    run(qtbot, widget)
    assert "17 nuclei" in widget.count_label.value and "of 2 planes" in widget.count_label.value
    assert cli_total(capsys, plain_tiff, "--planes") == "total\t17"


def test_cancelled_question_runs_nothing(make_napari_viewer, monkeypatch, plain_tiff):
    viewer = make_napari_viewer()
    viewer.open(str(plain_tiff), plugin="napari-yolocell")
    widget = make_widget(viewer)
    monkeypatch.setattr(_qt, "ask_axis_meaning", lambda *a, **k: None)
    assert widget.run() is None and not widget.running
    assert widget.channel.value == "ask"


def test_batch_refuses_with_the_cli_line(make_napari_viewer, qtbot, plain_tiff, tmp_path, capsys):
    viewer = make_napari_viewer()
    widget = make_widget(viewer)
    panel = widget.batch
    panel.folder.value = plain_tiff.parent
    panel.output.value = tmp_path / "out"
    run_panel(qtbot, panel)
    error = panel.results_table()["error"].item()
    assert channel_refusal(2, 0, unlabelled=True) in error
    assert channel_refusal(2, 0, unlabelled=True) in cli_total(capsys, plain_tiff)
    panel.channel.value = 0
    run_panel(qtbot, panel)
    assert panel.results_table()["count"].tolist() == [12]


def run_panel(qtbot, panel):
    assert panel.run() is not None
    qtbot.waitUntil(lambda: not panel.running, timeout=TIMEOUT)


# ------------------------------------------------------------------ 2. marker layers


def test_two_plane_marker_layer_is_refused_in_one_line(make_napari_viewer, qtbot, errors):
    syn = make_nuclei_image((256, 256), n_nuclei=12, seed=3)
    viewer = make_napari_viewer()
    viewer.add_image(syn.image, name="cells")
    viewer.add_image(np.stack([syn.image, syn.image]), name="stack")
    viewer.add_image(syn.image[:128], name="small")
    widget = make_widget(viewer)
    run(qtbot, widget)
    panel = widget.marker_panel
    for name, what in (("stack", "one 2-D plane of 256 x 256"), ("small", "not 256 x 256")):
        panel.marker.value = viewer.layers[name]
        assert panel.measure() is None
        assert what in errors[-1] and "\n" not in errors[-1]
        assert "mean_c0" not in widget.result().df.columns


# ------------------------------------------------------------------ 3. pyramid levels


def test_level_and_diameter_pixels_in_the_widget(make_napari_viewer, qtbot, tmp_path, capsys):
    syn = make_nuclei_image((1024, 1024), n_nuclei=60, diameter=(18.0, 22.0), seed=7)
    path = tmp_path / "pyramid.tif"
    write_two_level_pyramid(path, syn.image)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-yolocell")
    widget = make_widget(viewer)
    widget.level.value = 1
    widget.diameter.value = 10.0
    widget.diameter_pixels.value = "level"
    run(qtbot, widget)
    label = widget.count_label.value
    assert "on level 1 (1/2 resolution)" in label
    n = int(label.split(": ")[1].split()[0])
    cli = cli_total(capsys, path, "--level", "1", "--diameter", "10", "--diameter-pixels", "level")
    assert cli == f"total\t{n}"
    assert cli_total(capsys, path, "--level", "1", "--diameter", "20") == f"total\t{n}"
    # the Batch tab runs level 0: the level diameter becomes full-resolution pixels
    assert widget.batch_settings().params.diameter == 20.0


# ------------------------------------------------------------------ 4. the size filter


def test_min_relative_area_in_detect_and_batch(make_napari_viewer, qtbot, tmp_path, capsys):
    big = make_nuclei_image((384, 384), n_nuclei=15, diameter=(20.0, 24.0), seed=11)
    image = big.image.copy()
    yy, xx = np.mgrid[:384, :384]
    for cy, cx in ((20, 364), (364, 20), (364, 364), (192, 10)):  # debris: 7 px specks
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 12] = 3000
    path = tmp_path / "debris" / "debris.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, image)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="debris")
    widget = make_widget(viewer)
    widget.min_relative_area.value = 0.25
    run(qtbot, widget)
    label = widget.count_label.value
    n = int(label.split(": ")[1].split()[0])
    assert "small not counted" in label
    assert cli_total(capsys, path, "--min-relative-area", "0.25") == f"total\t{n}"
    unfiltered = cli_total(capsys, path)
    assert int(unfiltered.split("\t")[1]) > n
    panel = widget.batch
    panel.folder.value = path.parent
    panel.output.value = tmp_path / "out"
    run_panel(qtbot, panel)
    assert panel.results_table()["count"].tolist() == [n]
    assert pd.read_csv(tmp_path / "out" / "counts.csv")["count"].sum() == n


# ------------------------------------------------------------------ 5. the trust dialog


def test_yes_in_the_trust_dialog_runs_once(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """The real dialog's event loop lets the task finish before "Yes" returns."""
    from qtpy.QtWidgets import QMessageBox

    import napari_yolocell.shell.detect_widget as wd
    from napari_yolocell.models.safety import UntrustedModelError, is_trusted
    from napari_yolocell.shell import session

    viewer = make_napari_viewer()
    viewer.add_image(make_nuclei_image((256, 256), n_nuclei=8, seed=2).image, name="cells")
    widget = make_widget(viewer)
    weights = tmp_path / "evil_ckpt.pt"
    weights.write_bytes(b"a pickle that calls io.open" * 10)
    widget.add_model(weights)
    real_load, loads, texts = wd.load_detector, [], []

    def load(model, **kwargs):
        loads.append(model)
        if not is_trusted(UntrustedModelError(model, "io.open").sha256):
            raise UntrustedModelError(model, "io.open")
        return real_load("classical", **kwargs)

    def question(parent, title, text, *args):
        texts.append(text)
        qtbot.wait(300)  # a modal dialog runs Qt's event loop: the task's end arrives here
        return QMessageBox.StandardButton.Yes

    monkeypatch.setattr(wd, "load_detector", load)
    monkeypatch.setattr(QMessageBox, "question", question)
    try:
        assert widget.run() is not None
        qtbot.waitUntil(lambda: len(loads) == 2 and not widget.running, timeout=TIMEOUT)
        assert "references 'io.open'" in texts[0] and str(weights) in texts[0]
        qtbot.wait(300)
        assert len(loads) == 2 and "8 nuclei" in widget.count_label.value
        run(qtbot, widget)  # the next Run is one run
        qtbot.wait(300)
        assert len(loads) == 3
    finally:
        session.forget_session_model(weights)


# ------------------------------------------------------------------ 6. the model field


def test_typed_model_path_is_checked_once(make_napari_viewer, qtbot, errors, tmp_path):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    widget = make_widget(viewer)
    edit = widget.model_file.line_edit.native
    widget.show()
    edit.setFocus()
    qtbot.keyClicks(edit, str(tmp_path / "missing.pt"))
    assert errors == []  # no check per keystroke
    qtbot.keyClick(edit, Qt.Key.Key_Return)
    assert len(errors) == 1 and "missing.pt" in errors[0]
    assert edit.text() == str(tmp_path / "missing.pt")  # kept, to be corrected
    widget.model.native.setFocus()  # focus-out after Enter: no second check
    assert len(errors) == 1
    widget.add_model_button.native.click()
    assert len(errors) == 2  # Add checks again, on purpose


# ------------------------------------------------------------------ 7. model labels


def test_model_labels_name_the_file_and_its_folder(tmp_path):
    from napari_yolocell.models.backends import LAYOUT_LABELS
    from napari_yolocell.shell import session

    onnx = tmp_path / "fixtures" / "meituan" / "yolov6n.onnx"
    onnx.parent.mkdir(parents=True)
    onnx.write_bytes(b"onnx")
    best = tmp_path / "yolov5n" / "weights" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"pt")
    try:
        session.register_session_model(onnx, "exported model: " + LAYOUT_LABELS["xywh-obj-cls"])
        session.register_session_model(best, "YOLOv5 (ultralytics/yolov5)")
        labels = dict((v, k) for k, v in session.model_choices())
        assert labels[str(onnx.resolve())] == "yolov6n.onnx in meituan (YOLOv5/6 ONNX export)"
        assert labels[str(best.resolve())] == (
            "best.pt in yolov5n/weights (YOLOv5 (ultralytics/yolov5))"
        )
    finally:
        session.forget_session_model(onnx)
        session.forget_session_model(best)


# ------------------------------------------------------------------ 8. ROI names


def test_deleted_roi_name_is_never_reused(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.uint16), name="cells")
    widget = make_widget(viewer)
    square = np.array([[0, 0], [0, 10], [10, 10], [10, 0]], float)
    rois = viewer.add_shapes([square, square + 20, square + 40], name="rois")
    widget.roi.value = rois
    assert rois.features["name"].tolist() == ["roi_0", "roi_1", "roi_2"]
    rois.selected_data = {2}
    rois.remove_selected()
    rois.add_rectangles([square + 5])
    names = rois.features["name"].tolist()
    assert names[:2] == ["roi_0", "roi_1"] and names[2] != "roi_2" and len(set(names)) == 3
