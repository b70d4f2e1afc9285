"""INT8 OpenVINO models: the bundled ones (integrity, backend choice, same counts as PyTorch),
what stays FP32, the check against FP32, and the per-user quantization cache (issue 23)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import DetectParams, detect_image
from napari_yolocell.models import int8_cache
from napari_yolocell.models.backends import OpenVinoDetector
from napari_yolocell.models.integrity import folder_hashes, verify_folder
from napari_yolocell.models.loading import clear_cache, load_detector, make_detector
from napari_yolocell.models.registry import list_models, resolve_model
from napari_yolocell.models.spec import ModelSpec
from napari_yolocell.training import quantize
from napari_yolocell.training.quantize import calibration_tiles, fp32_nodes

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


def test_int8_backend_needs_an_int8_model(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOCELL_CACHE_DIR", str(tmp_path))
    spec = ModelSpec(name="own", path=resolve_model("default").path)
    with pytest.raises(ValueError, match="no INT8 version.*yolocell quantize"):
        make_detector(spec, "openvino-int8", "cpu")


def test_calibration_tiles_at_several_scales():
    image = make_nuclei_image((700, 900), n_nuclei=200, seed=1).image
    tiles = calibration_tiles([image], tile=320, per_image=2, scales=(1.0, 0.5))
    assert len(tiles) == 4 and all(t.shape == (1, 3, 320, 320) for t in tiles)


def test_matches_is_one_to_one():
    a = np.array([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 0]], float)
    b = np.array([[1, 0, 11, 10, 0.9, 0], [0, 1, 10, 11, 0.7, 0], [50, 50, 60, 60, 0.5, 0]])
    assert quantize._matches(a, b) == [(0, 0)]
    assert len(quantize._matches(a, a)) == 2 and quantize._matches(a, b[:0]) == []


def _exported(tmp_path_factory):
    """FP32 OpenVINO export of the bundled v5n in a private cache."""
    from napari_yolocell.models.export_cache import cached_export

    root = tmp_path_factory.mktemp("exports")
    return cached_export(resolve_model("default"), "openvino", root=root)


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory):
    return _exported(tmp_path_factory)


def test_fp32_nodes_are_the_head_outputs_and_decoding(fp32_folder):
    import openvino as ov

    model = ov.Core().read_model(str(fp32_folder / "model.xml"))
    names = set(fp32_nodes(model))
    convs = {n for n in names if n.endswith("WithoutBiases")}
    # the last convolution of each of the 3 box and 3 class branches, and nothing earlier
    assert len(convs) == 6 and all(".2/Conv" in n for n in convs)
    kinds = {op.get_type_name() for op in model.get_ops() if op.get_friendly_name() in names}
    assert {"Add", "Subtract", "Sigmoid", "Concat", "Softmax"} <= kinds
    assert not any("/model.2/" in n or "/model.17/" in n for n in names)  # backbone, neck


def _small_nuclei_tiles(n=4, size=320):
    images = [make_nuclei_image((size, size), 60, (8.0, 14.0), seed=s).image for s in range(n)]
    return calibration_tiles(images, tile=size, per_image=1)


def test_decoding_is_not_quantized(fp32_folder, tmp_path):
    """Issue 23: quantized box coordinates (a 2.5 px grid on a 640 px tile) split small nuclei
    into two boxes with IoU < 0.5. No FakeQuantize may feed the decoding."""
    import openvino as ov

    out = quantize.quantize_openvino(fp32_folder, _small_nuclei_tiles(), tmp_path / "int8")
    model = ov.Core().read_model(str(out / "model.xml"))
    kept = set(fp32_nodes(ov.Core().read_model(str(fp32_folder / "model.xml"))))
    quantized_inputs = {
        port.get_node().get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() == "FakeQuantize"
        for port in op.output(0).get_target_inputs()
        if port.get_node().get_type_name() != "ShapeOf"  # reads the shape only
    }
    assert quantized_inputs and not quantized_inputs & kept
    meta = (out / "meta.json").read_text()
    assert '"precision": "int8"' in meta and f'"int8_recipe": {int8_cache.INT8_VERSION}' in meta


@pytest.mark.parametrize("n_tiles", [2, quantize.MIN_TILES_NO_OUTLIERS])
def test_few_or_many_calibration_tiles_give_a_model_that_agrees(fp32_folder, tmp_path, n_tiles):
    """From MIN_TILES_NO_OUTLIERS tiles on, the most extreme tiles are left out of the
    activation ranges; with two, that would leave none (a model that finds nothing)."""
    tiles = _small_nuclei_tiles(n_tiles)
    out = quantize.quantize_openvino(fp32_folder, tiles, tmp_path / "int8", fast=True)
    check = quantize.check_int8(fp32_folder, out, tiles, conf=0.2)
    assert check.count_fp32 >= 50 * n_tiles
    assert abs(check.count_change) <= 0.02 and check.f1 >= 0.98


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A copy of the bundled weights: a user's model (no INT8 shipped), private cache."""
    folder = tmp_path_factory.mktemp("user")
    pt = folder / "finetuned.pt"
    shutil.copy(resolve_model("default").path, pt)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLOCELL_CACHE_DIR", str(folder / "cache"))
        clear_cache()
        yield pt
        clear_cache()


