"""Batch tab of the Detect widget in a real (headless) viewer, with the classical detector.

Three small synthetic TIFFs and one corrupt file: the classical detector counts the synthetic
blobs exactly, so the table and CSVs can be compared with the truth.
"""

from __future__ import annotations

import re
import threading
from functools import partial

import pandas as pd
import pytest
import tifffile

import napari_yolocell.shell.batch_widget as wb
from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.batch import BatchCancelled
from napari_yolocell.shell import _qt
from napari_yolocell.shell._worker import outcome_of
from napari_yolocell.shell.batch_widget import BatchPanel
from napari_yolocell.shell.detect_widget import DetectWidget

TIMEOUT = 30_000
COUNTS = {"a.tif": 4, "b.tif": 7, "sub/c.tif": 5}


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    root = tmp_path_factory.mktemp("plate")
    (root / "sub").mkdir()
    for seed, (name, n) in enumerate(COUNTS.items()):
        tifffile.imwrite(root / name, make_nuclei_image((200, 220), n_nuclei=n, seed=seed).image)
    (root / "bad.tif").write_bytes(b"II*\x00not a tiff")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def detect(make_napari_viewer, monkeypatch) -> DetectWidget:
    monkeypatch.setattr(_qt, "show_error", lambda message: None)
    viewer = make_napari_viewer()
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model.value = "classical"
    widget.tile.value = 256
    return widget


@pytest.fixture
def panel(detect, plate, tmp_path) -> BatchPanel:
    batch = detect.batch
    batch.folder.value = plate
    batch.pattern.value = "**/*.tif"
    batch.output.value = tmp_path / "out"
    return batch


def column(panel, name):
    """A table column as shown (blank cells read back as None)."""
    return list(panel.table[name])


def wait(qtbot, panel):
    qtbot.waitUntil(lambda: not panel.running, timeout=TIMEOUT)


def test_batch_tab_table_and_csvs(qtbot, detect, panel, tmp_path):
    assert detect.tabs.count() == 2 and detect.tabs.tabText(1) == "Batch"
    assert panel.run() is not None
    assert panel.cancel_button.enabled and not panel.run_button.enabled
    wait(qtbot, panel)
    assert panel.run_button.enabled and not panel.cancel_button.enabled

    assert column(panel, "image") == ["a.tif", "b.tif", "bad.tif", "sub/c.tif"]
    assert column(panel, "count") == [4, 7, None, 5]
    errors = column(panel, "error")
    assert errors[:2] == [None, None] and errors[3] is None and "bad.tif" in errors[2]
    res = panel.results_table()
    assert res["count"].tolist()[:2] == [4, 7] and res["error"].notna().sum() == 1
    assert panel.total_label.value.startswith("4 of 4 images: 16 nuclei, 1 unreadable")
    assert "Done" in panel.status.value

    out = tmp_path / "out"
    counts = pd.read_csv(out / "counts.csv")
    assert counts["count"].tolist() == [4, 7, 5]
    assert len(pd.read_csv(out / "detections.csv")) == 16
    errors = pd.read_csv(out / "errors.csv")
    assert errors["image"].str.endswith("bad.tif").tolist() == [True]
    assert not (out / "detections.csv.parts").exists()  # merged and cleaned up

    # the settings come from the Image tab: the confidence shown, not the low run threshold
    detect.conf.value = 0.5
    assert panel.params().conf == 0.5 and panel.params().level == 0


def test_invalid_settings_do_not_start(panel, tmp_path):
    panel.output.line_edit.value = ""  # nothing chosen (FileEdit reads it as ".")
    assert panel.run() is None and "output folder" in panel.status.value
    (tmp_path / "file").write_text("")
    panel.output.value = tmp_path / "file"
    assert panel.run() is None and "is a file" in panel.status.value
    panel.output.value = tmp_path / "out"
    panel.pattern.value = "*.png"
    assert panel.run() is None and "no image file" in panel.status.value
    assert not panel.running and panel.run_button.enabled


