"""Headless screenshots of issue 22's fixes (run under ``xvfb-run -a``).

Writes to ``docs/images/``: the marker panel, the Batch tab (a refused ambiguous file, long
names, a resumed run), the Detect and Train docks together, the trust dialog and the model
list. Uses the classical detector and synthetic images: no model download, about a minute.

    xvfb-run -a python scripts/issue22_screenshots.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def wait_for(app, condition, seconds: float = 120.0) -> None:
    """Process Qt events until ``condition()`` holds (or fail after ``seconds``)."""
    import time

    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("screenshot step did not finish")
        app.processEvents()
        time.sleep(0.05)


def save(widget, name: str) -> None:
    widget.grab().save(str(OUT / name))
    print(OUT / name)


def marker_image(nuclei) -> np.ndarray:
    yy, xx = np.mgrid[: nuclei.image.shape[0], : nuclei.image.shape[1]]
    marker = np.full(nuclei.image.shape, 5.0, np.float32)
    rng = np.random.default_rng(0)
    for cy, cx in nuclei.centers:
        level = rng.lognormal(7.0, 0.4) if rng.random() < 0.35 else rng.lognormal(3.0, 0.4)
        marker[(yy - cy) ** 2 + (xx - cx) ** 2 < 30] = level
    return marker


def main() -> int:
    import napari
    from qtpy.QtWidgets import QApplication, QMessageBox

    from napari_yolocell.data.synthetic import make_nuclei_image
    from napari_yolocell.shell import _qt, session
    from napari_yolocell.shell.detect_widget import DetectWidget
    from napari_yolocell.shell.train_widget import TrainWidget

    os.environ.setdefault("YOLOCELL_CONFIG_DIR", tempfile.mkdtemp())
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    nuclei = make_nuclei_image((512, 512), n_nuclei=60, seed=1)

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.window._qt_window.resize(1500, 1000)
    viewer.add_image(nuclei.image, name="DAPI")
    viewer.add_image(marker_image(nuclei), name="Ki67", visible=False)
    detect = DetectWidget(viewer)
    viewer.window.add_dock_widget(detect, name="Detect nuclei", area="right")
    detect.model.value = "classical"
    detect.tile.value = 512
    rois = viewer.add_shapes(
        [np.array([[20, 20], [20, 250], [490, 250], [490, 20]], float)],
        shape_type="rectangle",
        name="ROIs",
        edge_color="yellow",
        face_color="transparent",
    )
    detect.roi.value = rois
    viewer.layers.selection.active = viewer.layers["DAPI"]
    detect.image.value = viewer.layers["DAPI"]
    detect.run()
    wait_for(app, lambda: not detect.running)

    # 1. marker panel
    panel = detect.marker_panel
    panel.marker.value = viewer.layers["Ki67"]
    panel.measure()
    wait_for(app, lambda: not panel.running)
    app.processEvents()
    panel.native.resize(460, panel.native.sizeHint().height())
    save(panel.native, "issue22_marker_panel.png")

    # 5. model list: the added models, named by file and folder, families in plain words
    from napari_yolocell.models.backends import LAYOUT_LABELS

    onnx = tmp / "exports" / "yolov6n_bbbc039_meituan.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"onnx")
    best = tmp / "runs" / "dapi_v5" / "weights" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"pt")
    session.register_session_model(onnx, "exported model: " + LAYOUT_LABELS["xywh-obj-cls"])
    session.register_session_model(best, "YOLOv5 (ultralytics/yolov5)")
    combo = detect.model.native
    combo.showPopup()
    app.processEvents()
    save(combo.view().window(), "issue22_model_list.png")
    combo.hidePopup()
    detect.model.value = "classical"

    # 2. batch tab: an unlabelled 2-plane file refused with the CLI's line, long names
    folder = tmp / "plate_2026-12-02_experiment_with_a_long_name"
    folder.mkdir()
    for i in range(3):
        syn = make_nuclei_image((256, 256), n_nuclei=10 + 5 * i, seed=i)
        tifffile.imwrite(folder / f"well_B{i + 2:02d}_field_001_DAPI_20x_stitched.tif", syn.image)
    tifffile.imwrite(folder / "stain_and_marker_plain.tif", np.stack([syn.image, syn.image]))
    detect.tabs.setCurrentIndex(1)
    batch = detect.batch
    batch.folder.value = folder
    batch.output.value = tmp / "out"
    batch.run()
    wait_for(app, lambda: not batch.running)
    app.processEvents()
    save(detect.native, "issue22_batch_tab.png")
    detect.tabs.setCurrentIndex(0)

    # 3. both docks: Detect keeps a usable height under Train
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train", area="right")
    app.processEvents()
    save(viewer.window._qt_window, "issue22_both_docks.png")

    # 4. trust dialog (the text the real dialog shows)
    evil = tmp / "evil_ckpt.pt"
    evil.write_bytes(b"a pickle that calls io.open" * 10)
    from napari_yolocell.models.integrity import file_sha256

    box = QMessageBox(
        QMessageBox.Icon.Question,
        _qt.UNTRUSTED_TITLE,
        _qt.untrusted_text(evil, evil.stat().st_size, file_sha256(evil), "io.open"),
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
        viewer.window._qt_window,
    )
    box.show()
    app.processEvents()
    save(box, "issue22_trust_dialog.png")
    box.close()
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
