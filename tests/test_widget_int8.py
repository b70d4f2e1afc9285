"""INT8 on first use in the Detect and Batch widgets (issue 23), in a headless viewer.

One real quantization of a user's model (a copy of the bundled weights, private cache) from the
Detect widget's worker: progress in the widget's row, INT8 used afterwards, not made twice.
The rest replaces ``quantize_for_user`` to test the plumbing quickly: the setting (persisted),
Cancel while quantizing, a failure told once, the Batch tab calibrating on its files.
"""

from __future__ import annotations

import json
import shutil

import pytest
import tifffile

import napari_yolocell.shell.first_use_int8 as first_use
from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import Cancelled, DetectParams, plane_windows
from napari_yolocell.models import int8_cache
from napari_yolocell.models.backends import OpenVinoDetector
from napari_yolocell.models.loading import clear_cache, load_detector
from napari_yolocell.models.registry import resolve_model
from napari_yolocell.shell import _qt, session
from napari_yolocell.shell.detect_widget import DetectWidget
from napari_yolocell.shell.layers import KIND_KEY, SOURCE_KEY
from napari_yolocell.shell.settings import settings_path
from napari_yolocell.training import quantize

pytest.importorskip("openvino")
pytest.importorskip("nncf")
TIMEOUT = 120_000
N_NUCLEI = 200


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei_image((800, 800), n_nuclei=N_NUCLEI, diameter=(12.0, 22.0), seed=3)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A user's model (the bundled weights under another name: no INT8 shipped) and a private
    cache shared by this module's tests (its FP32 export is made once)."""
    folder = tmp_path_factory.mktemp("user")
    pt = folder / "my_finetune.pt"
    shutil.copy(resolve_model("default").path, pt)
    return pt, folder / "cache"


@pytest.fixture
def user_model(user_files, monkeypatch):
    pt, cache = user_files
    monkeypatch.setenv("YOLOCELL_CACHE_DIR", str(cache))
    monkeypatch.setattr(int8_cache, "cpu_gains_from_int8", lambda: True)
    monkeypatch.setattr(first_use, "_FAILED", set())
    clear_cache()
    yield pt
    clear_cache()
    session.forget_session_model(pt)


@pytest.fixture
def widget(make_napari_viewer, nuclei, user_model, monkeypatch):
    monkeypatch.setattr(_qt, "show_error", lambda message: None)
    monkeypatch.setattr(_qt, "show_info", lambda message: None)
    viewer = make_napari_viewer()
    viewer.add_image(nuclei.image, name="cells")
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.add_model(user_model)
    widget.backend.value = "auto"
    return widget


def texts_of(row) -> list[str]:
    """Every text a progress row shows after each report of a run (patched before Run)."""
    seen: list[str] = []
    update = row.update

    def recording(item):
        update(item)
        seen.append(row.text.value)

    row.update = recording
    return seen


def run(qtbot, widget):
    assert widget.run() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def nuclei_layer(widget):
    return next(
        layer
        for layer in widget.viewer.layers
        if layer.metadata.get(SOURCE_KEY) == "cells" and layer.metadata.get(KIND_KEY) == "nuclei"
    )


def test_quantize_for_user_stops_on_cancel_between_tiles(user_model):
    """Runs first: makes the FP32 export the other tests reuse, then stops in NNCF's pass."""
    polls = []

    def cancel():  # true from the third poll: inside NNCF's pass over the tiles
        polls.append(1)
        return len(polls) >= 3

    images = [make_nuclei_image((640, 640), 80, seed=s).image for s in range(3)]
    with pytest.raises(Cancelled):
        quantize.quantize_for_user(user_model, images, n_tiles=3, cancel=cancel)
    assert len(polls) == 3
    assert int8_cache.lookup(resolve_model(str(user_model))) is None  # nothing kept


def test_detect_quantizes_a_user_model_once_and_runs_int8(qtbot, widget, user_model, monkeypatch):
    assert widget.quantize.value is True  # on by default
    seen = texts_of(widget.progress)
    run(qtbot, widget)
    entry = int8_cache.lookup(resolve_model(str(user_model)))
    assert entry is not None and entry.used, entry and entry.check
    assert any(t.startswith("INT8: calibrating on") for t in seen), seen
    assert any(t.startswith("tiles") for t in seen)  # then the tiles, in the same row
    assert abs(len(nuclei_layer(widget).data) - N_NUCLEI) <= 4
    detector = load_detector(str(user_model), backend="auto")
    assert isinstance(detector, OpenVinoDetector) and detector.folder == entry.folder
    # the second run finds the cached INT8 model: nothing is quantized again
    monkeypatch.setattr(quantize, "quantize_for_user", lambda *a, **k: pytest.fail("again"))
    run(qtbot, widget)
    assert "failed" not in widget.count_label.value