def test_quantize_for_user_caches_checks_and_is_used(user_model, monkeypatch):
    images = [make_nuclei_image((640, 640), 120, (8.0, 30.0), seed=s).image for s in range(6)]
    messages = []
    entry = quantize.quantize_for_user(user_model, images, n_tiles=6, progress=messages.append)
    assert entry.used, entry.check
    assert entry.folder.parent.name == int8_cache.int8_dir(resolve_model(user_model)).parent.name
    assert (entry.folder.parent / "torch-v1").is_dir()  # beside the pickle-free entry
    assert abs(entry.check["count_int8"] - entry.check["count_fp32"]) <= 0.01 * max(
        1, entry.check["count_fp32"]
    )
    assert any("calibrating" in m for m in messages)
    auto = load_detector(str(user_model), device="cpu", backend="auto")
    assert isinstance(auto, OpenVinoDetector) and auto.folder == entry.folder
    # once: a second call finds the cached entry without quantizing again
    monkeypatch.setattr(quantize, "quantize_model", lambda *a, **k: pytest.fail("again"))
    assert quantize.quantize_for_user(user_model, images).folder == entry.folder


def test_failed_int8_is_not_used_and_the_user_is_told_once(user_model, recwarn):
    spec = resolve_model(user_model)
    entry = int8_cache.lookup(spec)
    if entry is None:
        pytest.skip("needs test_quantize_for_user_caches_checks_and_is_used")
    int8_cache.record(spec, {**entry.check, "passed": False, "count_change": 0.03})
    try:
        clear_cache()
        first = make_detector(spec, "auto", "cpu")
        again = make_detector(spec, "openvino-int8", "cpu")
        assert not first.folder.name.startswith("openvino-int8")
        assert not again.folder.name.startswith("openvino-int8")
        told = [w for w in recwarn if "running FP32" in str(w.message)]
        assert len(told) == 1 and "+3.0%" in str(told[0].message)
    finally:
        int8_cache.record(spec, entry.check)
        clear_cache()


def test_int8_counts_small_nuclei_like_fp32(user_model):
    """The issue's case: 160 nuclei of ~10 px on 512 x 512 (the old recipe counted 174-186)."""
    spec = resolve_model(user_model)
    if int8_cache.lookup(spec) is None:
        pytest.skip("needs test_quantize_for_user_caches_checks_and_is_used")
    int8 = make_detector(spec, "openvino-int8", "cpu")
    fp32 = make_detector(spec, "openvino", "cpu")
    for seed in (0, 1):
        syn = make_nuclei_image((512, 512), n_nuclei=160, diameter=(9.0, 12.0), seed=seed)
        counts = [len(detect_image(syn.image, d, DetectParams())) for d in (fp32, int8)]
        assert abs(counts[1] - counts[0]) <= 1, counts


def test_a_tampered_int8_entry_is_not_used(user_model):
    spec = resolve_model(user_model)
    entry = int8_cache.lookup(spec)
    if entry is None:
        pytest.skip("needs test_quantize_for_user_caches_checks_and_is_used")
    check_file = entry.folder / int8_cache.CHECK_FILE
    original = check_file.read_text()
    check_file.write_text(original.replace('"passed": true', '"passed": false'))
    try:
        assert int8_cache.lookup(spec) is None  # the signature no longer matches
        with pytest.raises(ValueError, match="no INT8 version"):
            make_detector(spec, "openvino-int8", "cpu")
    finally:
        check_file.write_text(original)
    assert int8_cache.lookup(spec) is not None


