"""The swappable forward step: tiles in, boxes out.

A :class:`Detector` turns a batch of 8-bit tiles into boxes in tile pixel coordinates. The
tiling, normalisation and merging around it (:mod:`napari_yolocell.detect`) do not depend on
how the forward pass runs. Three runtimes implement it for ultralytics YOLO models:

- :class:`TorchDetector`: PyTorch via ``YOLO.predict`` (CPU or CUDA);
- :class:`OnnxRuntimeDetector`: ONNX Runtime on an ONNX export of the same weights;
- :class:`OpenVinoDetector`: OpenVINO on an IR export (fastest on x86 CPUs).

The exported backends feed the network exactly what ultralytics' predictor feeds PyTorch
(tiles zero-padded bottom/right to a multiple of 32, grey x3, /255, NCHW float32) and decode
its raw output with ultralytics' own ``non_max_suppression`` (same call, same arguments), so
their boxes match PyTorch's up to float rounding. Exports are made once per weights file and
cached (:mod:`napari_yolocell.export_cache`). :func:`make_detector` picks the backend.
"""

from __future__ import annotations

import abc
import collections
import importlib.util
import math
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_yolocell.models import ModelSpec

#: Forward-pass runtimes; ``"auto"`` is accepted too (see :func:`resolve_backend`).
#: ``"openvino-int8"`` runs a model's bundled 8-bit version (:mod:`napari_yolocell.quantize`).
BACKENDS = ("torch", "onnxruntime", "openvino", "openvino-int8")
BACKEND_CHOICES = ("auto", *BACKENDS)
#: Preference of ``backend="auto"`` on a CPU: measured fastest first (``"openvino"`` becomes
#: ``"openvino-int8"`` for models that ship an INT8 version).
_AUTO_CPU_ORDER = ("openvino", "onnxruntime")
_BACKEND_MODULE = {
    "torch": "torch",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "openvino-int8": "openvino",
}


class Detector(abc.ABC):
    """Interface of every detector backend.

    Attributes
    ----------
    spec : ModelSpec
        Description of the model (normalisation, nucleus diameter, default confidence...).
    needs_overview : bool
        Whether the engine must call :meth:`prepare` with an overview of each plane.
    grey_tiles : bool
        Whether :meth:`predict` takes (H, W) grey tiles; if not, the engine passes each
        tile as (H, W, 3), three identical channels.
    """

    spec: ModelSpec
    needs_overview: bool = False
    grey_tiles: bool = False

    def prepare(self, overview: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Optional hook: see a normalised uint8 overview of the whole plane before its tiles.

        Detectors that need a plane-wide statistic (the classical threshold) use it, so that
        every tile is treated the same. Neural-network backends ignore it.
        """

    @abc.abstractmethod
    def predict(
        self, tiles: list[np.ndarray], conf: float, iou: float, max_det: int
    ) -> list[np.ndarray]:
        """Detect nuclei in a batch of tiles.

        Parameters
        ----------
        tiles : list of numpy.ndarray
            (H, W, 3) uint8 tiles, or (H, W) grey ones where :attr:`grey_tiles` is true
            (the networks see them as three identical channels).
        conf : float
            Minimum confidence of a returned box.
        iou : float
            IoU threshold of the detector's own NMS inside a tile.
        max_det : int
            Maximum number of boxes per tile.

        Returns
        -------
        list of numpy.ndarray
            One (k, 6) float array per tile: ``x0, y0, x1, y1, confidence, class`` in tile
            pixel coordinates.
        """


def default_device() -> str:
    """``"cuda:0"`` when a CUDA GPU is usable, else ``"cpu"``."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _round_up(value: int, multiple: int = 32) -> int:
    return max(multiple, int(math.ceil(value / multiple)) * multiple)


def pad_batch(tiles: list[np.ndarray], multiple: int = 32) -> tuple[list[np.ndarray], tuple]:
    """Zero-pad tiles at the bottom/right to one shape, a multiple of the network stride.

    Padding (rather than letting ultralytics letterbox-resize) keeps the pixel scale: a small
    image would otherwise be enlarged and its nuclei would no longer match the training size.
    Bottom/right padding leaves box coordinates unchanged.
    """
    height = _round_up(max(t.shape[0] for t in tiles), multiple)
    width = _round_up(max(t.shape[1] for t in tiles), multiple)
    padded = []
    for t in tiles:
        if t.shape[:2] == (height, width):
            padded.append(np.ascontiguousarray(t))
            continue
        canvas = np.zeros((height, width, *t.shape[2:]), dtype=np.uint8)
        canvas[: t.shape[0], : t.shape[1]] = t
        padded.append(canvas)
    return padded, (height, width)


def as_rgb(tile: np.ndarray) -> np.ndarray:
    """(H, W, 3) view of a tile: a grey (H, W) tile repeated in three channels."""
    return tile if tile.ndim == 3 else np.repeat(tile[:, :, None], 3, axis=2)


def _clip_to_tile(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, shape[1])
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, shape[0])
    return boxes


