"""The forward-pass runtimes behind the detector interface
(:class:`~napari_yolocell.models.detector.Detector`).

- :class:`TorchDetector`: PyTorch via ``YOLO.predict`` (CPU or CUDA);
- :class:`OnnxRuntimeDetector`: ONNX Runtime on an ONNX export of the same weights;
- :class:`OpenVinoDetector`: OpenVINO on an IR export (fastest on x86 CPUs).

The exported backends feed the network exactly what ultralytics' predictor feeds PyTorch
(tiles zero-padded bottom/right to a multiple of 32, grey x3, /255, NCHW float32) and decode
its raw output the way ultralytics' ``non_max_suppression`` does (same steps, same arguments),
so their boxes match PyTorch's up to float rounding. Exports are made once per weights file and
cached (:mod:`napari_yolocell.models.export_cache`); :mod:`napari_yolocell.models.loading`
picks the backend.
"""

from __future__ import annotations

import abc
import collections
import threading
from pathlib import Path
from typing import Any

import numpy as np

from napari_yolocell.models import export_checks, int8_cache
from napari_yolocell.models.detector import (
    Detector,
    _clip_to_tile,
    as_rgb,
    default_device,
    letterbox_batch,
    pad_batch,
    postprocess,
    postprocess_letterboxed,
    preprocess,
)
from napari_yolocell.models.export_cache import model_file, read_meta
from napari_yolocell.models.integrity import verify_folder
from napari_yolocell.models.spec import ModelSpec, WeightsError


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

        self.spec = spec
        self.folder = Path(folder)
        self.device = device or "cpu"
        self.threads = threads or _num_threads()
        self.model = ExportInfo(self.folder, read_meta(self.folder))
        self._keep = keep  # a TemporaryDirectory to keep alive (untrained YAML exports)
        self._open()

    @abc.abstractmethod
    def _open(self) -> None:
        """Start the runtime on :attr:`model_path` (called once by ``__init__``)."""

    @property
    def model_path(self) -> Path:
        """The file the runtime loaded."""

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
        if self.model.meta.get("family", "ultralytics") != "ultralytics":
            batch, offsets = letterbox_batch(tiles)
            return postprocess_letterboxed(self.forward(batch), tiles, offsets, conf, iou, max_det)
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
        Export folder holding ``model.onnx`` (see :mod:`napari_yolocell.models.export_cache`).
    device : str, optional
        ``"cpu"`` (default) or ``"cuda[:N]"`` (needs the ``onnxruntime-gpu`` build).
    threads : int, optional
        CPU threads per forward pass; default torch's setting (all physical cores).
    """

    fmt = "onnx"

    def _open(self) -> None:
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

    def _open(self) -> None:
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


def int8_detector(
    spec: ModelSpec, device: str | None = None, required: bool = False
) -> OpenVinoDetector | None:
    """The INT8 version of ``spec``, or None when FP32 should run.

    A bundled model's shipped INT8 folder (hash-checked), else the user's cached one
    (:mod:`~napari_yolocell.models.int8_cache`) if it passed its check against FP32. One that
    failed is not used: None, and the user is told once.

    Raises
    ------
    ValueError
        ``required`` and the model was never quantized (the message says how to).
    """
    if spec.int8:
        folder = Path(spec.int8["dir"])
        verify_folder(folder, spec.int8.get("sha256") or {})
        return OpenVinoDetector(spec, folder, device=device)
    entry = int8_cache.lookup(spec)
    if entry is not None and entry.used:
        return OpenVinoDetector(spec, entry.folder, device=device)
    if entry is not None:
        int8_cache.tell_fp32_once(spec, entry)
    elif required:
        raise ValueError(
            f"model {spec.name!r} has no INT8 version yet: make one with "
            f"`yolocell quantize {spec.path or spec.name}` (or use backend 'openvino')"
        )
    return None


class ModuleDetector(Detector):
    """Runs a ``torch.nn.Module`` whose output is ``(N, 4 + nc, anchors)`` with PyTorch.

    Classic YOLOv5 and meituan YOLOv6 networks
    (:func:`napari_yolocell.models.checkpoints.load_network`) take this path: tiles letterboxed
    as their original code does (:func:`letterbox_batch`), NumPy post-processing.
    """

    grey_tiles = True

    def __init__(self, model, spec: ModelSpec, device: str | None = None) -> None:
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.spec = spec

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Raw network output ``(N, 4 + nc, anchors)`` for an NCHW float32 batch in [0, 1]."""
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch).to(self.device))
        return out.detach().cpu().float().numpy()

    def predict(
        self, tiles: list[np.ndarray], conf: float, iou: float, max_det: int
    ) -> list[np.ndarray]:
        """Batched forward pass; see :meth:`Detector.predict`."""
        if not tiles:
            return []
        batch, offsets = letterbox_batch(tiles)
        return postprocess_letterboxed(self.forward(batch), tiles, offsets, conf, iou, max_det)


