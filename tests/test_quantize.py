"""The bundled INT8 OpenVINO models: integrity, backend choice, same counts as PyTorch."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import DetectParams, detect_image
from napari_yolocell.models.backends import OpenVinoDetector
from napari_yolocell.models.integrity import folder_hashes, verify_folder
from napari_yolocell.models.loading import make_detector
from napari_yolocell.models.registry import list_models, resolve_model
from napari_yolocell.models.spec import ModelSpec
from napari_yolocell.training.quantize import calibration_tiles

pytest.importorskip("openvino")
BUNDLED_INT8 = [m for m in list_models() if m.int8]


def test_calibration_tiles_are_normalised_nchw():
    images = [np.full((300, 500), 4000, np.uint16), np.zeros((900, 900, 3), np.uint8)]
    images[0][100:120, 100:120] = 60000
    tiles = calibration_tiles(images, tile=256, per_image=2)
    assert len(tiles) == 4
    for t in tiles:
        assert t.shape == (1, 3, 256, 256) and t.dtype == np.float32
        assert 0.0 <= t.min() and t.max() <= 1.0


@pytest.mark.skipif(not BUNDLED_INT8, reason="no bundled INT8 model")
def test_bundled_int8_files_are_verified(tmp_path):
    spec = BUNDLED_INT8[0]
    verify_folder(spec.int8["dir"], spec.int8["sha256"])
    copy = tmp_path / "copy"
    shutil.copytree(spec.int8["dir"], copy)
    assert folder_hashes(copy) == spec.int8["sha256"]
    data = bytearray((copy / "model.bin").read_bytes())
    data[1000] ^= 0xFF
    (copy / "model.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 mismatch.*model.bin"):
        verify_folder(copy, spec.int8["sha256"])
    broken = ModelSpec(
        name="broken", path=spec.path, int8={"dir": str(copy), "sha256": spec.int8["sha256"]}
    )
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        make_detector(broken, "openvino-int8", "cpu")


@pytest.mark.skipif(not BUNDLED_INT8, reason="no bundled INT8 model")
def test_auto_uses_int8_on_cpu_and_counts_like_pytorch():
    spec = resolve_model(BUNDLED_INT8[0].name)
    auto = make_detector(spec, "auto", "cpu")
    assert isinstance(auto, OpenVinoDetector) and auto.folder.name.endswith("-int8")
    assert isinstance(make_detector(spec, "openvino", "cpu"), OpenVinoDetector)
    syn = make_nuclei_image((1024, 1280), n_nuclei=300, diameter=(14.0, 28.0), seed=11)
    torch_count = len(detect_image(syn.image, make_detector(spec, "torch", "cpu"), DetectParams()))
    int8_count = len(detect_image(syn.image, auto, DetectParams()))
    assert abs(torch_count - syn.count) <= 0.03 * syn.count
    # 8-bit answers: within 0.13 % of PyTorch on BBBC039 test (bench_accuracy); these smooth
    # synthetic blobs, unlike the calibration fields, come out ~1 % higher
    assert abs(int8_count - torch_count) <= 0.02 * torch_count


def test_int8_backend_needs_an_int8_model():
    spec = ModelSpec(name="own", path=resolve_model("default").path)
    with pytest.raises(ValueError, match="no INT8 version"):
        make_detector(spec, "openvino-int8", "cpu")