class TorchDetector(Detector):
    """Runs an ultralytics YOLO model (v5, v6, v8...) with PyTorch.

    Parameters
    ----------
    model : ultralytics.YOLO
        Loaded model.
    spec : ModelSpec
        Its description.
    device : str, optional
        Torch device; default CUDA if available, else CPU.
    """

    grey_tiles = True

    def __init__(self, model, spec: ModelSpec, device: str | None = None) -> None:
        self.model = model
        self.spec = spec
        self.device = device or default_device()

    def predict(
        self, tiles: list[np.ndarray], conf: float, iou: float, max_det: int
    ) -> list[np.ndarray]:
        """Batched forward pass; see :meth:`Detector.predict`."""
        if not tiles:
            return []
        padded, imgsz = pad_batch([as_rgb(t) for t in tiles])
        # One call for the whole batch; tiles are grey x3, so RGB vs BGR order is moot.
        results = self.model.predict(
            padded,
            imgsz=list(imgsz),
            conf=conf,
            iou=iou,
            max_det=max_det,
            verbose=False,
            device=self.device,
            agnostic_nms=True,
        )
        out = []
        for tile, result in zip(tiles, results, strict=True):
            data = result.boxes.data.detach().cpu().numpy().astype(np.float64)
            out.append(_clip_to_tile(data[:, :6].reshape(-1, 6), tile.shape[:2]))
        return out

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Raw network output ``(N, 4 + nc, anchors)`` for an NCHW float32 batch in [0, 1].

        The network ultralytics' predictor runs (fused, eval mode); for comparing backends.
        """
        import torch

        if self.model.predictor is None:  # the predictor (and its fused model) is built lazily
            self.predict([np.zeros((32, 32, 3), np.uint8)], conf=0.5, iou=0.5, max_det=1)
        with torch.inference_mode():
            out = self.model.predictor.model(torch.from_numpy(batch).to(self.device))
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.detach().cpu().float().numpy()


class WeightsError(ValueError):
    """A weights file that cannot be read as an ultralytics detection model."""


def load_ultralytics(path: str | Path):
    """Load an ultralytics model from a ``.pt`` checkpoint or a shipped architecture YAML.

    Loading a ``.pt`` file unpickles Python objects: only load weights you trust.

    Raises
    ------
    WeightsError
        (a ValueError) If the file cannot be read as an ultralytics model (names the file).
    """
    from napari_yolocell.ultralytics_env import import_ultralytics

    ultralytics = import_ultralytics()
    try:
        return ultralytics.YOLO(str(path), task="detect")
    except Exception as err:  # torch/pickle/zip errors vary: report them uniformly
        raise WeightsError(
            f"cannot load model weights {str(path)!r}: {type(err).__name__}: {err}. "
            "Is it an ultralytics detection checkpoint (.pt)?"
        ) from err


# ---------------------------------------------------------------------------------------------
# Exported backends (ONNX Runtime, OpenVINO)


def preprocess(tiles: list[np.ndarray]) -> np.ndarray:
    """Tiles -> the NCHW float32 batch ultralytics' predictor would build from them.

    Zero-padded bottom/right to one shape (:func:`pad_batch`), BGR -> RGB like ultralytics
    (moot for grey x3), scaled to [0, 1] with the same float32 division.
    """
    padded, _ = pad_batch(tiles)
    height, width = padded[0].shape[:2]
    batch = np.empty((len(padded), 3, height, width), np.float32)
    for out, tile in zip(batch, padded, strict=True):
        # one pass per tile, no intermediate copies; same float32 division as before
        if tile.ndim == 2:
            np.divide(tile, np.float32(255), out=out[0], dtype=np.float32)
            out[1:] = out[0]
        else:
            rgb = tile[..., ::-1].transpose(2, 0, 1)
            np.divide(rgb, np.float32(255), out=out, dtype=np.float32)
    return batch


def grey_input_model(network):
    """An OpenVINO model that takes the (N, H, W) uint8 grey tiles themselves.

    Scaling to [0, 1] float and the three identical channels run inside the compiled model,
    on the runtime's threads: done in NumPy they cost 5 ms a tile (a tenth of an INT8 forward
    pass on 2 cores) and 4.9 MB of float writes.
    """
    import openvino as ov
    import openvino.opset13 as ops

    network = network.clone()
    images = network.get_parameters()[0]
    grey = ops.parameter(ov.PartialShape([-1, -1, -1]), ov.Type.u8, name="grey")
    x = ops.divide(ops.convert(grey, "f32"), ops.constant(np.float32(255)))
    x = ops.unsqueeze(x, ops.constant(np.int64(1)))
    x = ops.concat([x, x, x], axis=1)
    for target in list(images.output(0).get_target_inputs()):
        target.replace_source_output(x.output(0))
    return ov.Model(network.get_results(), [grey], "grey_input")


def postprocess(
    raw: np.ndarray, tiles: list[np.ndarray], conf: float, iou: float, max_det: int
) -> list[np.ndarray]:
    """Decode a raw head output ``(N, 4 + nc, anchors)`` into per-tile ``(k, 6)`` boxes.

    The same steps and arguments as ultralytics' ``non_max_suppression`` in the PyTorch
    predictor (best class per box, score > conf, class-agnostic greedy NMS, at most ``max_det``
    boxes), in numpy: calling torch here between forward passes made the next OpenVINO /
    ONNX Runtime pass up to 3x slower on a 2-core CPU (the runtimes' and torch's thread pools
    fight), and NumPy needs no torch import in these processes.
    """
    out = []
    for tile, pred in zip(tiles, np.asarray(raw, dtype=np.float32), strict=True):
        scores = pred[4:]
        cls = scores.argmax(axis=0) if len(scores) > 1 else np.zeros(pred.shape[1], np.intp)
        best = scores[cls, np.arange(pred.shape[1])]
        keep = np.flatnonzero(best > conf)
        if len(keep) > MAX_NMS:
            keep = keep[np.argsort(-best[keep], kind="stable")[:MAX_NMS]]
        xywh = pred[:4, keep].T
        boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        picked = nms(boxes, best[keep], iou)[:max_det]
        data = np.column_stack([boxes[picked], best[keep][picked], cls[keep][picked]])
        out.append(_clip_to_tile(data.astype(np.float64).reshape(-1, 6), tile.shape[:2]))
    return out


MAX_NMS = 30000  # ultralytics' cap on boxes entering NMS


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression (as ``torchvision.ops.nms``): kept indices, best first.

    A box is dropped when its IoU with a higher-scoring kept box is above ``iou``.
    """
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0) * (y1 - y0)
    keep = []
    # One errstate for the loop and np.maximum, not np.clip: their Python-level overhead per
    # kept box was most of the NMS time (10 ms a crowded tile, a sixth of an INT8 forward).
    with np.errstate(invalid="ignore", divide="ignore"):  # two empty boxes: 0/0, kept
        while order.size:
            i, rest = order[0], order[1:]
            keep.append(i)
            w = np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest])
            h = np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest])
            inter = np.maximum(w, 0) * np.maximum(h, 0)
            overlap = inter / (areas[i] + areas[rest] - inter)
            order = rest[~(overlap > iou)]
    return np.asarray(keep, dtype=np.intp)


