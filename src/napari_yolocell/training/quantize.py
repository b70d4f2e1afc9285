"""INT8 OpenVINO models: post-training quantization, its check against FP32, the user cache.

An 8-bit OpenVINO model runs the forward pass 1.5-3x faster than FP32 on a CPU (ms per tile in
``docs/benchmarks.md``). The bundled models ship one; every other model the user runs (a
fine-tune, a classic YOLOv5 or meituan YOLOv6 checkpoint) is quantized once, on the user's own
images, by :func:`quantize_for_user` and cached beside its pickle-free entry
(:func:`napari_yolocell.models.int8_cache.int8_dir`).

What stays in floating point (:func:`fp32_nodes`): the last convolution of each output branch
of the detection head and everything after them (DFL, box decoding, sigmoid, concatenation).
The decoding works in input pixels: quantized to 8 bits over a 640 px tile, box centres snapped
to a 2.5 px grid, so two anchors on one small nucleus gave boxes ~3 px apart with IoU < 0.5,
both kept by NMS (the INT8 over-count on small nuclei, issue 23).

A quantized model is used only if it passes :func:`check_int8` against its FP32 export on the
calibration tiles (count within 1 %, F1 against FP32's boxes >= 0.995); otherwise FP32 runs.
Some models fail it through a few operations elsewhere in the network (a classic YOLOv5's neck,
for one). When asked to (``yolocell quantize``, the fine-tune's end), :func:`quantize_for_user`
then searches which operations to keep in FP32 (:func:`quantize_model_mixed`, NNCF's accuracy
control, judged by the same agreement with FP32's boxes) and checks the result again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_yolocell.engine.detect import Cancel, Cancelled, is_cancelled
from napari_yolocell.engine.normalize import percentile_range, to_uint8
from napari_yolocell.models import int8_cache

__all__ = [
    "Int8Check",
    "calibration_tiles",
    "check_int8",
    "fp32_nodes",
    "quantize_after_finetune",
    "quantize_for_user",
    "quantize_on_first_use",
    "quantize_model_mixed",
    "quantize_openvino",
    "read_calibration_images",
    "wants_int8",
]

_log = logging.getLogger(__name__)

#: A quantized model is refused when its count on the calibration tiles differs from FP32's
#: by more than this fraction ...
MAX_COUNT_CHANGE = 0.01
#: ... or its boxes agree with FP32's (F1 at IoU 0.5) less than this.
MIN_F1_AGREEMENT = 0.995
#: A box counts as found by the other model when that one scores it at most this much below
#: the confidence threshold: a score crossing the threshold by a hair is the count check's
#: business (both ways, it cancels), not a different answer.
SCORE_MARGIN = 0.05
#: Calibration tiles: enough for stable activation ranges (NNCF's own default is 300).
DEFAULT_TILES = 64
#: From this many calibration tiles on, the most extreme ones are left out of the activation
#: ranges (:func:`_advanced`): one tile at each end is then at most 2 % of them. From the 11
#: tiles of three user images (a tenth at each end) a meituan YOLOv6n failed its check even
#: after a long search, where NNCF's default passed (docs/benchmarks.md).
MIN_TILES_NO_OUTLIERS = 50
#: The mixed-precision search returns at most this many groups of operations to FP32: each
#: costs a little speed, and every step that does not help makes NNCF rank all groups again
#: (it compiles the model once per group), which bounds its minutes.
MAX_FP32_OPS = 8
#: Tiles the search ranks the operations on (it judges each step on every calibration tile,
#: as the check does, so a search that reaches its target passes the check).
RANKING_TILES = 8


def calibration_tiles(
    images: Iterable[np.ndarray],
    tile: int = 640,
    per_image: int = 2,
    seed: int = 0,
    scales: Sequence[float] = (1.0,),
) -> list[np.ndarray]:
    """NCHW float32 tiles in [0, 1], normalised the way detection normalises images.

    Each 2-D image is percentile-normalised (1-99.8) to 8 bit; ``per_image`` random windows of
    ``tile`` px (zero-padded when the image is smaller) become (1, 3, tile, tile) inputs, at
    each of ``scales`` (e.g. ``(1.0, 0.5)``: nuclei also at half their size, as in a pyramid's
    level 1 or a 10x objective).
    """

    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        grey = np.asarray(image)
        if grey.ndim == 3:
            grey = grey[..., :3].max(axis=-1)
        lo, hi = percentile_range(grey, 1.0, 99.8)
        u8 = to_uint8(grey, lo, hi)
        for scale in scales:
            scaled = _rescale(u8, scale, tile)
            for _ in range(per_image):
                out.append(_random_window(scaled, tile, rng))
    return out


def _rescale(u8: np.ndarray, scale: float, tile: int) -> np.ndarray:
    """``u8`` resized by ``scale``; a shrunk image is mirrored out to a whole tile, so its
    windows are as crowded as a real image at that magnification (not mostly padding)."""
    if scale == 1.0:
        return u8
    from skimage.transform import rescale

    out = rescale(u8, scale, anti_aliasing=scale < 1, preserve_range=True)
    out = (out + 0.5).astype(np.uint8)
    pad = [(0, max(0, tile - n)) for n in out.shape]
    return np.pad(out, pad, mode="symmetric") if any(p[1] for p in pad) else out


def _random_window(u8: np.ndarray, tile: int, rng: np.random.Generator) -> np.ndarray:
    y = int(rng.integers(0, max(1, u8.shape[0] - tile + 1)))
    x = int(rng.integers(0, max(1, u8.shape[1] - tile + 1)))
    win = np.zeros((tile, tile), np.uint8)
    crop = u8[y : y + tile, x : x + tile]
    win[: crop.shape[0], : crop.shape[1]] = crop
    return np.repeat(win[None, None], 3, axis=1).astype(np.float32) / 255


def _is_dfl(conv) -> bool:
    """Whether a Convolution is the DFL's fixed ``0, 1, ..., 15`` expectation (not learned)."""
    weights = conv.input(1).get_source_output().get_node()
    if weights.get_type_name() != "Constant":
        return False
    values = np.asarray(weights.get_data(), np.float32).ravel()
    return weights.get_output_shape(0)[0] == 1 and np.array_equal(values, np.arange(values.size))