#: Output layouts of exported models given as ``--model file.onnx`` (or an IR folder).
LAYOUT_LABELS = {
    "xywh-cls": "ultralytics [1, 4 + nc, N], no NMS",
    "xywh-obj-cls": "YOLOv5/YOLOv6 [1, N, 5 + nc] with objectness, no NMS",
    "xyxy-score-cls": "boxes after NMS [1, N, 6] (x0, y0, x1, y1, score, class)",
}


def _grid_anchors(height: int, width: int, strides=(8, 16, 32)) -> set[int]:
    cells = sum((height // s) * (width // s) for s in strides)
    return {cells, 3 * cells}  # anchor-free heads: 1 per cell; yolov5: 3 anchors per cell


def detect_layout(shape, input_hw, metadata: dict[str, str]) -> str:
    """Output layout of an exported detector from its output shape, input size and metadata.

    Raises
    ------
    ValueError
        A layout none of the supported ones matches.
    """
    dims = [d if isinstance(d, int) else -1 for d in shape]
    if len(dims) != 3:
        raise ValueError(f"unknown output layout {list(shape)} (expected 3 dimensions)")
    _, a, b = dims
    end2end = str(metadata.get("end2end", metadata.get("nms", ""))).lower() == "true"
    expected = _grid_anchors(*input_hw) if -1 not in input_hw else set()
    if b == 6 and (end2end or (a > 0 and expected and a not in expected)):
        return "xyxy-score-cls"
    if b >= 6 and (a in expected or a == -1 or a > b):
        return "xywh-obj-cls"
    if a >= 5 and (b in expected or b == -1 or b > a):
        return "xywh-cls"
    raise ValueError(f"unknown output layout {list(shape)}")


def to_scores_layout(raw: np.ndarray, layout: str) -> np.ndarray:
    """Raw output of ``layout`` -> ``(N, 4 + nc, anchors)`` (scores = objectness x class)."""
    raw = np.asarray(raw, dtype=np.float32)
    if layout == "xywh-cls":
        return raw
    if layout == "xywh-obj-cls":
        return np.concatenate([raw[..., :4], raw[..., 4:5] * raw[..., 5:]], -1).transpose(0, 2, 1)
    raise ValueError(f"no raw scores in layout {layout!r}")


class ForeignExportDetector(Detector):
    """An ONNX file or OpenVINO IR folder made elsewhere (yolov5's / meituan's / ultralytics'
    exporters), run with ONNX Runtime or OpenVINO.

    The runtime is opened from the bytes :func:`~napari_yolocell.models.export_checks.check_export`
    read and checked, never from the path again. Each tile is letterboxed (centred on grey 114,
    as the original exporters' code does) to a static input size (e.g. 640 x 640; larger tiles
    are refused: pass a smaller ``--tile``), or for a dynamic input to a multiple of 32 (at most
    :data:`~napari_yolocell.models.export_checks.MAX_SIDE`). ONNX Runtime runs in a capped
    memory arena; OpenVINO is compiled per input shape, after a check of every tensor's size at
    that shape. The output layout is detected by :func:`detect_layout`.

    Parameters
    ----------
    spec : ModelSpec
        The model's description.
    checked : CheckedExport or path
        What :func:`~napari_yolocell.models.export_checks.check_export` returned (a path is
        read and checked here first).
    device : str, optional
        Ignored: foreign exports run on the CPU.
    """

    grey_tiles = True
    max_compiled = 4

    def __init__(self, spec: ModelSpec, checked, device: str | None = None) -> None:
        if not isinstance(checked, export_checks.CheckedExport):
            checked = export_checks.check_export(checked)
        self.spec = spec
        self.path = checked.path
        self.device = device or "cpu"
        if checked.kind == "openvino":
            self._init_openvino(checked)
        else:
            self._init_onnx(checked)
        self.layout = detect_layout(self.output_shape, self.input_hw, self.metadata)
        self.names = _parse_names(self.metadata.get("names"))
        self.model = None
        self.description = LAYOUT_LABELS[self.layout]

    def _init_onnx(self, checked: export_checks.CheckedExport) -> None:
        import onnxruntime as ort

        options = export_checks.capped_ort_options(_num_threads())
        self.session = ort.InferenceSession(checked.model, options, ["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_hw = tuple(d if isinstance(d, int) else -1 for d in inp.shape[2:4])
        self.output_shape = self.session.get_outputs()[0].shape
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        run_options = export_checks.ort_run_options()
        self._run = lambda batch: self.session.run(None, {self.input_name: batch}, run_options)[0]

    def _init_openvino(self, checked: export_checks.CheckedExport) -> None:
        import openvino as ov

        self._core = ov.Core()
        # from memory: model=XML bytes, weights=a Tensor (never a path; with weights=None a
        # str would be read as a file name)
        weights = ov.Tensor(np.frombuffer(checked.weights, np.uint8))
        network = self._core.read_model(model=checked.model, weights=weights)
        shape = network.inputs[0].get_partial_shape()
        self.input_hw = tuple(d.get_length() if d.is_static else -1 for d in list(shape)[2:4])
        out = network.outputs[0].get_partial_shape()
        self.output_shape = [d.get_length() if d.is_static else -1 for d in out]
        self.metadata = {}
        try:
            info = network.get_rt_info()
            meta = info["model_info"] if "model_info" in info else {}
            self.metadata = {k: str(meta[k]) for k in meta} if hasattr(meta, "__iter__") else {}
        except Exception:  # rt_info layouts vary between exporters: metadata is optional
            self.metadata = {}
        self._network = network
        self._compiled: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        if shape.is_static:  # compiled (and checked) now, so a refusal comes at load
            self._compiled_for(tuple(d.get_length() for d in shape))
        self._run = lambda batch: self._run_openvino(batch)

    def _compiled_for(self, shape: tuple[int, ...]):
        """The network compiled for one static input shape, its tensors checked first."""
        if shape in self._compiled:
            self._compiled.move_to_end(shape)
            return self._compiled[shape]
        network = self._network
        if not network.inputs[0].get_partial_shape().is_static:
            network = network.clone()
            network.reshape({0: list(shape)})
        export_checks.check_openvino_tensors(self.path, network)
        compiled = self._core.compile_model(network, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self._compiled[shape] = compiled
        while len(self._compiled) > self.max_compiled:
            self._compiled.popitem(last=False)
        return compiled

    def _run_openvino(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            compiled = self._compiled_for(tuple(batch.shape))
            return np.array(compiled(batch)[0], dtype=np.float32, copy=True)

    def predict(
        self, tiles: list[np.ndarray], conf: float, iou: float, max_det: int
    ) -> list[np.ndarray]:
        """One forward pass per tile (exported files often have a fixed batch of 1)."""
        out = []
        for tile in tiles:
            batch, offsets = self._input(tile)
            raw = self._forward(batch)
            if self.layout == "xyxy-score-cls":
                data = np.asarray(raw, np.float64)[0].reshape(-1, 6)
                data = data[data[:, 4] > conf][:max_det]
                data[:, [0, 2]] -= offsets[0][0]
                data[:, [1, 3]] -= offsets[0][1]
                out.append(_clip_to_tile(data, tile.shape[:2]))
            else:
                scores = to_scores_layout(raw, self.layout)
                out.extend(postprocess_letterboxed(scores, [tile], offsets, conf, iou, max_det))
        return out

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """The raw output, runtime failures (a capped allocation...) as one line."""
        try:
            return self._run(batch)
        except WeightsError:
            raise
        except Exception as err:  # runtimes' messages can quote the file: the type only
            reason = "its memory limit was reached" if _out_of_budget(err) else "it failed"
            raise WeightsError(
                f"exported model {str(self.path)!r} cannot run on a {batch.shape[3]}x"
                f"{batch.shape[2]} input: {reason} ({type(err).__name__})"
            ) from None

    def _input(self, tile: np.ndarray) -> np.ndarray:
        height, width = self.input_hw
        if height == -1 or width == -1:
            side = export_checks.MAX_SIDE
            if max(tile.shape[:2]) > side:  # bounds what a dynamic graph is run at
                raise ValueError(
                    f"model {str(self.path)!r} runs tiles of at most {side} px: use a smaller "
                    "tile (--tile)"
                )
            return letterbox_batch([tile])
        if tile.shape[0] > height or tile.shape[1] > width:
            raise ValueError(
                f"model {str(self.path)!r} takes {width}x{height} inputs: use a tile of at most "
                f"{min(height, width)} px (--tile)"
            )
        return letterbox_batch([tile], size=(height, width))


def _out_of_budget(err: Exception) -> bool:
    text = str(err)
    return "bfc_arena" in text or "Available memory" in text or "memory limit" in text


def _parse_names(text) -> dict[int, str]:
    """``"{0: 'Nucleus'}"`` (exporters' metadata) -> ``{0: "Nucleus"}``; {} if unreadable."""
    import ast

    try:
        value = ast.literal_eval(text) if isinstance(text, str) else text
    except (ValueError, SyntaxError):
        return {}
    if isinstance(value, (list, tuple)):
        value = dict(enumerate(value))
    return {int(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