def _num_threads() -> int:
    """Threads per forward pass: torch's setting, which batch workers lower to share cores."""
    import torch

    return max(1, int(torch.get_num_threads()))


class ExportInfo:
    """What an exported detector knows about its source checkpoint.

    Attributes
    ----------
    folder : pathlib.Path
        Export folder.
    meta : dict
        Its ``meta.json`` (class names, stride, source path, the checkpoint's settings).
    ckpt : dict
        ``{"yolocell": settings}`` when the checkpoint carried settings, as on an ultralytics
        ``YOLO`` object, so :mod:`napari_yolocell.models` applies them the same way.
    """

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.meta = meta
        settings = meta.get("yolocell")
        self.ckpt = {"yolocell": settings} if isinstance(settings, dict) else {}
        self.names = {int(k): v for k, v in (meta.get("names") or {}).items()}


class _ExportedDetector(Detector):
    """Shared pre/post-processing of the exported backends; subclasses run the network."""

    fmt = "onnx"
    grey_tiles = True

    def __init__(
        self,
        spec: ModelSpec,
        folder: str | Path,
        device: str | None = None,
        threads: int | None = None,
        keep: Any = None,
    ) -> None:
        from napari_yolocell.export_cache import read_meta

        self.spec = spec
        self.folder = Path(folder)
        self.device = device or "cpu"
        self.threads = threads or _num_threads()
        self.model = ExportInfo(self.folder, read_meta(self.folder))
        self._keep = keep  # a TemporaryDirectory to keep alive (untrained YAML exports)

    @property
    def model_path(self) -> Path:
        """The file the runtime loaded."""
        from napari_yolocell.export_cache import model_file

        return model_file(self.folder, self.fmt)

    @abc.abstractmethod
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Raw network output ``(N, 4 + nc, anchors)`` for an NCHW float32 batch in [0, 1]."""

    def predict(
        self, tiles: list[np.ndarray], conf: float, iou: float, max_det: int
    ) -> list[np.ndarray]:
        """Batched forward pass; see :meth:`Detector.predict`."""
        if not tiles:
            return []
        return postprocess(self.forward(self.input_batch(tiles)), tiles, conf, iou, max_det)

    def input_batch(self, tiles: list[np.ndarray]) -> np.ndarray:
        """The batch :meth:`forward` takes for these tiles: NCHW float32 (:func:`preprocess`)."""
        return preprocess(tiles)


class OnnxRuntimeDetector(_ExportedDetector):
    """Runs an ONNX export (dynamic batch and tile size) with ONNX Runtime.

    Parameters
    ----------
    spec : ModelSpec
        The model's description.
    folder : str or Path
        Export folder holding ``model.onnx`` (see :mod:`napari_yolocell.export_cache`).
    device : str, optional
        ``"cpu"`` (default) or ``"cuda[:N]"`` (needs the ``onnxruntime-gpu`` build).
    threads : int, optional
        CPU threads per forward pass; default torch's setting (all physical cores).
    """

    fmt = "onnx"

    def __init__(
        self,
        spec: ModelSpec,
        folder: str | Path,
        device: str | None = None,
        threads: int | None = None,
        keep: Any = None,
    ) -> None:
        super().__init__(spec, folder, device, threads, keep)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: shape-inference notes would flood the log
        providers: list = ["CPUExecutionProvider"]
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError(
                    "this onnxruntime build has no CUDA support: install "
                    "onnxruntime-gpu, or use backend 'torch' on a GPU"
                )
            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), *providers]
        self.session = ort.InferenceSession(str(self.model_path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Raw network output; see :meth:`_ExportedDetector.forward`."""
        return self.session.run(None, {self.input_name: batch})[0]


