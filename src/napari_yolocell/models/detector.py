"""The detector interface: a batch of 8-bit tiles in, boxes in tile pixels out.

A :class:`Detector` turns tiles into ``(k, 6)`` arrays ``x0, y0, x1, y1, confidence, class``
(x first, as the networks emit them; the engine turns them into its y-first table). The tiling,
normalisation and merging around it (:mod:`napari_yolocell.engine.detect`) do not depend on how
the forward pass runs. This module also holds the pre/post-processing the exported runtimes
share with ultralytics' predictor (padding, scaling, decoding, NMS), in NumPy.
"""

from __future__ import annotations

import abc
import math

import numpy as np

from napari_yolocell.models.spec import ModelSpec

#: Forward-pass runtimes; ``"auto"`` is accepted too (see :func:`resolve_backend`).
#: ``"openvino-int8"`` runs a model's bundled 8-bit version
#: (:mod:`napari_yolocell.training.quantize`).
BACKENDS = ("torch", "onnxruntime", "openvino", "openvino-int8")


BACKEND_CHOICES = ("auto", *BACKENDS)
#: Column order of the ``(k, 6)`` box arrays of detectors and of the tile merge: x first, as the
#: networks emit them. Result tables are y first
#: (:data:`napari_yolocell.io.tables.DETECTION_COLUMNS`);
#: the engine turns one into the other in one place (``engine.detect._frame``).
BOX_COLUMNS = ("x0", "y0", "x1", "y1", "confidence", "class")


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
        picked = dense_nms(boxes, best[keep], iou)[:max_det]
        data = np.column_stack([boxes[picked], best[keep][picked], cls[keep][picked]])
        out.append(_clip_to_tile(data.astype(np.float64).reshape(-1, 6), tile.shape[:2]))
    return out


MAX_NMS = 30000  # ultralytics' cap on boxes entering NMS


def dense_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression (as ``torchvision.ops.nms``): kept indices, best first.

    A box is dropped when its IoU with a higher-scoring kept box is above ``iou``. Dense (each
    kept box against all the rest): fast for one tile's candidates. The plane-wide merge applies
    the same rule to 10^5 boxes with :func:`napari_yolocell.engine.merge.nms` (KD-tree pairs).
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


#: Grey level of the letterbox border of the original yolov5 / meituan YOLOv6 code.
LETTERBOX_VALUE = 114


def letterbox_batch(
    tiles: list[np.ndarray], size: tuple[int, int] | None = None, multiple: int = 32
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tiles centred on a grey (114) canvas, as the original yolov5 / meituan code pads them.

    Networks are not shift invariant below their stride, so models of those families give the
    boxes of their own code only when the image sits where that code puts it.

    Parameters
    ----------
    tiles : list of numpy.ndarray
        (H, W) or (H, W, 3) uint8 tiles.
    size : (int, int), optional
        Fixed (height, width) input; default the largest tile rounded up to ``multiple``.
    multiple : int
        Network stride.

    Returns
    -------
    batch : numpy.ndarray
        NCHW float32 in [0, 1].
    offsets : list of (int, int)
        ``(left, top)`` padding of each tile, to subtract from box coordinates.
    """
    if size is None:
        size = (
            _round_up(max(t.shape[0] for t in tiles), multiple),
            _round_up(max(t.shape[1] for t in tiles), multiple),
        )
    height, width = size
    canvases, offsets = [], []
    for tile in tiles:
        grey = tile if tile.ndim == 2 else tile[..., 0]
        dh, dw = height - grey.shape[0], width - grey.shape[1]
        top, left = int(round(dh / 2 - 0.1)), int(round(dw / 2 - 0.1))
        canvas = np.full((height, width), LETTERBOX_VALUE, np.uint8)
        canvas[top : top + grey.shape[0], left : left + grey.shape[1]] = grey
        canvases.append(canvas)
        offsets.append((left, top))
    return preprocess(canvases), offsets


def postprocess_letterboxed(
    raw: np.ndarray,
    tiles: list[np.ndarray],
    offsets: list[tuple[int, int]],
    conf: float,
    iou: float,
    max_det: int,
) -> list[np.ndarray]:
    """:func:`postprocess` for a :func:`letterbox_batch` input: boxes back in tile pixels."""
    out = []
    # boxes are clipped once they are back in tile pixels, not to the canvas
    unbounded = np.broadcast_to(np.uint8(0), (1 << 30, 1 << 30))
    for pred, tile, (left, top) in zip(raw, tiles, offsets, strict=True):
        boxes = postprocess(pred[None], [unbounded], conf, iou, max_det)[0]
        boxes[:, [0, 2]] -= left
        boxes[:, [1, 3]] -= top
        out.append(_clip_to_tile(boxes, tile.shape[:2]))
    return out


def class_names(detector: Detector) -> dict[int, str]:
    """``{class id: name}`` of a detector's model; empty when the model does not say."""
    for owner in (detector, getattr(detector, "model", None)):
        names = getattr(owner, "names", None)
        if isinstance(names, (list, tuple)):
            names = dict(enumerate(names))
        if isinstance(names, dict) and names:
            return {int(k): str(v) for k, v in names.items()}
    return {}


def resolve_class(names: dict[int, str], wanted: str | None, model: str) -> tuple[int, ...] | None:
    """The class ids to count: None (every class) for a one-class model, else ``wanted``.

    Parameters
    ----------
    names : dict
        :func:`class_names` of the model.
    wanted : str or None
        A class id or name (case-insensitive), e.g. from ``--class``.
    model : str
        The model's name, for messages.

    Raises
    ------
    ValueError
        A model of several classes without ``wanted``, or an unknown class (one line).
    """
    listed = ", ".join(f"{k} {v}" for k, v in list(names.items())[:6])
    more = ", ..." if len(names) > 6 else ""
    if wanted is None:
        if len(names) <= 1:
            return None
        raise ValueError(
            f"model {model!r} detects {len(names)} classes ({listed}{more}): choose the one "
            "to count with --class (a number or a name)"
        )
    text = str(wanted).strip()
    for k, v in names.items():
        if text == str(k) or text.lower() == v.lower():
            return (k,)
    if text.isdigit() and not names:
        return (int(text),)
    raise ValueError(f"model {model!r} has no class {text!r}; its classes: {listed}{more}")
