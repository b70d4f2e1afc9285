"""The swappable forward step: tiles in, boxes out.

A :class:`Detector` turns a batch of 8-bit tiles into boxes in tile pixel coordinates. The
tiling, normalisation and merging around it (:mod:`napari_yolocell.detect`) do not depend on
how the forward pass runs, so an ONNX Runtime or OpenVINO backend only has to implement
:meth:`Detector.predict` and be registered in :func:`make_detector`.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from napari_yolocell.models import ModelSpec

BACKENDS = ("torch",)


class Detector(abc.ABC):
    """Interface of every detector backend.

    Attributes
    ----------
    spec : ModelSpec
        Description of the model (normalisation, nucleus diameter, default confidence...).
    needs_overview : bool
        Whether the engine must call :meth:`prepare` with an overview of each plane.
    """

    spec: ModelSpec
    needs_overview: bool = False

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
            (H, W, 3) uint8 tiles; grey images have the same value in the three channels.
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
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        canvas[: t.shape[0], : t.shape[1]] = t
        padded.append(canvas)
    return padded, (height, width)


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
        padded, imgsz = pad_batch(tiles)
        # One call for the whole batch; tiles are grey x3, so RGB vs BGR order is moot.
        results = self.model.predict(
            padded, imgsz=list(imgsz), conf=conf, iou=iou, max_det=max_det, verbose=False,
            device=self.device, agnostic_nms=True, half=False,
        )
        out = []
        for tile, result in zip(tiles, results, strict=True):
            data = result.boxes.data.detach().cpu().numpy().astype(np.float64)
            out.append(_clip_to_tile(data[:, :6].reshape(-1, 6), tile.shape[:2]))
        return out


def load_ultralytics(path: str | Path):
    """Load an ultralytics model from a ``.pt`` checkpoint or a shipped architecture YAML.

    Loading a ``.pt`` file unpickles Python objects: only load weights you trust.

    Raises
    ------
    ValueError
        If the file cannot be read as an ultralytics model (names the file).
    """
    from napari_yolocell.ultralytics_env import import_ultralytics

    ultralytics = import_ultralytics()
    try:
        return ultralytics.YOLO(str(path), task="detect")
    except Exception as err:  # torch/pickle/zip errors vary: report them uniformly
        raise ValueError(
            f"cannot load model weights {str(path)!r}: {type(err).__name__}: {err}. "
            "Is it an ultralytics detection checkpoint (.pt)?"
        ) from err


def make_detector(spec: ModelSpec, backend: str = "torch", device: str | None = None) -> Detector:
    """Build a detector for ``spec`` with the chosen backend.

    Parameters
    ----------
    spec : ModelSpec
        Resolved model (see :func:`napari_yolocell.models.resolve_model`).
    backend : {"torch"}
        Forward-pass implementation. ONNX Runtime / OpenVINO will slot in here.
    device : str, optional
        Device for the backend.
    """
    if spec.family == "classical":
        from napari_yolocell.classical import ClassicalDetector

        return ClassicalDetector(spec=spec)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
    return TorchDetector(load_ultralytics(spec.path), spec, device=device)