def fp32_nodes(model, convs: int = 1) -> list[str]:
    """Names of the nodes kept in floating point: the head's last convolutions and after.

    Walks back from the outputs through every node until it has passed ``convs`` learned
    convolutions on a path (those are kept too; 1: the last one of each output branch);
    shape computations (``ShapeOf``) end the walk as well. Found this way, not by name, so it
    holds for ultralytics, classic YOLOv5 and meituan YOLOv6 graphs alike.
    """
    budget: dict[str, int] = {}  # node -> most convolutions still allowed past it
    names: list[str] = []
    stack = [(result, convs) for result in model.get_results()]
    while stack:
        node, left = stack.pop()
        name = node.get_name()  # Python wrappers are new objects: compare unique names
        if budget.get(name, -1) >= left:
            continue
        if name not in budget and node.get_type_name() not in ("Result", "Parameter", "Constant"):
            names.append(node.get_friendly_name())
        budget[name] = left
        kind = node.get_type_name()
        if kind == "Convolution" and not _is_dfl(node):
            left -= 1
        if kind in ("Constant", "ShapeOf") or left <= 0:
            continue
        stack.extend((port.get_source_output().get_node(), left) for port in node.inputs())
    return names


def quantize_openvino(
    fp32_folder: str | Path,
    tiles: Sequence[np.ndarray],
    out: str | Path,
    fast: bool = False,
    head_convs: int = 1,
) -> Path:
    """Quantize an FP32 OpenVINO export folder to INT8 with NNCF; returns ``out``.

    The bundled models' recipe (``scripts/train_bundled_models.py bundle``); users' models go
    through :func:`quantize_for_user`, which also checks and caches the result.

    Parameters
    ----------
    fp32_folder : path
        Export folder with ``model.xml`` / ``model.bin`` / ``meta.json``
        (:func:`napari_yolocell.models.export_cache.cached_export` with ``"openvino"``).
    tiles : sequence of numpy.ndarray
        Calibration inputs (:func:`calibration_tiles`), all of one shape; ~64-120 are plenty.
    out : path
        Folder to write; replaced atomically (written to a temporary sibling first).
    fast : bool
        Skip NNCF's bias correction (faster calibration, slightly less exact).
    head_convs : int
        Learned convolutions of each head branch kept in FP32 (:func:`fp32_nodes`).

    Raises
    ------
    ImportError
        NNCF is not installed.
    """
    model, meta = quantize_model(fp32_folder, tiles, fast, head_convs)
    meta["source"] = Path(str(meta.get("source", ""))).name  # shipped: no paths of this machine
    return _save_atomically(model, meta, Path(out))