def test_the_setting_turns_it_off_and_is_kept(qtbot, widget, monkeypatch, make_napari_viewer):
    calls = []
    monkeypatch.setattr(quantize, "quantize_for_user", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(quantize, "wants_int8", lambda *a, **k: True)
    widget.quantize.value = False
    assert json.loads(settings_path("detect").read_text())["quantize"] is False
    widget.backend.value = "openvino"  # quick: FP32 without quantizing
    run(qtbot, widget)
    assert calls == [] and widget.batch_settings().quantize is False
    again = DetectWidget(make_napari_viewer())
    assert again.quantize.value is False


def fake_quantizer(record: list, *, wait_for_cancel: bool = False, error: Exception | None = None):
    def fake(weights, calibration, *, progress=None, cancel=None, **kwargs):
        record.append([getattr(c, "shape", None) for c in calibration])
        progress("INT8: calibrating on 2 tiles of your images")
        if wait_for_cancel:
            assert cancel.wait(30)
            raise Cancelled("INT8 quantization cancelled")
        if error is not None:
            raise error
        return int8_cache.Int8Entry(weights, {"passed": True})

    return fake


def test_cancel_while_quantizing(qtbot, widget, monkeypatch):
    calls = []
    monkeypatch.setattr(quantize, "quantize_for_user", fake_quantizer(calls, wait_for_cancel=True))
    monkeypatch.setattr(quantize, "wants_int8", lambda *a, **k: True)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.progress.text.value.startswith("INT8"), timeout=TIMEOUT)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert widget.count_label.value == "detection cancelled"
    assert "INT8" in widget.progress.text.value and "cancelled" in widget.progress.text.value
    assert calls == [[(800, 800)]]  # calibrated on the layer's plane
    assert not any(layer.metadata.get(SOURCE_KEY) == "cells" for layer in widget.viewer.layers)


def test_a_failure_runs_fp32_and_is_told_once(qtbot, widget, monkeypatch):
    told = []
    monkeypatch.setattr(_qt, "show_warning", told.append)  # the worker's warnings land here
    calls = []
    fake = fake_quantizer(calls, error=RuntimeError("no VNNI today"))
    monkeypatch.setattr(quantize, "quantize_for_user", fake)
    monkeypatch.setattr(quantize, "wants_int8", lambda *a, **k: True)
    widget.backend.value = "openvino"  # the run itself: FP32
    run(qtbot, widget)
    run(qtbot, widget)
    assert len(calls) == 1  # not tried again in this session
    lines = [w for w in told if "INT8" in w]
    assert len(lines) == 1 and "no VNNI today" in lines[0] and "running FP32" in lines[0]
    assert abs(len(nuclei_layer(widget).data) - N_NUCLEI) <= 4  # detected all the same


def test_batch_tab_quantizes_on_its_files_first(qtbot, widget, tmp_path, monkeypatch):
    folder = tmp_path / "plate"
    folder.mkdir()
    for seed in range(2):
        syn = make_nuclei_image((300, 320), n_nuclei=30, seed=seed)
        tifffile.imwrite(folder / f"f{seed}.tif", syn.image)
    calls = []
    monkeypatch.setattr(quantize, "quantize_for_user", fake_quantizer(calls))
    monkeypatch.setattr(quantize, "wants_int8", lambda *a, **k: True)
    widget.backend.value = "openvino"
    batch = widget.batch
    batch.folder.value = folder
    batch.output.value = tmp_path / "out"
    seen = texts_of(batch.progress)
    assert batch.run() is not None
    qtbot.waitUntil(lambda: not batch.running, timeout=TIMEOUT)
    assert calls == [[(300, 320), (300, 320)]]  # the batch's own files
    assert "INT8: calibrating on 2 tiles of your images" in seen
    assert batch.status.value.startswith("Done"), batch.status.value
    assert (tmp_path / "out" / "counts.csv").is_file()


def test_plane_windows_follow_the_detection(nuclei):
    import numpy as np

    stack = np.stack([nuclei.image, nuclei.image[::-1]] * 3)  # 6 planes
    windows = plane_windows(stack, DetectParams(), window=512, max_planes=2)
    assert [w.shape for w in windows] == [(512, 512)] * 2
    c = (nuclei.image.shape[0] - 512) // 2  # the central window
    assert np.array_equal(windows[0], nuclei.image[c : c + 512, c : c + 512])
    assert np.array_equal(windows[1], nuclei.image[::-1][c : c + 512, c : c + 512])
    assert len(plane_windows(stack, DetectParams(), planes=[3])) == 1
    pyramid = [nuclei.image, nuclei.image[::2, ::2]]
    assert plane_windows(pyramid, DetectParams(level=1))[0].shape == (400, 400)