class OpenVinoDetector(_ExportedDetector):
    """Runs an OpenVINO IR export, compiled once per input shape (batch, height, width).

    A static shape lets OpenVINO pick its fastest kernels; compiling takes well under a second
    and the last few shapes are kept (full batches and the plane's last partial batch).

    Parameters
    ----------
    spec : ModelSpec
        The model's description.
    folder : str or Path
        Export folder holding ``model.xml`` / ``model.bin``.
    device : str, optional
        OpenVINO device: ``"cpu"`` (default), ``"gpu"`` (Intel GPU), ``"npu"``...
    threads : int, optional
        CPU threads per forward pass; default torch's setting (all physical cores).
    """

    fmt = "openvino"
    max_compiled = 4

    def __init__(
        self,
        spec: ModelSpec,
        folder: str | Path,
        device: str | None = None,
        threads: int | None = None,
        keep: Any = None,
    ) -> None:
        super().__init__(spec, folder, device, threads, keep)
        if self.device.startswith("cuda"):
            raise ValueError("OpenVINO does not run on CUDA GPUs: use backend 'torch' there")
        import openvino as ov

        self.ov_device = self.device.split(":")[0].upper()
        self.core = ov.Core()
        self.network = self.core.read_model(str(self.model_path))
        self._grey_network = None
        self._compiled: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def _compiled_for(self, shape: tuple[int, ...]):
        if shape in self._compiled:
            self._compiled.move_to_end(shape)
            return self._compiled[shape]
        network = self.network
        if len(shape) == 3:  # grey uint8 input (see predict)
            if self._grey_network is None:
                self._grey_network = grey_input_model(self.network)
            network = self._grey_network
        network.reshape({0: list(shape)})
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if self.ov_device == "CPU":
            # f32: recent CPUs otherwise default to bf16 inference, which changes the answers.
            config.update(INFERENCE_NUM_THREADS=self.threads, INFERENCE_PRECISION_HINT="f32")
        compiled = self.core.compile_model(network, self.ov_device, config)
        self._compiled[shape] = compiled
        while len(self._compiled) > self.max_compiled:
            self._compiled.popitem(last=False)
        return compiled

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Raw network output for an NCHW float32 batch in [0, 1] or an (N, H, W) uint8 grey one."""
        with self._lock:  # one request at a time; its output buffer is reused by the next
            compiled = self._compiled_for(tuple(batch.shape))
            return np.array(compiled(batch)[0], dtype=np.float32, copy=True)

    def input_batch(self, tiles: list[np.ndarray]) -> np.ndarray:
        """Grey tiles go into the model as one (N, H, W) uint8 batch (:func:`grey_input_model`);
        others as NCHW float32."""
        if any(t.ndim != 2 for t in tiles):
            return preprocess(tiles)
        return np.stack(pad_batch(tiles)[0])


# ---------------------------------------------------------------------------------------------
# Choosing a backend


def available_backends() -> list[str]:
    """Backends whose runtime package is installed, fastest on a CPU first."""
    found = [b for b in _AUTO_CPU_ORDER if importlib.util.find_spec(_BACKEND_MODULE[b])]
    return [*found, "torch"]


def resolve_backend(backend: str = "auto", device: str | None = None) -> str:
    """The concrete backend for ``backend`` on ``device``.

    ``"auto"``: PyTorch on a GPU; on a CPU the fastest installed runtime, OpenVINO, then ONNX
    Runtime, then PyTorch.

    Raises
    ------
    ValueError
        Unknown backend name.
    ImportError
        The named backend's package is not installed (the message says what to install).
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKEND_CHOICES}")
    if backend == "auto":
        if not (device or default_device()).lower().startswith("cpu"):
            return "torch"
        return available_backends()[0]
    if importlib.util.find_spec(_BACKEND_MODULE[backend]) is None:
        raise ImportError(
            f"backend {backend!r} needs the {_BACKEND_MODULE[backend]!r} package: "
            f"pip install {_BACKEND_MODULE[backend]}"
        )
    return backend


