"""Tests of the model registry, integrity check and backends (kept cheap: nano models, 64 px)."""

import json

import numpy as np
import pytest

from napari_yolocell.engine.detect import COLUMNS, DetectParams, detect_image
from napari_yolocell.models import loading
from napari_yolocell.models import registry as registry_module
from napari_yolocell.models.backends import TorchDetector
from napari_yolocell.models.classical import ClassicalDetector
from napari_yolocell.models.integrity import file_sha256, verify_sha256
from napari_yolocell.models.loading import load_detector
from napari_yolocell.models.registry import list_models, resolve_model
from napari_yolocell.models.spec import ModelSpec, sidecar_path, write_sidecar


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A temporary registry with one bundled model whose weights file is `fake.pt`."""
    weights = tmp_path / "fake.pt"
    weights.write_bytes(b"not really weights")
    entry = {
        "name": "nuclei-v5",
        "family": "yolov5",
        "file": "fake.pt",
        "sha256": "0" * 64,
        "default": True,
        "aliases": ["v5"],
        "diameter_px": 18,
    }
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"models": [entry]}))
    monkeypatch.setattr(registry_module, "REGISTRY_FILE", path)
    return weights


def test_classical_is_always_available():
    assert "classical" in [m.name for m in list_models()]
    assert isinstance(load_detector("classical"), ClassicalDetector)


def test_registry_names_and_aliases(registry):
    for name in ("nuclei-v5", "v5", "V5", "default"):
        spec = resolve_model(name)
        assert spec.path == registry and spec.diameter_px == 18 and spec.family == "yolov5"


def test_sha_mismatch_is_refused(registry):
    with pytest.raises(ValueError, match="SHA-256 mismatch.*fake.pt"):
        load_detector("v5")
    verify_sha256(registry, file_sha256(registry))  # the right hash passes


def test_missing_weights_name_the_file(tmp_path, registry):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_detector(tmp_path / "nothere.pt")
    registry.unlink()
    with pytest.raises(FileNotFoundError, match="fake.pt"):
        load_detector("default")


def test_corrupt_weights_name_the_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="broken.pt"):
        load_detector(bad, device="cpu")


def test_unknown_name(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("no-such-model")
    monkeypatch.setattr(registry_module, "REGISTRY_FILE", tmp_path / "none.json")
    with pytest.raises(ValueError, match="no bundled model"):
        resolve_model("default")


def test_sidecar_settings_are_read(tmp_path):
    weights = tmp_path / "best.pt"
    weights.write_bytes(b"x")
    spec = ModelSpec(
        name="mine",
        family="yolov6",
        normalize="none",
        diameter_px=31.0,
        default_conf=0.4,
        percentiles=(2.0, 99.0),
    )
    assert write_sidecar(weights, spec) == sidecar_path(weights) == tmp_path / "best.yolocell.json"
    got = resolve_model(weights)
    assert (got.family, got.normalize, got.diameter_px, got.default_conf, got.percentiles) == (
        "yolov6",
        "none",
        31.0,
        0.4,
        (2.0, 99.0),
    )
    assert got.path == weights
    plain = tmp_path / "other.pt"
    plain.write_bytes(b"x")
    assert resolve_model(plain).normalize == "percentile"


@pytest.mark.parametrize("arch", ["yolov5n.yaml", "yolov6n.yaml"])
def test_untrained_architectures_run(arch):
    detector = load_detector(arch, device="cpu", backend="torch")
    assert isinstance(detector, TorchDetector) and detector.spec.family == arch[:6]
    assert load_detector(arch, device="cpu", backend="torch") is detector  # cached
    tiles = [np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 128, np.uint8)]
    out = detector.predict(tiles, conf=0.001, iou=0.5, max_det=20)
    assert len(out) == 2
    for boxes in out:
        assert boxes.ndim == 2 and boxes.shape[1] == 6 and len(boxes) <= 20
        assert (boxes[:, [0, 2]] <= 64).all() and (boxes[:, :4] >= 0).all()


def test_torch_detector_end_to_end_on_small_image():
    image = np.random.default_rng(0).integers(0, 4000, (70, 90), dtype=np.uint16)
    df = detect_image(
        image,
        load_detector("yolov5n.yaml", device="cpu", backend="torch"),
        DetectParams(conf=0.001, max_det=10),
    )
    assert list(df.columns) == COLUMNS
    assert (df["x1"] <= 90).all() and (df["y1"] <= 70).all()


@pytest.fixture
def packed_registry(tmp_path, monkeypatch):
    """The bundled v5n weights shipped xz-compressed, as large bundled models are."""
    import lzma

    source = resolve_model("nucleus-v5n").path
    packed = tmp_path / "pkg" / "nucleus_v5n.pt.xz"
    packed.parent.mkdir()
    packed.write_bytes(lzma.compress(source.read_bytes()))
    entry = {
        "name": "packed-v5n",
        "family": "yolov5",
        "file": packed.name,
        "sha256": file_sha256(packed),
        "unpacked_sha256": file_sha256(source),
        "diameter_px": 23,
        "default": True,
    }
    (packed.parent / "registry.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setattr(registry_module, "REGISTRY_FILE", packed.parent / "registry.json")
    monkeypatch.setenv("YOLOCELL_CACHE_DIR", str(tmp_path / "cache"))
    loading.clear_cache()
    yield source, packed
    loading.clear_cache()


def test_packed_weights_unpack_to_the_cache_and_match_the_original(packed_registry):
    source, packed = packed_registry
    detector = load_detector("packed-v5n", device="cpu", backend="torch")
    unpacked = detector.spec.path
    # a signed entry folder of the cache: <cache>/unpacked-weights/<name>-<hash>/<name>-<hash>.pt
    assert unpacked.suffix == ".pt" and unpacked.parents[2] == packed.parent.parent / "cache"
    assert file_sha256(unpacked) == file_sha256(source)
    tile = [np.asarray(np.random.default_rng(1).integers(0, 255, (96, 96, 3)), np.uint8)]
    reference = load_detector(source, device="cpu", backend="torch").predict(
        tile, conf=0.01, iou=0.5, max_det=50
    )
    np.testing.assert_array_equal(
        detector.predict(tile, conf=0.01, iou=0.5, max_det=50)[0], reference[0]
    )

    # A damaged cache file is replaced, not loaded.
    loading.clear_cache()
    unpacked.write_bytes(b"damaged")
    assert file_sha256(
        load_detector("packed-v5n", device="cpu", backend="torch").spec.path
    ) == file_sha256(source)


def test_packed_weights_with_wrong_hash_are_refused(packed_registry):
    _, packed = packed_registry
    data = bytearray(packed.read_bytes())
    data[-100] ^= 0xFF
    packed.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 mismatch.*nucleus_v5n.pt.xz"):
        load_detector("packed-v5n", device="cpu", backend="torch")
