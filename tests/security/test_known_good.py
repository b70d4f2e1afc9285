"""Genuine models still load, with the same boxes (issue 21, "done when").

The bundled ultralytics checkpoint is compared with ultralytics' own full load (our file, so
the test may unpickle it); the classic YOLOv5 and meituan fixtures and their ONNX exports are
compared with their reference detections in ``tests/test_foreign_models.py``; here they must
pass the new checks and load.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_yolocell.engine.detect import DetectParams, detect_image
from napari_yolocell.models.loading import describe_model, load_detector

from ._craft import BUNDLED


def _image() -> np.ndarray:
    from napari_yolocell.data.synthetic import make_nuclei_image

    return make_nuclei_image(shape=(320, 320), seed=1).image


def test_bundled_checkpoint_gives_ultralytics_boxes():
    import torch

    from napari_yolocell.models.ultralytics_env import import_ultralytics

    ultralytics = import_ultralytics()
    reference = ultralytics.YOLO(str(BUNDLED), task="detect")  # our own file: full load is fine
    ours = load_detector(BUNDLED, backend="torch", device="cpu")
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(ours.model.model(x)[0], reference.model.float().eval()(x)[0])
    params = DetectParams(tile=320, overlap=32, auto_diameter=False, skip_empty=False)
    df = detect_image(_image(), ours, params)
    assert len(df) > 0


def test_bundled_v6_from_xz_loads():
    detector = load_detector("v6", backend="torch", device="cpu")
    assert detector.predict([np.zeros((64, 64), np.uint8)], 0.5, 0.5, 10)[0].shape[1] == 6


@pytest.mark.parametrize(
    ("sub", "pt", "onnx_file"),
    [
        ("nuclephaser_dapi_v5", "dapi_v5.pt", "dapi_v5.onnx"),
        ("meituan_yolov6n_bbbc039", "yolov6n_bbbc039_meituan.pt", "yolov6n_bbbc039_meituan.onnx"),
    ],
)
def test_foreign_fixtures_pass_the_checks(fixtures_dir, sub, pt, onnx_file):
    folder = fixtures_dir / sub
    assert describe_model(folder / pt).startswith("YOLOv")
    assert describe_model(folder / onnx_file).startswith("exported model")
    load_detector(folder / pt, backend="torch", device="cpu")
