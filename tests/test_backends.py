"""ONNX Runtime / OpenVINO backends give PyTorch's answers; the export cache is reused.

An untrained network predicts near-constant scores, so tiny float differences reorder its ties
and no comparison of boxes is meaningful. The test network is a seeded yolov5n with He-normal
weights and a sharpened class head: its scores spread over (0, 1) like a trained model's, so
boxes above a threshold are well separated and must match one for one. A real checkpoint is
also compared when one is available (``YOLOCELL_TEST_WEIGHTS``, or the project's training run).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime  # noqa: F401  (the backends under test)
import openvino  # noqa: F401  (the backends under test)
import pytest

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import DetectParams, detect_image
from napari_yolocell.engine.normalize import percentile_range, to_uint8
from napari_yolocell.models import export_cache, loading
from napari_yolocell.models.backends import OnnxRuntimeDetector, OpenVinoDetector, TorchDetector
from napari_yolocell.models.detector import dense_nms, preprocess
from napari_yolocell.models.loading import (
    clear_cache,
    load_detector,
    make_detector,
    resolve_backend,
)
from napari_yolocell.models.spec import ModelSpec

EXPORTED = ("onnxruntime", "openvino")


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Exports go to a temp cache, set before any module fixture builds a detector."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLOCELL_CACHE_DIR", str(tmp_path_factory.mktemp("exports")))
        yield


def _spread_net():
    """Seeded yolov5n (1 class) whose scores spread like a trained model's."""
    import torch

    from napari_yolocell.models.ultralytics_env import import_ultralytics

    import_ultralytics()
    from ultralytics.nn.modules.head import Detect
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    net = DetectionModel("yolov5n.yaml", nc=1, verbose=False)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.bias.normal_(0, 0.1)
        head = next(m for m in net.modules() if isinstance(m, Detect))
        for branch in head.cv3:  # class logits: wide spread, mostly negative
            branch[-1].weight.mul_(30)
            branch[-1].bias.fill_(-3.0)
    return net


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The spread model saved as an ultralytics checkpoint, with yolocell settings inside."""
    import torch

    path = tmp_path_factory.mktemp("weights") / "spread.pt"
    settings = {"name": "spread", "diameter_px": 17.0, "default_conf": 0.4}
    torch.save({"model": _spread_net(), "yolocell": settings}, path)
    return path


@pytest.fixture(scope="module")
def tiles() -> list[np.ndarray]:
    """Synthetic nuclei tiles of several sizes, plus realistic noise-and-blob tiles."""
    syn = make_nuclei_image(shape=(700, 700), seed=3)
    lo, hi = percentile_range(syn.image)
    grey = to_uint8(syn.image, lo, hi)
    rng = np.random.default_rng(1)
    blobs = make_nuclei_image(shape=(256, 320), seed=4, noise=200.0).image
    blobs = to_uint8(blobs, *percentile_range(blobs))
    noise = np.clip(rng.normal(40, 12, (200, 256)), 0, 255).astype(np.uint8)
    cuts = [grey[:480, :480], grey[500:, 100:], blobs, noise]
    return [np.repeat(c[:, :, None], 3, axis=2) for c in cuts]


def _match(ref: np.ndarray, other: np.ndarray) -> float:
    """Fraction of ``ref`` boxes with an ``other`` box of IoU > 0.99 (greedy, one to one).

    Boxes flattened to zero area by clipping at the tile border match when their corners agree
    within 0.05 px.
    """
    if len(ref) == 0:
        return 1.0
    used, hits = set(), 0
    for box in ref:
        x0 = np.maximum(box[0], other[:, 0])
        y0 = np.maximum(box[1], other[:, 1])
        x1 = np.minimum(box[2], other[:, 2])
        y1 = np.minimum(box[3], other[:, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        union = (
            (box[2] - box[0]) * (box[3] - box[1])
            + (other[:, 2] - other[:, 0]) * (other[:, 3] - other[:, 1])
            - inter
        )
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0)
        iou[np.abs(other[:, :4] - box[:4]).max(axis=1) < 0.05] = 1.0
        iou[list(used)] = 0
        best = int(np.argmax(iou)) if len(iou) else -1
        if best >= 0 and iou[best] > 0.99:
            used.add(best)
            hits += 1
    return hits / len(ref)


def _assert_same_boxes(ref: list[np.ndarray], got: list[np.ndarray]) -> None:
    n_ref, n_got = sum(map(len, ref)), sum(map(len, got))
    assert n_ref > 20, "comparison needs boxes"
    assert abs(n_got - n_ref) <= 0.005 * n_ref, (n_ref, n_got)
    for a, b in zip(ref, got, strict=True):
        assert _match(a, b) >= 0.995
        assert _match(b, a) >= 0.995


@pytest.fixture(scope="module")
def detectors(weights):
    spec = ModelSpec(name="spread", path=weights)
    return {name: make_detector(spec, name, "cpu") for name in ("torch", *EXPORTED)}


def test_raw_outputs_match_pytorch(detectors, tiles):
    for group in (tiles[:2], tiles[2:]):  # two pad sizes, two batch sizes
        batch = preprocess(group)
        ref = detectors["torch"].forward(batch)
        for name in EXPORTED:
            out = detectors[name].forward(batch)
            assert out.shape == ref.shape
            # boxes in pixels of a <= 640 px input; scores in [0, 1]
            assert np.abs(out[:, :4] - ref[:, :4]).max() < 1e-2, name
            assert np.abs(out[:, 4:] - ref[:, 4:]).max() < 1e-4, name


def test_boxes_match_pytorch(detectors, tiles):
    scores = detectors["torch"].forward(preprocess(tiles[:1]))[:, 4:].max(axis=1)
    for top in (100, 400):  # thresholds keeping about this many candidates per tile
        conf = float(np.quantile(scores, 1 - top / scores.size))
        ref = detectors["torch"].predict(tiles, conf, 0.5, 1000)
        for name in EXPORTED:
            got = detectors[name].predict(tiles, conf, 0.5, 1000)
            assert [g.shape[1] for g in got] == [6] * len(tiles)
            _assert_same_boxes(ref, got)
    assert detectors["openvino"].predict([], 0.3, 0.5, 10) == []


def test_grey_tiles_give_the_same_boxes_as_grey_x3(detectors, tiles):
    """The engine passes (H, W) grey tiles; OpenVINO takes them as uint8 into a model that
    scales and expands them itself (grey_input_model), the others expand them in NumPy."""
    grey = [t[:, :, 0] for t in tiles]
    assert np.array_equal(preprocess(grey), preprocess(tiles))
    scores = detectors["torch"].forward(preprocess(tiles[:1]))[:, 4:].max(axis=1)
    conf = float(np.quantile(scores, 1 - 200 / scores.size))
    for name, det in detectors.items():
        ref = det.predict(tiles, conf, 0.5, 1000)
        got = det.predict(grey, conf, 0.5, 1000)
        _assert_same_boxes(ref, got)
        if name == "openvino":  # really the uint8 model, compiled for the (N, H, W) shape
            assert any(len(shape) == 3 for shape in det._compiled), name


@pytest.mark.parametrize("n", [0, 1, 300, 2500])
def test_numpy_nms_matches_torchvision(n):
    import torch
    import torchvision

    rng = np.random.default_rng(n)
    xy = rng.uniform(0, 600, (n, 2)).astype(np.float32)
    wh = rng.uniform(0, 40, (n, 2)).astype(np.float32)  # crowded; some boxes of zero width
    wh[: n // 20, 0] = 0
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.choice(np.linspace(0.2, 1, 50), n).astype(np.float32)  # ties
    for iou in (0.3, 0.5, 0.7):
        ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
        got = dense_nms(boxes, scores, iou)
        assert set(got.tolist()) == set(ref.tolist()), (n, iou)
        assert np.all(np.diff(scores[got]) <= 0)  # best first


def test_same_count_on_a_synthetic_image(detectors):
    syn = make_nuclei_image(shape=(600, 800), seed=5)
    params = DetectParams(tile=320, overlap=48, conf=0.95, batch=3)
    counts = {n: len(detect_image(syn.image, d, params)) for n, d in detectors.items()}
    assert counts["torch"] > 20
    for name in EXPORTED:
        assert abs(counts[name] - counts["torch"]) <= max(1, 0.005 * counts["torch"]), counts


def test_export_cache_is_reused_without_loading_weights(weights, detectors, monkeypatch):
    spec = ModelSpec(name="spread", path=weights)
    folders = {n: detectors[n].folder for n in EXPORTED}
    root = export_cache.cache_root()
    key = export_cache.weights_sha256(weights)
    for fmt in ("onnx", "openvino"):
        folder = export_cache.export_dir(key, fmt)
        assert folder.parent.parent == root and export_cache.model_file(folder, fmt).is_file()
        assert export_cache.read_meta(folder)["yolocell"]["diameter_px"] == 17.0
    assert not list(root.glob("*/.*tmp*")), "no temporary export left behind"

    def refuse(path):
        raise AssertionError("weights loaded although the export is cached")

    monkeypatch.setattr(loading, "load_network", refuse)
    monkeypatch.setattr(export_cache, "load_network", refuse)
    for name in EXPORTED:
        again = make_detector(spec, name, "cpu")
        assert again.folder == folders[name]


def test_checkpoint_settings_reach_the_spec(weights):
    clear_cache()
    for name in EXPORTED:
        detector = load_detector(weights, device="cpu", backend=name)
        assert isinstance(detector, (OnnxRuntimeDetector, OpenVinoDetector))
        assert detector.spec.diameter_px == 17.0 and detector.spec.default_conf == 0.4
    clear_cache()


def test_auto_backend_choice(monkeypatch):
    assert resolve_backend("auto", "cpu") == "openvino"
    assert resolve_backend("auto", "cuda:0") == "torch"
    monkeypatch.setattr(loading, "_AUTO_CPU_ORDER", ("onnxruntime",))
    assert resolve_backend("auto", "cpu") == "onnxruntime"
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("tensorrt")
    classical = load_detector("classical", backend="openvino")
    assert type(classical).__name__ == "ClassicalDetector"


def test_auto_falls_back_to_torch_when_export_fails(weights, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(export_cache, "cached_export", broken)
    spec = ModelSpec(name="spread", path=weights)
    with pytest.warns(RuntimeWarning, match="exporter exploded"):
        assert isinstance(make_detector(spec, "auto", "cpu"), TorchDetector)
    with pytest.raises(RuntimeError, match="exporter exploded"):
        make_detector(spec, "onnxruntime", "cpu")


def test_corrupt_weights_still_name_the_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="broken.pt"):
        make_detector(ModelSpec(name="b", path=bad), "onnxruntime", "cpu")


def test_untrained_architecture_exports_to_a_temp_folder():
    spec = ModelSpec(name="yolov5n.yaml", family="yolov5", path=Path("yolov5n.yaml"))
    detector = make_detector(spec, "onnxruntime", "cpu")
    folder = detector.folder
    assert folder.is_dir() and export_cache.cache_root() not in folder.parents
    out = detector.predict([np.zeros((100, 120, 3), np.uint8)], 0.001, 0.5, 10)
    assert out[0].shape[1] == 6 and len(out[0]) <= 10
    del detector
    import gc

    gc.collect()
    assert not folder.exists()


def test_bundled_model_same_answers_on_bbbc039(tiles, shared_data):
    """Every backend counts the real test images like PyTorch (within 0.5 %)."""
    import tifffile

    from napari_yolocell.data.public import bbbc039_items
    from napari_yolocell.engine.detect import DetectParams, detect_image
    from napari_yolocell.models.registry import resolve_model

    spec = resolve_model("default")
    dets = {name: make_detector(spec, name, "cpu") for name in ("torch", *EXPORTED)}
    batch = preprocess(tiles[:2])
    ref = dets["torch"].forward(batch)
    for name in EXPORTED:
        out = dets[name].forward(batch)
        assert np.abs(out[:, :4] - ref[:, :4]).max() < 1e-2
        assert np.abs(out[:, 4:] - ref[:, 4:]).max() < 1e-4
    if spec.int8:  # the bundled 8-bit model: same counts, not the same raw outputs
        dets["openvino-int8"] = make_detector(spec, "openvino-int8", "cpu")
    items = bbbc039_items(shared_data / "bbbc039", "test")[:8]
    counts = {name: 0 for name in dets}
    for path, _, _ in items:
        image = tifffile.imread(path)
        for name, det in dets.items():
            counts[name] += len(detect_image(image, det, DetectParams()))
    assert counts["torch"] > 100
    for name in EXPORTED:  # FP32 runtimes: 0.5 %, at least one nucleus on these ~580
        assert abs(counts[name] - counts["torch"]) <= max(1, 0.005 * counts["torch"]), counts
    if "openvino-int8" in counts:  # 8-bit: 586 vs 582 on these 8 images (one image: 41 vs 38);
        # on all 50 test images bench_accuracy measures 5501 vs 5487 (+0.26 %), F1 0.961 vs 0.964
        assert abs(counts["openvino-int8"] - counts["torch"]) <= 0.02 * counts["torch"], counts


def test_spec_is_not_mutated_by_backends(weights):
    spec = ModelSpec(name="spread", path=weights)
    before = dataclasses.asdict(spec)
    make_detector(spec, "openvino", "cpu")
    assert dataclasses.asdict(spec) == before
