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

from napari_yolocell.models.detector import (
    Detector,
    _clip_to_tile,
    as_rgb,
    default_device,
    pad_batch,
    postprocess,
    preprocess,
)
from napari_yolocell.models.export_cache import model_file, read_meta
from napari_yolocell.models.spec import ModelSpec


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
