"""A checkpoint is read once (as data), then loaded from its pickle-free cached form (#14, #21).

Each family (ultralytics, classic YOLOv5, meituan YOLOv6) must give the same boxes from its
cached form as from the first load, without the ``.pt`` being unpickled again; a damaged
entry must be rebuilt, never used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_yolocell.engine.detect import DetectParams, detect_image
from napari_yolocell.models import loading, pickle_data, safety, torch_cache
from napari_yolocell.models.backends import OnnxRuntimeDetector
from napari_yolocell.models.export_cache import weights_sha256
from napari_yolocell.models.registry import resolve_model
from napari_yolocell.models.spec import ModelSpec
from napari_yolocell.models.user_cache import sign_folder

BUNDLED = Path(loading.__file__).parent / "weights" / "nucleus_v5n.pt"
CLASSIC = ("nuclephaser_dapi_v5", "dapi_v5.pt")
MEITUAN = ("meituan_yolov6n_bbbc039", "yolov6n_bbbc039_meituan.pt")


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOCELL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("YOLOCELL_CACHE_DIR", str(tmp_path / "cache"))
    loading.clear_cache()
    yield
    loading.clear_cache()


def _refuse_pickle(monkeypatch) -> None:
    """Make every way of reading a checkpoint's pickle fail."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint's pickle was read again")

    for name in ("read_model_file", "check_file", "checkpoint_globals"):
        monkeypatch.setattr(safety, name, refuse)
    monkeypatch.setattr(pickle_data, "parse_pickle", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch_cache, "load_network", refuse)
    monkeypatch.setattr(torch_cache, "network_from_checkpoint", refuse)


def _image(folder: Path | None) -> np.ndarray:
    if folder is None:
        from napari_yolocell.data.synthetic import make_nuclei_image

        return make_nuclei_image(shape=(480, 560), seed=3).image
    import cv2

    return cv2.imread(str(sorted((folder / "images").glob("*.png"))[0]), cv2.IMREAD_GRAYSCALE)


def _boxes(path: Path, image: np.ndarray, backend: str = "torch") -> np.ndarray:
    detector = loading.load_detector(path, device="cpu", backend=backend)
    params = DetectParams(tile=416, overlap=48, auto_diameter=False, skip_empty=False)
    df = detect_image(image, detector, params)
    return df[["x0", "y0", "x1", "y1", "confidence"]].to_numpy(float)


def _checkpoint(request, tmp_path: Path, family: str) -> tuple[Path, Path | None]:
    if family == "ultralytics":  # a copy of a bundled checkpoint is not bundled
        path = tmp_path / "my_nuclei.pt"
        shutil.copy(BUNDLED, path)
        return path, None
    sub, name = CLASSIC if family == "yolov5-classic" else MEITUAN
    folder = request.getfixturevalue("fixtures_dir") / sub
    return folder / name, folder


@pytest.mark.parametrize("family", ["ultralytics", "yolov5-classic", "yolov6-meituan"])
def test_cached_form_gives_the_same_boxes_without_unpickling(
    request, tmp_path, monkeypatch, family
):
    path, folder = _checkpoint(request, tmp_path, family)
    image = _image(folder)
    first = _boxes(path, image)
    assert len(first) > 5
    entry = torch_cache.cache_dir(weights_sha256(path))
    body = json.loads((entry / torch_cache.MODEL_FILE).read_text())
    assert body["family"] == family and (entry / torch_cache.WEIGHTS_FILE).is_file()
    assert not list(entry.parent.glob(".*tmp*")), "no temporary folder left behind"

    loading.clear_cache()
    with monkeypatch.context() as mp:
        _refuse_pickle(mp)
        again = _boxes(path, image)
    assert again.shape == first.shape
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-3)


def test_checkpoint_settings_survive_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "my_nuclei.pt"
    shutil.copy(BUNDLED, path)
    first = loading.load_detector(path, device="cpu", backend="torch")
    loading.clear_cache()
    with monkeypatch.context() as mp:
        _refuse_pickle(mp)
        again = loading.load_detector(path, device="cpu", backend="torch")
    assert again.model.ckpt["yolocell"] == first.model.ckpt["yolocell"]
    assert again.spec == first.spec and again.model.names == first.model.names


@pytest.mark.parametrize("damage", ["truncated-weights", "bad-json", "edited-json"])
def test_damaged_entry_is_rebuilt(tmp_path, damage):
    path = tmp_path / "my_nuclei.pt"
    shutil.copy(BUNDLED, path)
    torch_cache.load_network_cached(path)
    entry = torch_cache.cache_dir(weights_sha256(path))
    weights, meta = entry / torch_cache.WEIGHTS_FILE, entry / torch_cache.MODEL_FILE
    if damage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "bad-json":
        meta.write_text(meta.read_text()[:-20])
    else:  # valid JSON, changed architecture: its own hash no longer matches
        body = json.loads(meta.read_text())
        body["architecture"]["yaml"]["nc"] = 80
        meta.write_text(json.dumps(body))
    with pytest.warns(RuntimeWarning, match="damaged cached form"):
        model = torch_cache.load_network_cached(path)
    assert model.model.names == {0: "nucleus"}
    torch_cache.rebuild(entry, path, weights_sha256(path))  # rebuilt entry is whole again


def test_export_is_built_from_the_cached_form(tmp_path, monkeypatch):
    path = tmp_path / "my_nuclei.pt"
    shutil.copy(BUNDLED, path)
    torch_cache.load_network_cached(path)
    with monkeypatch.context() as mp:
        _refuse_pickle(mp)
        detector = loading.make_detector(ModelSpec(name="mine", path=path), "onnxruntime", "cpu")
    assert isinstance(detector, OnnxRuntimeDetector)


def test_bundled_models_load_as_before(monkeypatch):
    spec = resolve_model("v5")

    def refuse(*args, **kwargs):
        raise AssertionError("bundled weights went through the pickle-free cache")

    monkeypatch.setattr(torch_cache, "load_network_cached", refuse)
    loading.load_detector(spec, device="cpu", backend="torch")
    assert not list(torch_cache.cache_root().glob("*/torch-v*"))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("activation", "__import__('os').system('touch HACKED')"),
        ("module", "torch_safe_load"),
    ],
)
def test_hostile_architecture_is_never_built(tmp_path, monkeypatch, key, value):
    """A model YAML is checkpoint data: ultralytics evals ``activation`` and looks layer names
    up among its functions, so a (re-hashed) entry naming anything else is refused."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "my_nuclei.pt"
    shutil.copy(BUNDLED, path)
    torch_cache.load_network_cached(path)
    entry = torch_cache.cache_dir(weights_sha256(path))
    meta = entry / torch_cache.MODEL_FILE
    body = json.loads(meta.read_text())
    yaml = body["architecture"]["yaml"]
    if key == "activation":
        yaml["activation"] = value
    else:
        yaml["head"][-1][2] = value
    torch_cache._write_json(meta, body)  # a valid hash and signature: only the schema stops it
    sign_folder(entry, f"torch-v{torch_cache.CACHE_VERSION}:{weights_sha256(path)}")
    with pytest.raises(torch_cache.CacheEntryError, match="not allowed"):
        torch_cache.rebuild(entry, path, weights_sha256(path))
    assert not (tmp_path / "HACKED").exists()