def quantize_model(
    fp32_folder: str | Path,
    tiles: Sequence[np.ndarray],
    fast: bool = False,
    head_convs: int = 1,
    cancel: Cancel = None,
):
    """The NNCF-quantized OpenVINO model of an FP32 export folder and its ``meta.json`` dict
    (see :func:`quantize_openvino`); ``cancel`` is polled before each calibration tile."""
    nncf = _import_nncf()
    import openvino as ov

    fp32_folder = Path(fp32_folder)
    model = _read_fp32(ov.Core(), fp32_folder, tiles[0].shape)
    logging.getLogger("nncf").setLevel(logging.WARNING)  # one INFO line per ignored node
    with contextlib.redirect_stdout(sys.stderr):  # its progress bar: stdout is for results
        quantized = _nncf_quantize(nncf, model, _Tiles(tiles, cancel), fast, head_convs)
    meta = json.loads((fp32_folder / "meta.json").read_text(encoding="utf-8"))
    meta.update(precision="int8", int8_recipe=int8_cache.INT8_VERSION)
    return quantized, meta


class _Tiles:
    """Calibration tiles that raise :class:`Cancelled` while NNCF iterates them, once
    ``cancel`` is set (NNCF runs the model on every tile, twice with bias correction)."""

    def __init__(self, tiles: Sequence[np.ndarray], cancel: Cancel = None) -> None:
        self.tiles = list(tiles)
        self.cancel = cancel

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self):
        for tile in self.tiles:
            if is_cancelled(self.cancel):
                raise Cancelled("INT8 quantization cancelled")
            yield tile


def _nncf_quantize(nncf, model, tiles: Sequence[np.ndarray], fast: bool, head_convs: int):
    return nncf.quantize(
        model,
        nncf.Dataset(tiles),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(tiles),
        fast_bias_correction=True,
        advanced_parameters=_advanced(nncf, len(tiles), disable_bias_correction=fast),
        ignored_scope=nncf.IgnoredScope(names=fp32_nodes(model, head_convs), validate=False),
    )


def _advanced(nncf, n_tiles: int, **extra: Any):
    """NNCF's advanced settings of our recipe: each activation's range is the mean over the
    calibration tiles of its min and max, the most extreme tiles left out (NNCF's default
    keeps them). Against the default, the bundled v5n's count on BitDepth's 70 images moved
    from +0.55 % of FP32's to +0.11 %, with the same answers elsewhere (docs/benchmarks.md).
    Under :data:`MIN_TILES_NO_OUTLIERS` tiles NNCF's default stays: the tiles left out would
    be a large share of them (of two, both, and the model then finds nothing)."""
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if n_tiles >= MIN_TILES_NO_OUTLIERS:
        extra["activations_range_estimator_params"] = (
            RangeEstimatorParametersSet.MEAN_NO_OUTLIERS_MINMAX
        )
    return nncf.AdvancedQuantizationParameters(**extra)


def _import_nncf():
    """NNCF, imported with its telemetry off, or an ImportError that says how to install it."""
    # NNCF sends usage telemetry unless the user opted out; its CI switch replaces the sender
    # with a stub. Nothing in this package may reach the network.
    os.environ.setdefault("NNCF_CI", "1")
    try:
        import nncf
    except ImportError as err:
        raise ImportError("INT8 quantization needs NNCF: pip install nncf") from err
    return nncf