def test_cli_quantize_and_detect_first_use(user_model, tmp_path, monkeypatch):
    """``yolocell quantize MODEL --images`` and ``detect``'s first CPU use both calibrate on the
    user's images through quantize_for_user; bundled models and other backends never do."""
    from types import SimpleNamespace

    import tifffile

    from napari_yolocell import cli

    calls = []

    def fake(model, calibration, **kwargs):
        calls.append((str(model), len(calibration)))
        return int8_cache.Int8Entry(tmp_path, {"passed": True})

    monkeypatch.setattr(quantize, "quantize_for_user", fake)
    monkeypatch.setattr(int8_cache, "cpu_gains_from_int8", lambda: True)
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        syn = make_nuclei_image((300, 400), n_nuclei=40, seed=seed)
        tifffile.imwrite(images / f"field{seed}.tif", syn.image)
    assert cli.main(["quantize", str(user_model), "--images", str(images)]) == 0
    assert calls == [(str(user_model), 3)]

    other = tmp_path / "other.pt"  # another user model, never quantized
    other.write_bytes(user_model.read_bytes() + b"\0")
    paths = sorted(images.iterdir())
    args = SimpleNamespace(backend="auto", device="cpu", channel=None)
    cli._quantize_on_first_use(str(other), paths, args)
    assert calls[-1] == (str(other), 3)
    for model, backend in (("default", "auto"), (str(other), "torch"), (str(other), "openvino")):
        cli._quantize_on_first_use(
            model, paths, SimpleNamespace(**{**vars(args), "backend": backend})
        )
    assert len(calls) == 2


def test_a_failed_check_searches_a_mixed_precision_model_once(tmp_path, monkeypatch, recwarn):
    """Plain INT8 failing its check: the search runs (once), its model is checked and recorded;
    detect's first use never searches, and its FP32 warning says how to."""
    pt = tmp_path / "foreign.pt"
    shutil.copy(resolve_model("default").path, pt)
    monkeypatch.setenv("YOLOCELL_CACHE_DIR", str(tmp_path / "cache"))
    clear_cache()
    images = [make_nuclei_image((640, 640), 100, (8.0, 30.0), seed=s).image for s in range(2)]
    real_check = quantize.check_int8
    searched = []

    def failing_plain(fp32, folder, tiles, **kwargs):
        check = real_check(fp32, folder, tiles, **kwargs)
        plain = not searched
        return quantize.Int8Check(**{**vars(check), "passed": check.passed and not plain})

    def mixed(fp32, tiles, conf=0.25, cancel=None):
        searched.append(len(tiles))
        model, meta = quantize.quantize_model(fp32, tiles)
        return model, {**meta, "int8_mixed": {"fake_quantize": 170}}

    monkeypatch.setattr(quantize, "check_int8", failing_plain)
    monkeypatch.setattr(quantize, "quantize_model_mixed", mixed)
    messages = []
    # detect's first use: plain only, FP32 runs, told once with the way out
    entry = quantize.quantize_for_user(pt, images, n_tiles=4, search=False)
    assert not entry.used and not searched and not int8_cache.searched(entry)
    clear_cache()
    make_detector(resolve_model(pt), "auto", "cpu")
    told = [str(w.message) for w in recwarn if "running FP32" in str(w.message)]
    assert len(told) == 1 and f"yolocell quantize {pt}" in told[0]
    # `yolocell quantize`: the failed entry is searched now, checked, recorded, used
    entry = quantize.quantize_for_user(pt, images, n_tiles=4, progress=messages.append)
    assert len(searched) == 1 and entry.used and int8_cache.searched(entry)
    assert entry.check["recipe"] == "mixed" and entry.check["fp32_quantization_points"] > 0
    assert any("searching which operations to keep in FP32" in m for m in messages)
    # once: a searched entry is final
    assert quantize.quantize_for_user(pt, images, n_tiles=4).folder == entry.folder
    assert len(searched) == 1
    clear_cache()


def test_mixed_search_keeps_everything_int8_when_nothing_disagrees(fp32_folder, tmp_path):
    """The real search through NNCF: on a model whose INT8 already agrees with FP32 it returns
    at once, every quantization point kept, and the result passes the check."""
    images = [make_nuclei_image((640, 640), 100, (14.0, 30.0), seed=s).image for s in range(3)]
    tiles = quantize._as_tiles(images, 3)
    plain, _ = quantize.quantize_model(fp32_folder, tiles)
    mixed, meta = quantize.quantize_model_mixed(fp32_folder, tiles, conf=0.25)
    assert meta["int8_mixed"]["fake_quantize"] == quantize._fake_quantize_count(plain) > 0
    out = tmp_path / "mixed"
    out.mkdir()
    quantize._write_ir(mixed, meta, out)
    assert quantize.check_int8(fp32_folder, out, tiles).passed