def test_cancel_then_resume(qtbot, panel, tmp_path, monkeypatch):
    """Cancel after the first image; Run again resumes (the first image is not re-detected)."""
    import napari_yolocell.engine.batch as batch_module

    real_detect, real_run = batch_module.detect_file, wb.run_batch
    detected: list[str] = []

    def recording_detect(path, *args, **kwargs):
        detected.append(path)
        return real_detect(path, *args, **kwargs)

    def cancel_after_first(paths, model, params, *, on_result=None, cancel=None, **kwargs):
        def hook(index, res):
            on_result(index, res)
            cancel.set()  # as if Cancel were pressed while the first image finished

        return real_run(paths, model, params, on_result=hook, cancel=cancel, **kwargs)

    monkeypatch.setattr(batch_module, "detect_file", recording_detect)
    monkeypatch.setattr(wb, "run_batch", cancel_after_first)
    panel.run()
    wait(qtbot, panel)
    assert "Cancelled with 1 of 4" in panel.status.value and "resume" in panel.status.value
    out = tmp_path / "out"
    assert (out / "detections.csv.parts").is_dir() and not (out / "counts.csv").exists()
    assert column(panel, "count") == [4, None, None, None]
    assert len(detected) == 1

    monkeypatch.setattr(wb, "run_batch", real_run)
    panel.run()
    wait(qtbot, panel)
    assert "Done" in panel.status.value
    assert "3 of 4 images analysed" in panel._done_summary(4)  # not "4 of 4" (#22)
    assert "1 resumed from the stopped run" in panel._done_summary(4)
    assert [p.rsplit("/", 1)[-1] for p in detected[1:]] == ["b.tif", "bad.tif", "c.tif"]
    assert column(panel, "count") == [4, 7, None, 5]
    assert pd.read_csv(out / "counts.csv")["count"].tolist() == [4, 7, 5]
    assert len(pd.read_csv(out / "detections.csv")) == 16


def test_cancel_button_stops_the_worker(qtbot, panel):
    assert panel.run() is not None
    panel.cancel()
    assert panel.status.value == "cancelling..."
    wait(qtbot, panel)
    assert "Cancelled" in panel.status.value or "Done" in panel.status.value
    assert panel.run_button.enabled


def test_run_batch_job_returns_cancellation(monkeypatch, tmp_path):
    def cancelled(*args, **kwargs):
        raise BatchCancelled("batch cancelled")

    monkeypatch.setattr(wb, "run_batch", cancelled)
    job = wb.BatchJob(paths=[], model="classical", params=None, output=tmp_path)
    outcome = outcome_of(partial(wb.run_batch_job, job), lambda *a: None, threading.Event())
    assert outcome.cancelled and outcome.error is None


def test_settings_come_from_the_owner_not_its_controls(detect, panel):
    """The panel reads nothing of the Detect widget but the settings callable it was given."""
    detect.model.value = "classical"
    detect.backend.value = "torch"
    detect.iou.value = 0.3
    settings = panel.settings()
    assert (settings.model, settings.backend, settings.params.iou) == ("classical", "torch", 0.3)
    job = panel.make_job()
    assert (job.model, job.backend, job.params) == ("classical", "torch", settings.params)
    panel.settings = lambda: wb.DetectSettings(model=None, backend="auto", params=settings.params)
    assert panel.run() is None and "no model selected" in panel.status.value


def test_progress_row_shows_images_and_tiles_with_time_left(qtbot, detect, tmp_path):
    """The images row counts done / total with a time-left estimate while the batch runs,
    and the tiles row follows the image being analysed."""
    folder = tmp_path / "three"
    folder.mkdir()
    for seed in range(3):
        image = make_nuclei_image((300, 300), n_nuclei=5, seed=seed).image
        tifffile.imwrite(folder / f"img{seed}.tif", image)
    panel = detect.batch
    detect.tile.value = 128  # several tiles per image
    panel.folder.value = folder
    panel.output.value = tmp_path / "out"
    images: list[tuple[str, int, int]] = []
    tiles: list[tuple[str, int, int]] = []

    def recorded(row, seen):
        """``row.update`` that also records what the row shows after each report."""
        real = row.update

        def update(item):
            real(item)
            seen.append((row.text.value, row.bar.value, row.bar.max))

        return update

    # plain attributes (monkeypatch's undo would delete them: a Container removes a widget then)
    panel.progress.update = recorded(panel.progress, images)
    panel.tiles.update = recorded(panel.tiles, tiles)

    assert panel.run() is not None
    assert not panel.progress.bar.native.isHidden()  # shown (the Batch tab itself is not)
    wait(qtbot, panel)

    assert [(bar_value, bar_max) for _, bar_value, bar_max in images] == [(1, 3), (2, 3), (3, 3)]
    assert re.fullmatch(r"images 1 / 3, about \d+ s left", images[0][0])
    assert re.fullmatch(r"images 2 / 3, about \d+ s left", images[1][0])
    assert images[2][0] == "images 3 / 3"
    assert re.fullmatch(r"3 of 3 images in \d+ s", panel.progress.text.value)
    assert panel.progress.bar.native.isHidden()  # the run is over: only the summary stays
    for name in ("img0.tif", "img2.tif"):  # every image's tiles, with their own estimate
        ours = [text for text, _, _ in tiles if text.startswith(f"{name}: tiles ")]
        assert ours and re.fullmatch(rf"{name}: tiles (\d+) / \1", ours[-1]), ours
        assert any(re.search(r"about \d+ s left$", t) for t in ours), ours
    assert panel.tiles.text.native.isHidden()