def quantize_model_mixed(
    fp32_folder: str | Path,
    tiles: Sequence[np.ndarray],
    conf: float = 0.25,
    cancel: Cancel = None,
):
    """INT8 with the operations that change the answers kept in FP32 (NNCF accuracy control).

    NNCF quantizes as :func:`quantize_model` does, ranks the quantized operations by how much
    they move the model's boxes away from FP32's on ``tiles``, and returns them to FP32 one at a
    time (at most :data:`MAX_FP32_OPS` steps) until the agreement on ``tiles`` is within the
    check's bar (F1 against FP32's boxes at least :data:`MIN_F1_AGREEMENT`, counting a count
    change of :data:`MAX_COUNT_CHANGE` as the same shortfall). Minutes on a CPU (it
    compiles the model once per quantized operation); run it once, on a model that failed
    :func:`check_int8`.

    Returns
    -------
    (openvino.Model, dict)
        The model and its ``meta.json`` dict (``int8_mixed`` records the search).
    """
    nncf = _import_nncf()
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    from napari_yolocell.models.detector import postprocess

    fp32_folder = Path(fp32_folder)
    judged = list(tiles)
    grey = _grey(judged)
    low = max(conf - SCORE_MARGIN, 1e-3)

    def boxes(compiled, index: int) -> np.ndarray:
        _stop_if(cancel)
        raw = np.asarray(compiled(judged[index])[0], dtype=np.float32)
        return postprocess(raw, [grey[index]], low, 0.5, 1000)[0]

    core = ov.Core()
    model = _read_fp32(core, fp32_folder, judged[0].shape)
    # FP32's boxes, taken before NNCF is handed the network
    reference = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expected = [boxes(reference, i) for i in range(len(judged))]
    del reference

    def agreement(compiled, indices) -> tuple[float, None]:
        indices = list(indices)
        found = [boxes(compiled, i) for i in indices]
        f1, n_a, n_b = _agreement([expected[i] for i in indices], found, conf)
        change = abs(n_b - n_a) / max(1, n_a)
        shortfall = change * (1 - MIN_F1_AGREEMENT) / MAX_COUNT_CHANGE
        return min(f1, 1.0 - shortfall), None

    logging.getLogger("nncf").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):
        quantized = nncf.quantize_with_accuracy_control(
            model,
            nncf.Dataset(_Tiles(tiles, cancel)),
            # items are indices: NNCF hands validation items to `agreement` untransformed
            nncf.Dataset(list(range(len(judged))), lambda i: judged[i]),
            agreement,
            max_drop=1 - MIN_F1_AGREEMENT,
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=len(tiles),
            ignored_scope=nncf.IgnoredScope(names=fp32_nodes(model, 1), validate=False),
            advanced_quantization_parameters=_advanced(nncf, len(tiles)),
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=MAX_FP32_OPS,
                ranking_subset_size=min(RANKING_TILES, len(judged)),
            ),
        )
    meta = json.loads((fp32_folder / "meta.json").read_text(encoding="utf-8"))
    meta.update(
        precision="int8",
        int8_recipe=int8_cache.INT8_VERSION,
        int8_mixed={"fake_quantize": _fake_quantize_count(quantized)},
    )
    return quantized, meta


def _read_fp32(core, fp32_folder: Path, shape: Sequence[int]):
    """The FP32 export's network, reshaped to the calibration tiles' static shape."""
    model = core.read_model(str(Path(fp32_folder) / "model.xml"))
    model.reshape({0: list(shape)})
    return model