def _is_architecture(spec: ModelSpec) -> bool:
    return spec.path is not None and Path(spec.path).suffix.lower() in (".yaml", ".yml")


def _int8_detector(spec: ModelSpec, device: str | None) -> Detector:
    """The bundled INT8 OpenVINO version of ``spec``, hash-checked."""
    from napari_yolocell.quantize import verify_folder

    if not spec.int8:
        raise ValueError(
            f"model {spec.name!r} has no INT8 version (only bundled models ship one; "
            "see napari_yolocell.quantize); use backend 'openvino'"
        )
    folder = Path(spec.int8["dir"])
    verify_folder(folder, spec.int8.get("sha256") or {})
    return OpenVinoDetector(spec, folder, device=device)


def make_detector(spec: ModelSpec, backend: str = "auto", device: str | None = None) -> Detector:
    """Build a detector for ``spec`` with the chosen backend.

    Parameters
    ----------
    spec : ModelSpec
        Resolved model (see :func:`napari_yolocell.models.resolve_model`).
    backend : {"auto", "torch", "onnxruntime", "openvino", "openvino-int8"}
        Forward-pass runtime; see :func:`resolve_backend`. The classical detector ignores it.
        ``"auto"`` on a CPU uses a bundled model's INT8 version when OpenVINO is installed.
        ONNX Runtime / OpenVINO run a cached export of the weights, made on first use (a few
        seconds). Untrained architectures (``"yolov5n.yaml"``) get random weights at every load,
        so they are exported to a temporary folder instead of the cache. With ``"auto"``, a
        model that cannot be exported falls back to PyTorch with a warning.
    device : str, optional
        Device for the backend (default: CUDA if available for PyTorch, else the CPU).

    Raises
    ------
    ValueError
        Unknown backend, or unreadable weights (names the file).
    ImportError
        The named backend is not installed.
    RuntimeError
        The model could not be exported for the named backend.
    """
    if spec.family == "classical":
        from napari_yolocell.classical import ClassicalDetector

        return ClassicalDetector(spec=spec)
    requested = backend
    backend = resolve_backend(backend, device)
    if backend == "torch":
        return TorchDetector(load_ultralytics(spec.path), spec, device=device)
    if backend == "openvino-int8" or (requested == "auto" and backend == "openvino" and spec.int8):
        return _int8_detector(spec, device)
    from napari_yolocell import export_cache

    fmt, cls = {
        "onnxruntime": ("onnx", OnnxRuntimeDetector),
        "openvino": ("openvino", OpenVinoDetector),
    }[backend]
    model = None
    try:
        if _is_architecture(spec):
            model = load_ultralytics(spec.path)
            keep = export_cache.temporary_export(model, fmt)
            return cls(spec, keep.name, device=device, keep=keep)
        return cls(spec, export_cache.cached_export(spec, fmt), device=device)
    except WeightsError:
        raise
    except Exception as err:  # exporters and runtimes fail in many ways: report them as one
        if requested != "auto":
            raise RuntimeError(
                f"cannot run model {str(spec.path)!r} with {backend}: {type(err).__name__}: {err}"
            ) from err
        warnings.warn(
            f"{backend} backend unavailable for {str(spec.path)!r} ({err}); using PyTorch",
            RuntimeWarning,
            stacklevel=2,
        )
    return TorchDetector(model or load_ultralytics(spec.path), spec, device=device)