def _grey(tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The uint8 grey tiles behind NCHW calibration tiles (:func:`calibration_tiles`)."""
    return [np.round(t[0, 0] * 255).astype(np.uint8) for t in tiles]


def _fake_quantize_count(model) -> int:
    """Quantization points left in an OpenVINO model (fewer: more of it runs in FP32)."""
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def _write_ir(model, meta: dict, folder: Path) -> None:
    import openvino as ov

    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _save_atomically(model, meta: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the folder ships in the package
    try:
        _write_ir(model, meta, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class Int8Check:
    """An INT8 model against its FP32 export on the same tiles (:func:`check_int8`).

    Attributes
    ----------
    count_fp32, count_int8 : int
        Boxes above the confidence threshold, all tiles together.
    f1 : float
        F1 of the INT8 boxes against FP32's (one-to-one, IoU >= 0.5; a partner may score up to
        :data:`SCORE_MARGIN` under the threshold); 1.0 when both are empty.
    tiles : int
        Tiles compared.
    passed : bool
        Count within :data:`MAX_COUNT_CHANGE` and F1 >= :data:`MIN_F1_AGREEMENT`.
    """

    count_fp32: int
    count_int8: int
    f1: float
    tiles: int
    passed: bool

    @property
    def count_change(self) -> float:
        """Relative count change, INT8 against FP32."""
        return (self.count_int8 - self.count_fp32) / max(1, self.count_fp32)

    def describe(self) -> str:
        """One line: the counts, the change and the F1 agreement."""
        return (
            f"INT8 {self.count_int8} vs FP32 {self.count_fp32} boxes on {self.tiles} calibration "
            f"tiles ({self.count_change:+.2%}), F1 agreement {self.f1:.4f}"
        )


def check_int8(
    fp32_folder: str | Path,
    int8_folder: str | Path,
    tiles: Sequence[np.ndarray],
    conf: float = 0.25,
    iou: float = 0.5,
    cancel: Cancel = None,
) -> Int8Check:
    """Run both models on ``tiles`` and compare their boxes (see :class:`Int8Check`);
    ``cancel`` is polled before each tile."""
    from napari_yolocell.models.backends import OpenVinoDetector
    from napari_yolocell.models.spec import ModelSpec

    spec = ModelSpec(name="check")
    grey = _grey(tiles)
    low = max(conf - SCORE_MARGIN, 1e-3)  # greedy NMS: boxes >= conf are the same as at conf
    boxes = []
    for folder in (fp32_folder, int8_folder):
        detector = OpenVinoDetector(spec, folder, device="cpu")
        found = []
        for tile in grey:
            _stop_if(cancel)
            found.extend(detector.predict([tile], low, iou, 1000))
        boxes.append(found)
    f1, n_fp32, n_int8 = _agreement(*boxes, conf)
    change = abs(n_int8 - n_fp32) / max(1, n_fp32)
    passed = change <= MAX_COUNT_CHANGE and f1 >= MIN_F1_AGREEMENT
    return Int8Check(n_fp32, n_int8, round(float(f1), 5), len(tiles), bool(passed))


def _agreement(
    reference: Sequence[np.ndarray], other: Sequence[np.ndarray], conf: float
) -> tuple[float, int, int]:
    """F1 of ``other``'s boxes against ``reference``'s (per tile, IoU 0.5) and both counts.

    Boxes are counted at ``conf``; a box matched by one the other model scores within
    :data:`SCORE_MARGIN` under ``conf`` still counts as found (the arrays hold boxes down to
    ``conf - SCORE_MARGIN``).
    """
    n_a = n_b = found_a = found_b = 0
    for a, b in zip(reference, other, strict=True):
        pairs = _matches(a, b)
        n_a += int((a[:, 4] >= conf).sum())
        n_b += int((b[:, 4] >= conf).sum())
        found_a += sum(a[i, 4] >= conf for i, _ in pairs)
        found_b += sum(b[j, 4] >= conf for _, j in pairs)
    recall, precision = found_a / max(1, n_a), found_b / max(1, n_b)
    f1 = 1.0 if n_a + n_b == 0 else 2 * precision * recall / max(precision + recall, 1e-9)
    return float(f1), n_a, n_b


def _matches(a: np.ndarray, b: np.ndarray, iou: float = 0.5) -> list[tuple[int, int]]:
    """One-to-one greedy ``(i, j)`` matches of two ``(k, 6)`` box arrays at IoU >= ``iou``."""
    if not len(a) or not len(b):
        return []
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:4] - x[:, :2], axis=1)  # noqa: E731
    overlap = inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)
    used_a, used_b, pairs = set(), set(), []
    for i, j in zip(*np.unravel_index(np.argsort(-overlap, axis=None), overlap.shape), strict=True):
        if overlap[i, j] < iou:
            break
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((int(i), int(j)))
    return pairs


def quantize_for_user(
    weights: str | Path,
    calibration: Iterable[np.ndarray] | Sequence[np.ndarray],
    *,
    force: bool = False,
    search: bool = True,
    n_tiles: int = DEFAULT_TILES,
    progress: Callable[[str], None] | None = None,
    cancel: Cancel = None,
) -> int8_cache.Int8Entry:
    """Quantize a user's model once, check it against FP32, cache both in the user cache.

    The one entry point for the few-shot fine-tune (at its end), ``yolocell quantize`` and
    ``yolocell detect``'s first use of a model. The result is keyed by the SHA-256 of
    ``weights`` (:func:`napari_yolocell.models.int8_cache.int8_dir`); later calls return the
    cached entry at once. :func:`napari_yolocell.models.loading.load_detector` then runs the
    INT8 model on a CPU when it passed its check, FP32 (with one warning) when it did not.

    Parameters
    ----------
    weights : path
        The ``.pt`` (or a bundled model's name: it is quantized anew, e.g. to test a recipe).
    calibration : iterable of numpy.ndarray
        The user's images (2-D, any dtype: percentile-normalised here), or tiles already made
        by :func:`calibration_tiles`; e.g. the fine-tune's training images, else the images
        about to be detected.
    force : bool
        Quantize again even if a cached entry exists.
    search : bool
        When the INT8 model fails its check, search which operations to keep in FP32
        (:func:`quantize_model_mixed`, minutes) and check that one. A cached entry that failed
        without this search is searched now.
    n_tiles : int
        Calibration tiles drawn from images (at most).
    progress : callable, optional
        Called with a one-line message at each step.
    cancel : threading.Event or callable, optional
        Polled between steps and before every calibration / check tile; nothing is cached
        when it stops the quantization.

    Returns
    -------
    napari_yolocell.models.int8_cache.Int8Entry
        Folder, check record, and whether it is used.

    Raises
    ------
    ImportError
        NNCF is not installed.
    ValueError
        No calibration image, or unreadable weights.
    napari_yolocell.engine.detect.Cancelled
        ``cancel`` was set.
    """
    from napari_yolocell.models.export_cache import cached_export
    from napari_yolocell.models.loading import clear_cache, unpack_weights
    from napari_yolocell.models.registry import resolve_model

    say = progress or _log.info
    spec = unpack_weights(resolve_model(weights))
    entry = int8_cache.lookup(spec)
    if entry is not None and not force and (entry.used or not search or int8_cache.searched(entry)):
        return entry
    tiles = _as_tiles(calibration, n_tiles)
    conf = float(spec.default_conf)
    say(f"INT8: exporting {spec.name} to OpenVINO FP32")
    _stop_if(cancel)
    fp32 = cached_export(spec, "openvino")
    say(f"INT8: calibrating on {len(tiles)} tiles of your images")
    _stop_if(cancel)
    model, meta = quantize_model(fp32, tiles, cancel=cancel)
    _stop_if(cancel)
    tmp = int8_cache.new_entry(spec)
    try:
        _write_ir(model, meta, tmp)
        say("INT8: checking it against FP32 on the calibration tiles")
        check = check_int8(fp32, tmp, tiles, conf=conf, cancel=cancel)
        record = _record(check, recipe="int8")
        if not check.passed and search:
            say(
                f"INT8: {check.describe()}: searching which operations to keep in FP32 "
                "(minutes, once)"
            )
            plain_points = _fake_quantize_count(model)
            model, meta = quantize_model_mixed(fp32, tiles, conf=conf, cancel=cancel)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp = int8_cache.new_entry(spec)
            _write_ir(model, meta, tmp)
            check = check_int8(fp32, tmp, tiles, conf=conf, cancel=cancel)
            kept = plain_points - meta["int8_mixed"]["fake_quantize"]
            record = _record(check, recipe="mixed", fp32_quantization_points=kept)
            say(f"INT8: {kept} quantization points returned to FP32")
        entry = int8_cache.install(spec, tmp, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    clear_cache()  # detectors loaded before now would keep running FP32
    say(f"INT8: {check.describe()}: " + ("used" if check.passed else "not used, FP32 runs"))
    return entry


def _record(check: Int8Check, **extra: Any) -> dict[str, Any]:
    """What ``check.json`` holds: the check, its count change and how the model was made."""
    return asdict(check) | {"count_change": check.count_change, **extra}


def wants_int8(model: str | Path, backend: str = "auto", device: str | None = None) -> bool:
    """Whether detecting with ``model`` should first make its INT8 version (its first use).

    True when all hold: the runtime is ``auto`` or ``openvino-int8`` on a CPU whose OpenVINO
    runs INT8 kernels (:func:`~napari_yolocell.models.int8_cache.cpu_gains_from_int8`), NNCF
    is installed, and the model is a plain ``.pt`` that ships no INT8 version (a fine-tune, a
    classic YOLOv5 or meituan YOLOv6 checkpoint; not a bundled model, an export or the
    classical baseline) and has no INT8 entry in the user cache yet (one that failed its check
    counts: it is not made again).
    """
    import importlib.util

    from napari_yolocell.models.detector import default_device
    from napari_yolocell.models.loading import is_exported_model, unpack_weights
    from napari_yolocell.models.registry import resolve_model

    if backend not in ("auto", "openvino-int8"):
        return False
    if not (device or default_device()).lower().startswith("cpu"):
        return False
    try:
        spec = resolve_model(str(model))
    except (FileNotFoundError, ValueError):
        return False  # loading the detector reports it
    plain_weights = spec.path is not None and str(spec.path).lower().endswith(".pt")
    if spec.int8 or spec.family == "classical" or not plain_weights:
        return False
    if is_exported_model(spec.path) or int8_cache.lookup(unpack_weights(spec)) is not None:
        return False
    return importlib.util.find_spec("nncf") is not None and int8_cache.cpu_gains_from_int8()


def quantize_on_first_use(
    model: str | Path,
    images: Callable[[], Sequence[np.ndarray]],
    *,
    backend: str = "auto",
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
    cancel: Cancel = None,
) -> int8_cache.Int8Entry | None:
    """Make ``model``'s INT8 version before its first detection, if :func:`wants_int8`.

    What ``yolocell detect`` and the Detect and Batch widgets do before loading the detector.

    Parameters
    ----------
    model : str or path
        The model about to detect.
    images : callable
        Returns the images about to be detected (2-D arrays: e.g. central windows of a
        layer's planes, :func:`napari_yolocell.engine.detect.plane_windows`, or of files,
        :func:`read_calibration_images`); called only when quantizing.
    backend, device : str
        The detection's runtime and device.
    progress, cancel
        As in :func:`quantize_for_user`.

    Returns
    -------
    Int8Entry or None
        The new entry (check it with ``entry.used``), or None when nothing was to be done.

    Raises
    ------
    Exception
        Whatever the quantization raised (an optimisation only: callers detect in FP32).
    """
    if not wants_int8(model, backend, device):
        return None
    # no mixed-precision search here: its minutes would delay a detection the user is waiting
    # for; `yolocell quantize` runs it (the warning that FP32 runs says so)
    return quantize_for_user(model, images(), search=False, progress=progress, cancel=cancel)


def _stop_if(cancel: Cancel) -> None:
    if is_cancelled(cancel):
        raise Cancelled("INT8 quantization cancelled")


def _distinct_windows(image: np.ndarray, tile: int = 640) -> int:
    """How many calibration windows of ``tile`` px an image gives before they mostly repeat
    (one for an image no larger than a tile: its windows would all be the same padded copy)."""
    h, w = image.shape[:2]
    return max(1, int(np.ceil(2 * h * w / tile**2)) if max(h, w) > tile else 1)


def _as_tiles(calibration, n_tiles: int) -> list[np.ndarray]:
    """Calibration tiles from images (or tiles as they are), at most ``n_tiles``."""
    items = [np.asarray(x) for x in calibration]
    if not items:
        raise ValueError("INT8 calibration needs at least one image")
    if all(x.ndim == 4 and x.dtype == np.float32 for x in items):
        return items[:n_tiles]
    per_image = max(1, -(-n_tiles // len(items)))
    tiles = [
        tile
        for index, image in enumerate(items)
        for tile in calibration_tiles(
            [image], per_image=min(per_image, _distinct_windows(image)), seed=index
        )
    ]
    rng = np.random.default_rng(0)
    if len(tiles) > n_tiles:
        tiles = [tiles[i] for i in sorted(rng.choice(len(tiles), n_tiles, replace=False))]
    return tiles


def read_calibration_images(
    inputs: Sequence[str | Path],
    max_images: int = 16,
    window: int = 2048,
    channel: int | None = None,
) -> list[np.ndarray]:
    """2-D windows of the user's images for :func:`quantize_for_user`.

    Parameters
    ----------
    inputs : sequence of path
        Files, folders or globs (:func:`napari_yolocell.io.images.expand_inputs`).
    max_images : int
        Images read, spread evenly over the list.
    window : int
        Side of the central window read from each (large images are never loaded whole).
    channel : int, optional
        Channel of multichannel images (default the first; RGB: the brightest of the three).
    """
    from napari_yolocell.io.images import expand_inputs, open_image

    paths = expand_inputs([str(p) for p in inputs])
    if len(paths) > max_images:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_images).astype(int)]
    out = []
    for path in paths:
        img = open_image(path)
        try:
            out.append(_central_window(img, window, channel))
        finally:
            img.close()
    return out


def _central_window(img, window: int, channel: int | None) -> np.ndarray:
    """The central ``window`` px of the first plane of an opened image, as a 2-D array."""
    data = img.data
    if img.channel_axis is not None:
        data = data[(slice(None),) * img.channel_axis + (channel or 0,)]
    yx = data.ndim - (3 if img.rgb else 2)
    data = data[(0,) * yx]  # first plane of Z / T stacks
    h, w = data.shape[:2]
    y, x = max(0, (h - window) // 2), max(0, (w - window) // 2)
    arr = np.asarray(data[y : y + window, x : x + window])
    if img.rgb:
        arr = arr[..., channel] if channel is not None else arr[..., :3].max(axis=-1)
    return arr


def quantize_after_finetune(
    weights: str | Path | None,
    dataset: str | Path,
    progress: Callable[[str], None] | None = None,
    cancel: Cancel = None,
) -> int8_cache.Int8Entry | None:
    """The INT8 version of a freshly fine-tuned model, calibrated on its training tiles.

    Called at the end of :func:`napari_yolocell.training.fewshot.finetune`, with its
    ``progress`` (one line per step) and ``cancel``. Does nothing (None)
    when the CPU gains nothing from INT8 or NNCF is missing; a failure is a warning, never an
    error: the fine-tuned model stays usable in FP32.
    """
    import importlib.util
    import warnings

    if weights is None or not int8_cache.cpu_gains_from_int8():
        return None
    if importlib.util.find_spec("nncf") is None:
        return None
    try:
        images = read_calibration_images([Path(dataset) / "images" / "train"], max_images=64)
        return quantize_for_user(weights, images, progress=progress, cancel=cancel)
    except Cancelled:  # nothing was cached; the fine-tuned model runs FP32
        return None
    except Exception as err:  # quantization is an optimisation: never lose the fine-tune
        warnings.warn(f"INT8 quantization skipped: {err}", RuntimeWarning, stacklevel=2)
        return None
