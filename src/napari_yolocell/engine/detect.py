"""Tiled detection engine: any-size image in, one table of nuclei out.

For each 2-D plane of the image: compute the normalisation range on a sub-sample, cut the plane
into overlapping tiles (:func:`~napari_yolocell.engine.tiling.tile_grid`), read each tile's window
only (lazy arrays stay lazy, memory is flat in image size), run them through the detector in
batches, then merge exactly across tile borders (:mod:`napari_yolocell.engine.merge`).

:func:`iter_detect` is a generator yielding ``(done_tiles, total_tiles)`` and returning the
table, for napari ``thread_worker``; :func:`detect_image` drives it with a ``progress``
callback (the CLI's tqdm bar).

Image layout: the last two axes are Y, X, except for RGB(A) images (last axis of length 3 or 4,
guessed like napari, or ``rgb=True``) where Y, X come just before it. RGB is converted to grey
with the maximum over the colour channels (fluorescence nuclei are bright in their own colour),
or ``DetectParams.channel`` picks one colour. A channel axis (``channel_axis``) needs
``DetectParams.channel``. All other axes (Z, T...) are planes, run one after the other and
numbered in C order (``plane`` column; ``df.attrs["plane_shape"]`` unravels it).

NaN pixels are treated as background (0 after normalisation), with a warning. A constant image
gives no detections.

Empty tiles (``DetectParams.skip_empty``): on slides that are mostly background, tiles in which
no pixel is brighter than the background are skipped without running the detector (nor, for
pyramidal files, reading their full-resolution pixels); see :func:`empty_threshold`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
import warnings
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from napari_yolocell.engine.merge import merge_tiles
from napari_yolocell.engine.normalize import (
    check_mode,
    clip_uint8,
    level_counts,
    order_statistics,
    percentile_range,
    sample_stride,
    strided_sample,
    uint8_mapping,
)
from napari_yolocell.engine.postprocess import small_object_mask
from napari_yolocell.engine.size import AUTO_HIGH, auto_diameter, estimate_diameter
from napari_yolocell.engine.tiling import Tile, tile_grid
from napari_yolocell.io.chunk_cache import MAX_CHUNK_BYTES, ChunkCache, chunk_bounds
from napari_yolocell.io.tables import DETECTION_COLUMNS
from napari_yolocell.models.detector import Detector, as_rgb
from napari_yolocell.models.loading import load_detector
from napari_yolocell.models.spec import ModelSpec

COLUMNS = DETECTION_COLUMNS  # the engine's table; defined with the CSVs' in io.tables
#: Boolean column of detections kept in the table but not counted as nuclei
#: (:attr:`DetectParams.min_relative_area`).
SMALL_COLUMN = "small"
STATS_MAX_PIXELS = 2_000_000
# Pyramid levels smaller than this are too coarse for reliable percentiles.
STATS_MIN_PIXELS = 250_000
# Empty-tile skipping is only trusted when the overview is mostly background and its nuclei
# stand clearly above it (see empty_threshold).
SKIP_MIN_BACKGROUND = 0.5
SKIP_MIN_CONTRAST = 20.0
# A coarser pyramid level may decide emptiness only if the smallest expected nucleus (half the
# typical diameter) still spans >= 2 of its pixels, so no nucleus vanishes by downsampling.
SKIP_PIXELS_PER_DIAMETER = 4.0
SKIP_MARGIN = 2
# Skip level: this fraction of the way from the background median up to the nuclei's mean.
SKIP_THRESHOLD_FRACTION = 0.25

Cancel = Callable[[], bool] | threading.Event | None


class Cancelled(RuntimeError):
    """Raised when a ``cancel`` callable / event asks a long core call to stop.

    The one cancellation type of the core: detection raises it, and so does
    :func:`~napari_yolocell.engine.batch.run_batch` (as ``BatchCancelled``, the same class).
    """


#: Detection was cancelled (the same class as :class:`Cancelled`).
DetectionCancelled = Cancelled


def _param(default, help: str):
    """A :class:`DetectParams` field whose help text the CLI and the widget show."""
    return field(default=default, metadata={"help": help})


def param_help(name: str) -> str:
    """Help text of a :class:`DetectParams` field (one source for CLI options and tooltips)."""
    return next(f.metadata.get("help", "") for f in fields(DetectParams) if f.name == name)


@dataclass
class DetectParams:
    """Detection settings. ``None`` means "derive it" (see :func:`resolve_params`).

    Attributes
    ----------
    tile : int
        Tile side, in pixels of the analysed image level.
    overlap : int or None
        Overlap of neighbouring tiles in pixels; must exceed the largest nucleus. None:
        ``max(32, ceil(3 * d))`` with ``d`` the typical nucleus diameter at the analysed level
        (``diameter`` if given, else the model's ``diameter_px``), at most ``tile // 2``.
    conf : float or None
        Minimum confidence; None = the model's ``default_conf``.
    iou : float
        IoU threshold of the non-maximum suppression.
    max_det : int
        Maximum detections per tile.
    channel : int or None
        Channel to analyse (channel axis or RGB colour).
    normalize : {"percentile", "none"} or None
        None = the model's own (it must match how its training images were made).
    percentiles : tuple of float or None
        (low, high) for percentile normalisation; None = the model's.
    diameter : float or None
        Typical nucleus diameter in the image, in the pixels ``diameter_pixels`` names
        (default: full-resolution, level-0 pixels, whatever ``level`` is analysed). When given,
        tiles are resized by ``model.diameter_px / diameter`` (at the analysed level) before
        the forward pass (boxes are mapped back), so a model trained on ~20 px nuclei finds
        60 px nuclei.
    diameter_pixels : {"full", "level"}
        Which pixels ``diameter`` counts: ``"full"`` (level 0) or ``"level"`` (the analysed
        ``level``). On level 1 of a 2x pyramid, 20 px nuclei are ``diameter=20`` or
        ``diameter=10, diameter_pixels="level"``: both give the same tiles and count.
    planes : bool
        The image's leading axis is unlabelled (a plain multi-page TIFF: tifffile says ``Q``
        or ``I``) and 2-4 long, so it may hold channels as well as planes: say they are planes
        (Z, T...). Without it (or ``channel``) such an image is refused, never guessed
        (:func:`image_channel_axis`).
    batch : int
        Tiles per forward pass (larger is faster on a GPU, uses more memory).
    level : int
        Pyramid level to analyse for multiscale input (0 = full resolution).
    ios : float or None
        Intersection-over-smaller clean-up threshold; None skips it.
    margin : float
        A box within this many model-input pixels of a shared tile side is dropped.
    skip_empty : bool
        Skip tiles in which no pixel is brighter than the background (whole-slide images are
        often mostly empty). Only applied when the plane clearly has a background mode (see
        :func:`empty_threshold`); skipped tiles are counted in ``df.attrs["skipped_tiles"]``.
    auto_diameter : bool
        With ``diameter`` None: measure the typical nucleus size on an overview of the (first)
        plane (:func:`napari_yolocell.engine.size.estimate_diameter`) and, only if it is far
        outside the model's range, use it as ``diameter``. ``df.attrs`` reports
        ``measured_diameter`` and the ``diameter`` used (None = the model's scale). A model
        fine-tuned on a lab's images (``ModelSpec.lab_diameter_px`` set) is used at that lab's
        scale instead (the estimate can fail on dim + saturated images), unless the image's
        nuclei measure over ``LAB_SCALE_TOLERANCE`` times larger or smaller than the lab's
        (another objective): then the automatic size applies, with a warning.
    classes : tuple of int or None
        Keep only detections of these classes (a model trained on several classes, e.g.
        COCO's 80); None keeps every class.
    min_relative_area : float
        Size consistency (:func:`napari_yolocell.engine.postprocess.small_object_mask`): a
        detection whose box area is under this fraction of the median area of the plane's
        confident detections (away from the image edge) is flagged in an extra boolean column
        ``small`` and not counted by :func:`count_per_plane` (micronucleus assays can still
        count them). 0 (default): off, and no ``small`` column. On held-out sources 0.25 removes
        most over-counting by micronuclei and debris, but BBBC039's truth counts small nuclei,
        so it is not the default (``docs/models.md``).
    """

    tile: int = _param(640, "tile side in pixels (default 640)")
    overlap: int | None = _param(
        None, "tile overlap in px; default 3x the typical nucleus diameter"
    )
    conf: float | None = _param(None, "confidence threshold; default: the model's calibrated one")
    iou: float = _param(0.5, "NMS IoU threshold (default 0.5)")
    max_det: int = 1000
    channel: int | None = _param(None, "channel index for multichannel")
    normalize: str | None = _param(
        None, "intensity normalisation; default: what the model was trained with"
    )
    percentiles: tuple[float, float] | None = None
    diameter: float | None = None
    diameter_pixels: str = _param(
        "full",
        "pixels --diameter counts on a pyramid --level: full (default) = full-resolution "
        "(level 0) pixels, level = pixels of the analysed level",
    )
    planes: bool = _param(
        False,
        "an unlabelled leading axis of 2-4 (a plain multi-page TIFF) holds planes (Z, T...), "
        "not channels; without this (or --channel) such a file is refused, never guessed",
    )
    batch: int = _param(8, "tiles per forward pass")
    level: int = _param(0, "pyramid level (0 = full resolution)")
    ios: float | None = 0.7
    margin: float = 2.0
    skip_empty: bool = True
    auto_diameter: bool = True
    min_relative_area: float = _param(
        0.0,
        "do not count detections under this fraction of the image's typical nucleus area (e.g. "
        "0.25: micronuclei, debris); they stay in the table flagged small; 0 (default) = off",
    )
    classes: tuple[int, ...] | None = _param(
        None, "class ids to keep (models with several classes); default: every class"
    )


def derive_overlap(diameter: float, tile: int) -> int:
    """Default overlap: 3x the typical diameter (so nuclei up to ~2.5x the typical size are
    seen whole by a neighbour tile and the border merge stays exact), at least 32 px, at most
    half a tile."""
    return int(min(max(32, math.ceil(3 * diameter)), tile // 2))


def resolve_params(
    params: DetectParams | None, spec, level_factor: float = 1.0
) -> tuple[DetectParams, float]:
    """Fill the ``None`` fields of ``params`` from the model and return the resize factor.

    Parameters
    ----------
    params : DetectParams or None
        User settings.
    spec : ModelSpec
        The detector's model description.
    level_factor : float
        Full-resolution pixels per pixel of the analysed level.

    Returns
    -------
    params : DetectParams
        Copy with every derivable field set.
    scale : float
        Factor applied to tiles before the forward pass (1.0 = none).
    """
    params = dataclasses.replace(params or DetectParams())
    if params.tile < 32:
        raise ValueError(f"tile must be at least 32 px, got {params.tile}")
    if params.batch < 1:
        raise ValueError(f"batch must be >= 1, got {params.batch}")
    if params.diameter is not None and not params.diameter > 0:
        raise ValueError(f"diameter must be positive, got {params.diameter}")
    params = full_resolution_diameter(params, level_factor)
    scale, expected = 1.0, float(spec.diameter_px)
    if params.diameter is not None:
        expected = params.diameter / level_factor
        scale = float(spec.diameter_px) / expected
    if params.overlap is None:
        params.overlap = derive_overlap(expected, params.tile)
    if params.conf is None:
        params.conf = float(spec.default_conf)
    params.normalize = check_mode(params.normalize or spec.normalize)
    if params.percentiles is None:
        params.percentiles = tuple(spec.percentiles)
    return params, scale


#: Values of :attr:`DetectParams.diameter_pixels`.
DIAMETER_PIXELS = ("full", "level")


def full_resolution_diameter(params: DetectParams, level_factor: float) -> DetectParams:
    """``params`` with ``diameter`` in full-resolution pixels (``diameter_pixels="full"``).

    Parameters
    ----------
    params : DetectParams
        Settings whose ``diameter`` may count pixels of the analysed level.
    level_factor : float
        Full-resolution pixels per pixel of the analysed level.

    Returns
    -------
    DetectParams
        A copy (or ``params`` itself when nothing changes).
    """
    if params.diameter_pixels not in DIAMETER_PIXELS:
        raise ValueError(
            f"diameter_pixels must be one of {', '.join(DIAMETER_PIXELS)}, "
            f"got {params.diameter_pixels!r}"
        )
    if params.diameter_pixels == "full":
        return params
    diameter = None if params.diameter is None else params.diameter * level_factor
    return dataclasses.replace(params, diameter=diameter, diameter_pixels="full")


# ---------------------------------------------------------------------------------------------
# Image layout

#: tifffile's codes of axes whose meaning the file does not state (Q: unknown, I: a sequence).
UNLABELLED_AXES = "QI"
#: An unlabelled leading axis this long may hold channels (stain + markers) as well as planes.
AMBIGUOUS_LENGTHS = range(2, 5)


def unlabelled_axis(
    shape: Sequence[int], axes: str | None, channel_axis: int | None = None, rgb: bool | None = None
) -> int | None:
    """The leading axis when its meaning is unknown and it could be channels, else None.

    Parameters
    ----------
    shape : sequence of int
        Full-resolution shape.
    axes : str or None
        tifffile axis codes (``"QYX"``...); None: the caller states nothing (every extra axis
        is a plane, as for a plain array).
    channel_axis : int, optional
        A channel axis the file labels (then nothing is ambiguous).
    rgb : bool, optional
        Whether the last axis is colour; None guesses as :func:`detect_image` does.

    Returns
    -------
    int or None
        0 when ``axes[0]`` is unlabelled (:data:`UNLABELLED_AXES`) and 2-4 long, else None.
    """
    if axes is None or channel_axis is not None or len(axes) != len(shape):
        return None
    if rgb is None:
        rgb = len(shape) >= 3 and shape[-1] in (3, 4)
    if len(shape) <= (3 if rgb else 2):
        return None
    if axes[0] in UNLABELLED_AXES and int(shape[0]) in AMBIGUOUS_LENGTHS:
        return 0
    return None


def channel_refusal(n: int, axis: int, unlabelled: bool = False) -> str:
    """The one line refusing an image whose channel was not chosen (CLI and widgets)."""
    line = (
        f"image has {n} channels (axis {axis}): choose the nuclear stain's "
        "(--channel C; widget: channel)"
    )
    if unlabelled:
        line += "; if they are planes (Z, T...), say so (--planes; widget: channel = planes)"
    return line


def image_channel_axis(
    shape: Sequence[int],
    axes: str | None,
    channel_axis: int | None,
    rgb: bool | None,
    params: DetectParams,
) -> int | None:
    """The channel axis detection uses: the file's, or an unlabelled axis ``params`` names.

    An unlabelled leading axis of 2-4 (:func:`unlabelled_axis`) is a channel axis when
    ``params.channel`` is given, planes when ``params.planes`` is; with neither it is refused.

    Raises
    ------
    ValueError
        An ambiguous axis that neither ``channel`` nor ``planes`` resolves (one line, see
        :func:`channel_refusal`), or both given for it.
    """
    axis = unlabelled_axis(shape, axes, channel_axis, rgb)
    if axis is None:
        return channel_axis
    if params.channel is not None and params.planes:
        raise ValueError(
            f"axis {axis} cannot be channels (--channel) and planes (--planes) at once"
        )
    if params.channel is not None:
        return axis
    if params.planes:
        return None
    raise ValueError(channel_refusal(int(shape[axis]), axis, unlabelled=True))


@dataclass
class _Layout:
    levels: list
    y_axis: int
    x_axis: int
    rgb: bool
    channel_axis: int | None
    plane_axes: tuple[int, ...]
    plane_shape: tuple[int, ...]


def _as_levels(image) -> list:
    if isinstance(image, (list, tuple)) and image and all(hasattr(a, "shape") for a in image):
        return list(image)
    if hasattr(image, "shape") and hasattr(image, "dtype"):
        return [image]
    return [np.asarray(image)]


def _check_array(arr) -> None:
    shape = tuple(arr.shape)
    if len(shape) < 2:
        raise ValueError(f"need an image with at least 2 dimensions (Y, X), got shape {shape}")
    if 0 in shape:
        raise ValueError(f"image is empty (shape {shape})")
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "biuf":
        raise ValueError(f"unsupported image data type {dtype}; need integer, float or bool")


def _layout(image, channel_axis: int | None, rgb: bool | None) -> _Layout:
    levels = _as_levels(image)
    for arr in levels:
        _check_array(arr)
    ndim = len(levels[0].shape)
    if any(len(a.shape) != ndim for a in levels):
        raise ValueError("all pyramid levels must have the same number of dimensions")
    if channel_axis is not None:
        if not -ndim <= channel_axis < ndim:
            raise ValueError(f"channel_axis {channel_axis} out of range for {ndim}-D image")
        channel_axis %= ndim
    if rgb is None:
        rgb = channel_axis is None and ndim >= 3 and levels[0].shape[-1] in (3, 4)
    y_axis, x_axis = (ndim - 3, ndim - 2) if rgb else (ndim - 2, ndim - 1)
    if y_axis < 0:
        raise ValueError(f"an RGB image needs shape (..., Y, X, 3|4), got {levels[0].shape}")
    if channel_axis in (y_axis, x_axis) or (rgb and channel_axis == ndim - 1):
        raise ValueError(f"channel_axis {channel_axis} cannot be a Y/X/colour axis")
    skip = {y_axis, x_axis, channel_axis} | ({ndim - 1} if rgb else set())
    plane_axes = tuple(a for a in range(ndim) if a not in skip)
    plane_shape = tuple(int(levels[0].shape[a]) for a in plane_axes)
    return _Layout(levels, y_axis, x_axis, rgb, channel_axis, plane_axes, plane_shape)


def _materialise(window) -> np.ndarray:
    """A window of a (lazy) array as numpy. Dask windows are computed in this thread: the
    default scheduler may be a dask.distributed cluster (inside `--scheduler` tasks), whose
    workers are busy running this very detection, so submitting reads there deadlocks."""
    compute = getattr(window, "compute", None)
    if compute is not None and hasattr(window, "dask"):
        return np.asarray(compute(scheduler="synchronous"))
    return np.asarray(window)


class PlaneView:
    """Lazy 2-D (Y, X) view of one plane / channel of an nD array.

    ``view[ys, xs]`` reads only that window from the underlying array, in one ``__getitem__``,
    and returns a numpy array (RGB reduced to one grey or colour channel). With ``cached``,
    step-1 windows of a chunked array are assembled from decoded chunks kept for the next
    overlapping tiles (:class:`~napari_yolocell.io.chunk_cache.ChunkCache`).
    """

    def __init__(
        self,
        array,
        layout: _Layout,
        plane_index: tuple[int, ...],
        channel: int | None,
        cached: bool = False,
    ) -> None:
        self.array = array
        self.layout = layout
        self.channel = channel
        template: list = [slice(None)] * len(array.shape)
        for axis, index in zip(layout.plane_axes, plane_index, strict=True):
            template[axis] = index
        if layout.channel_axis is not None:
            template[layout.channel_axis] = channel
        self.template = template
        self.shape = (int(array.shape[layout.y_axis]), int(array.shape[layout.x_axis]))
        self.cache = self._make_cache() if cached else None

    def _make_cache(self) -> ChunkCache | None:
        # A dask array made by our TIFF reader names the zarr array it wraps: reading that
        # directly saves building and running a dask graph for every chunk.
        source = getattr(self.array, "yolocell_source", None)
        if source is None or tuple(source.shape) != tuple(self.array.shape):
            source = self.array
        y_edges = chunk_bounds(source, self.layout.y_axis)
        x_edges = chunk_bounds(source, self.layout.x_axis)
        if y_edges is None or x_edges is None:
            return None  # numpy: already in memory
        depth = 3 if self.layout.rgb and self.channel is None else 1
        itemsize = np.dtype(source.dtype).itemsize
        largest = int(np.diff(y_edges).max()) * int(np.diff(x_edges).max()) * depth * itemsize
        if largest > MAX_CHUNK_BYTES:
            return None
        return ChunkCache(lambda ys, xs: self._read(ys, xs, source), y_edges, x_edges)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        if self.cache is not None and all(k.step in (None, 1) for k in key):
            return self.cache[key]
        return self._read(*key)

    def _read(self, ys: slice, xs: slice, array=None) -> np.ndarray:
        key = (ys, xs)
        index = list(self.template)
        index[self.layout.y_axis], index[self.layout.x_axis] = key
        data = _materialise((self.array if array is None else array)[tuple(index)])
        if self.layout.rgb:
            data = data[..., self.channel] if self.channel is not None else data[..., :3].max(-1)
        return data


def _check_channel(layout: _Layout, channel: int | None) -> None:
    arr = layout.levels[0]
    if layout.channel_axis is not None:
        n = int(arr.shape[layout.channel_axis])
        if channel is None:
            if n == 1:
                return
            raise ValueError(
                f"image has {n} channels (axis {layout.channel_axis}): choose the "
                "nuclear stain's (--channel C; widget: channel)"
            )
        if not 0 <= channel < n:
            raise ValueError(f"channel {channel} out of range: the image has {n} channels")
    elif layout.rgb and channel is not None and not 0 <= channel < 3:
        raise ValueError(f"channel {channel} out of range for an RGB image (0, 1, 2)")
    elif not layout.rgb and channel is not None and (channel != 0 or layout.plane_axes):
        # channel 0 of a single grey plane is that plane; of planes it would be ignored
        raise ValueError(f"channel {channel} given but the image has no channel axis")


# ---------------------------------------------------------------------------------------------
# Per-plane processing


def _stats_level(layout: _Layout, level: int) -> int:
    """Coarsest pyramid level (at or below ``level``) still big enough for percentiles."""
    best = level
    ref = layout.levels[level].shape
    for index in range(level + 1, len(layout.levels)):
        arr = layout.levels[index]
        same_planes = all(arr.shape[a] == ref[a] for a in layout.plane_axes)
        if same_planes and arr.shape[layout.y_axis] * arr.shape[layout.x_axis] >= STATS_MIN_PIXELS:
            best = index
    return best


def _normalizer(
    view: PlaneView,
    stats_view: PlaneView,
    params: DetectParams,
    detector: Detector,
    sample: np.ndarray | None = None,
) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray | None]:
    """Plane-wide intensity mapping to uint8 and the normalised overview (if one was read).

    ``sample``: the strided overview of ``stats_view`` if already read. Also primes detectors
    that need an overview.
    """
    needs_overview = getattr(detector, "needs_overview", False)
    if params.normalize == "none":

        def norm(tile):
            return clip_uint8(tile)

        # The sample is not needed for this mapping: read it for skipping only when it is cheap
        # (a pyramid level), never as an extra pass over a full-resolution plane.
        wanted = needs_overview or (params.skip_empty and stats_view.array is not view.array)
        if sample is None and wanted:
            sample = strided_sample(stats_view, STATS_MAX_PIXELS)
    else:
        if sample is None:
            sample = strided_sample(stats_view, STATS_MAX_PIXELS)
        lo, hi = percentile_range(sample, *params.percentiles, max_pixels=sample.size + 1)
        norm = uint8_mapping(lo, hi)

    overview = None if sample is None else norm(sample)
    if needs_overview:
        detector.prepare(overview)
    return norm, overview


def empty_threshold(overview: np.ndarray | None) -> float | None:
    """Grey level at or below which a tile is background only, or None if unsafe to skip.

    Otsu's threshold splits the normalised overview into background and nuclei. Skipping is
    only trusted when at least half the overview is background and the nuclei's mean stands
    at least ``SKIP_MIN_CONTRAST`` grey levels above the background's median (a clear
    background mode); a constant, noise-only or dense image skips nothing. The returned level
    lies only ``SKIP_THRESHOLD_FRACTION`` (a quarter) of the way from the background median
    to the nuclei's mean, so a nucleus several times dimmer than the typical one still keeps
    its tile (bright noise may keep an empty tile: the safe side).
    """
    if overview is None or overview.size == 0:
        return None
    values = np.asarray(overview).ravel()
    if values.min() == values.max():
        return None
    from skimage.filters import threshold_otsu

    hist = level_counts(values)
    if hist is None:
        otsu = float(threshold_otsu(values))
        below = values <= otsu
        n_below = int(below.sum())
        if n_below < SKIP_MIN_BACKGROUND * values.size or n_below == values.size:
            return None
        level = float(np.median(values[below]))
        nuclei = float(values[~below].mean())
    else:  # the same numbers from the histogram (a partition of every pixel was slow)
        counts, lowest = hist
        levels = np.arange(lowest, lowest + len(counts))
        otsu = float(threshold_otsu(hist=(counts, levels)))
        n_below = int(counts[levels <= otsu].sum())
        if n_below < SKIP_MIN_BACKGROUND * values.size or n_below == values.size:
            return None
        middle = order_statistics(counts, lowest, [(n_below - 1) // 2, n_below // 2])
        level = float(np.mean(middle.astype(np.float64)))
        above = levels > otsu
        nuclei = float((counts[above] * levels[above]).sum() / (values.size - n_below))
    # The class mean, not Otsu's threshold itself: with well separated modes Otsu returns the
    # lowest grey level of the gap, right above the background noise.
    if nuclei - level < SKIP_MIN_CONTRAST:
        return None
    return level + SKIP_THRESHOLD_FRACTION * (nuclei - level)


def _gate_level(layout: _Layout, level: int, diameter: float) -> int:
    """Coarsest level at or below ``level`` fine enough to see the smallest nucleus."""
    best = level
    ref = layout.levels[level].shape
    for index in range(level + 1, len(layout.levels)):
        arr = layout.levels[index]
        if not all(arr.shape[a] == ref[a] for a in layout.plane_axes):
            continue
        factor = min(
            ref[layout.y_axis] / arr.shape[layout.y_axis],
            ref[layout.x_axis] / arr.shape[layout.x_axis],
        )
        if factor * SKIP_PIXELS_PER_DIAMETER <= diameter:
            best = index
    return best


def _empty_tiles(
    overview: PlaneView, shape: tuple[int, int], tiles: list[Tile], norm, threshold: float
) -> np.ndarray:
    """Which tiles have no pixel above ``threshold`` in a coarser level (plus a margin).

    The level is read once, one band of tile rows at a time (memory stays small), and each band
    is reduced to a per-column "anything bright" profile.
    """
    fy, fx = shape[0] / overview.shape[0], shape[1] / overview.shape[1]
    empty = np.zeros(len(tiles), dtype=bool)
    rows: dict[tuple[int, int], list[int]] = {}
    for i, tile in enumerate(tiles):
        rows.setdefault((tile.slices[0].start, tile.slices[0].stop), []).append(i)
    for (y0, y1), members in rows.items():
        oy0 = max(0, math.floor(y0 / fy) - SKIP_MARGIN)
        oy1 = min(overview.shape[0], math.ceil(y1 / fy) + SKIP_MARGIN)
        band = norm(overview[oy0:oy1, 0 : overview.shape[1]])
        bright = (band > threshold).any(axis=0)
        for i in members:
            xs = tiles[i].slices[1]
            ox0 = max(0, math.floor(xs.start / fx) - SKIP_MARGIN)
            ox1 = min(overview.shape[1], math.ceil(xs.stop / fx) + SKIP_MARGIN)
            empty[i] = not bright[ox0:ox1].any()
    return empty


#: A given diameter this close (ratio) to the measured one reads the pixels it was meant in.
LEVEL_READING_TOLERANCE = 1.5


def _check_level_diameter(params: DetectParams, measured: float | None, factor: float) -> None:
    """Refuse a full-resolution ``diameter`` that matches the nuclei only in level pixels.

    On level ``L`` of a pyramid, ``--diameter 10`` for nuclei 10 px wide at that level (20 px
    at full resolution) would shrink them 2x more and miss most: one line instead of a wrong
    count. Silent when the size cannot be measured or the reading is not clear-cut.
    """
    if measured is None or factor < LEVEL_READING_TOLERANCE or params.diameter is None:
        return
    as_full = abs(math.log(params.diameter / measured))
    as_level = abs(math.log(params.diameter * factor / measured))
    if as_level < math.log(LEVEL_READING_TOLERANCE) <= as_full:
        raise ValueError(
            f"diameter {params.diameter:g} is in full-resolution (level 0) pixels, but the "
            f"nuclei measure ~{measured:.0f} px there (~{measured / factor:.0f} px at level "
            f"{params.level}): give --diameter {measured:.0f}, or --diameter-pixels level "
            "(widget: diameter in px of the analysed level)"
        )


#: A fine-tuned model's lab scale is kept unless the image's nuclei measure this many times
#: larger or smaller (the estimate is within 0.8-1.6x of the truth on 90 % of the public images,
#: docs/benchmarks.md "Automatic nucleus size"; a lab's other magnification is 2x or more away).
LAB_SCALE_TOLERANCE = 2.5


def _lab_or_measured(params: DetectParams, measured: float | None, lab: float, spec):
    """The lab's scale, or the automatic size when the image is clearly at another scale.

    A model fine-tuned on 120 px nuclei, used at that scale on an image of 20 px nuclei from
    the same lab (another objective), shrinks them to 4 px and misses them all. Such an image
    gets the automatic size (resized only when far larger than the model's scale) and one
    warning; the estimate may fail on dim + saturated images, hence the wide tolerance.
    """
    if measured is None or max(measured / lab, lab / measured) <= LAB_SCALE_TOLERANCE:
        return params
    chosen = auto_diameter(measured, float(spec.diameter_px))
    warnings.warn(
        f"nuclei here measure ~{measured:.0f} px across, far from the ~{lab:.0f} px of the "
        f"images {spec.name or 'this model'} was fine-tuned on: detected at "
        + (f"{chosen:.0f} px" if chosen else "the model's own scale")
        + " instead (give the diameter to override)",
        UserWarning,
        stacklevel=2,
    )
    return dataclasses.replace(params, diameter=chosen)


def measure_diameter(
    stats_view: PlaneView, full_height: int, spec
) -> tuple[float | None, np.ndarray | None]:
    """Typical nucleus diameter in full-resolution pixels, measured on an overview.

    Returns ``(diameter, sample)``: the strided overview read for it (reused for
    normalisation) or None if none was read. The diameter is None when the overview is too
    coarse to show a nucleus of the model's size as a blob ``SKIP_PIXELS_PER_DIAMETER`` pixels
    wide (e.g. a slide's thumbnail, where tissue would read as giant nuclei), or when the image
    gives no reliable measurement.
    """
    stride = sample_stride(stats_view.shape, STATS_MAX_PIXELS)
    px = stride * full_height / stats_view.shape[0]  # full-resolution pixels per sample pixel
    if float(spec.diameter_px) / px < SKIP_PIXELS_PER_DIAMETER:
        return None, None
    sample = strided_sample(stats_view, STATS_MAX_PIXELS)
    # Only nuclei over AUTO_HIGH x the model's size matter: measure where they still span
    # >= 16 px, which is ~9x cheaper than the full overview for a normal field.
    k = max(1, int(AUTO_HIGH * float(spec.diameter_px) / (16 * px)))
    estimate = estimate_diameter(np.asarray(sample[::k, ::k], dtype=np.float32))
    return (None if estimate is None else estimate * px * k), sample


def _resize(grey: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return grey
    height = max(1, round(grey.shape[0] * scale))
    width = max(1, round(grey.shape[1] * scale))
    try:
        import cv2

        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        return cv2.resize(grey, (width, height), interpolation=interp)
    except ImportError:  # opencv comes with ultralytics; keep a fallback for the core
        from skimage.transform import resize

        out = resize(grey, (height, width), order=1, preserve_range=True, anti_aliasing=scale < 1)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _read_tile(
    view: PlaneView,
    tile: Tile,
    norm,
    scale: float,
    state: dict,
    threshold: float | None = None,
    grey_tiles: bool = False,
) -> np.ndarray | None:
    """The tile as the model's uint8 input, (H, W) if ``grey_tiles`` else (H, W, 3); None if
    it is empty (``threshold``)."""
    raw = view[tile.slices]
    if raw.dtype.kind == "f" and not state["nan_warned"] and np.isnan(raw).any():
        warnings.warn(
            "image contains NaN pixels: treated as background (0)", RuntimeWarning, stacklevel=4
        )
        state["nan_warned"] = True
    grey = norm(raw)
    if threshold is not None and grey.max() <= threshold:
        return None
    grey = _resize(grey, scale)
    # grey, not x3, where the detector takes it: OpenVINO expands it inside the model
    # (backends.grey_input_model)
    return grey if grey_tiles else as_rgb(grey)


def _to_tile_coords(boxes: np.ndarray, tile: Tile, model_shape: tuple[int, int]) -> np.ndarray:
    """Map boxes from the (resized) model input back to tile pixels."""
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 6)
    height, width = tile.shape
    boxes[:, [0, 2]] *= width / model_shape[1]
    boxes[:, [1, 3]] *= height / model_shape[0]
    return boxes


def is_cancelled(cancel: Cancel) -> bool:
    """Whether ``cancel`` (None, a :class:`threading.Event` or a callable) asks to stop."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _read_ahead(read, items: list, depth: int):
    """``read(item)`` for each item, in order, computed up to ``depth`` items ahead in one
    background thread: decompressing the next tiles overlaps the model's forward pass
    (tifffile's codecs and numpy release the GIL). The thread keeps the process's priority: a
    lowered one measured no faster on 2 cores (docs/benchmarks.md, "8192 x 8192") and would
    starve the reads whenever another program keeps the cores busy."""
    it = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="yolocell-read") as pool:
        queue = collections.deque(pool.submit(read, item) for item in itertools.islice(it, depth))
        try:
            while queue:
                result = queue.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    queue.append(pool.submit(read, nxt))
                yield result
        finally:  # cancelled or failed: drop what was queued, don't read it
            for fut in queue:
                fut.cancel()


def _detect_plane(
    view, norm, tiles, detector, params, scale, cancel, state, empty=None, threshold=None
):
    """Generator over batches of one plane: yields tile counts, returns merged boxes.

    Tiles flagged in ``empty`` are skipped unread; with ``threshold``, a tile whose normalised
    pixels are all at or below it is skipped after reading. Skipped tiles count as done and
    never occupy a batch slot, so every forward pass stays full.
    """
    tile_boxes = []
    margin = params.margin * max(1.0, 1.0 / scale)
    pending: list[tuple[Tile, np.ndarray]] = []
    consumed = 0

    def flush():
        outputs = detector.predict(
            [arr for _, arr in pending], conf=params.conf, iou=params.iou, max_det=params.max_det
        )
        for (tile, arr), boxes in zip(pending, outputs, strict=True):
            tile_boxes.append((tile, _to_tile_coords(boxes, tile, arr.shape[:2])))
        pending.clear()

    grey = getattr(detector, "grey_tiles", False)

    def read(index_tile):
        index, tile = index_tile
        if empty is not None and empty[index]:
            return None
        return _read_tile(view, tile, norm, scale, state, threshold, grey)

    arrays = _read_ahead(read, list(enumerate(tiles)), depth=params.batch + 1)
    for index, (tile, arr) in enumerate(zip(tiles, arrays, strict=True)):
        if index % params.batch == 0 and is_cancelled(cancel):
            raise DetectionCancelled("detection cancelled")
        consumed += 1
        if arr is None:
            state["skipped"] += 1
        else:
            pending.append((tile, arr))
        if len(pending) == params.batch:
            flush()
            yield consumed
            consumed = 0
    if pending:
        flush()
    if consumed:
        yield consumed
    return merge_tiles(tile_boxes, iou=params.iou, ios=params.ios, margin=margin)


def _frame(plane: int, boxes: np.ndarray, factor: tuple[float, float]) -> pd.DataFrame:
    """Detector boxes (x first, ``models.detector.BOX_COLUMNS``) -> the y-first table."""
    fy, fx = factor
    x0, y0, x1, y1 = boxes[:, 0] * fx, boxes[:, 1] * fy, boxes[:, 2] * fx, boxes[:, 3] * fy
    return pd.DataFrame(
        {
            "plane": np.full(len(boxes), plane, dtype=np.int64),
            "y": (y0 + y1) / 2,
            "x": (x0 + x1) / 2,
            "y0": y0,
            "x0": x0,
            "y1": y1,
            "x1": x1,
            "confidence": boxes[:, 4].astype(np.float64),
            "class": boxes[:, 5].astype(np.int64),
        },
        columns=COLUMNS,
    )


def _small_flags(frame: pd.DataFrame, ratio: float, full, layout: _Layout) -> np.ndarray:
    """``small`` column of one plane's table (see ``DetectParams.min_relative_area``)."""
    shape = (int(full.shape[layout.y_axis]), int(full.shape[layout.x_axis]))
    boxes = frame[["y0", "x0", "y1", "x1"]].to_numpy(float)
    return small_object_mask(boxes, frame["confidence"].to_numpy(float), ratio, shape=shape)


def _load(detector) -> Detector:
    if isinstance(detector, (str, Path, ModelSpec)):
        return load_detector(detector)
    return detector


def iter_detect(
    image,
    detector: Detector | str,
    params: DetectParams | None = None,
    *,
    channel_axis: int | None = None,
    rgb: bool | None = None,
    planes: Sequence[int] | None = None,
    cancel: Cancel = None,
    axes: str | None = None,
) -> Generator[tuple[int, int], None, pd.DataFrame]:
    """Detect nuclei, yielding progress; the generator's return value is the table.

    Same parameters as :func:`detect_image`. Yields ``(done_tiles, total_tiles)``, first
    ``(0, total)``, then after every batch. Use with napari's ``thread_worker`` (its
    ``returned`` signal carries the table) or drive it with ``yield from``.
    """
    params = params or DetectParams()
    shape = tuple(_as_levels(image)[0].shape)
    channel_axis = image_channel_axis(shape, axes, channel_axis, rgb, params)
    detector = _load(detector)
    layout = _layout(image, channel_axis, rgb)
    if not 0 <= params.level < len(layout.levels):
        raise ValueError(
            f"level {params.level} not available: the image has {len(layout.levels)} level(s)"
        )
    _check_channel(layout, params.channel)
    array = layout.levels[params.level]
    full = layout.levels[0]
    factor = (
        full.shape[layout.y_axis] / array.shape[layout.y_axis],
        full.shape[layout.x_axis] / array.shape[layout.x_axis],
    )
    params = full_resolution_diameter(params, float(np.mean(factor)))
    stats_array = layout.levels[_stats_level(layout, params.level)]
    plane_ids = list(range(math.prod(layout.plane_shape))) if planes is None else list(planes)
    plane_index = list(itertools.product(*(range(n) for n in layout.plane_shape)))
    measured, first_sample = None, None
    lab = getattr(detector.spec, "lab_diameter_px", None)  # a fine-tuned model: its lab's scale
    lab_scale = bool(params.diameter is None and params.auto_diameter and lab)
    if lab_scale:
        params = dataclasses.replace(params, diameter=float(lab))
    # measured for "auto", to catch a level diameter read as full-resolution pixels, and to
    # catch an image at another magnification than the lab's
    check_level = params.diameter is not None and params.level > 0 and not lab_scale
    if (params.diameter is None and params.auto_diameter or check_level or lab_scale) and plane_ids:
        first = plane_index[plane_ids[0]] if 0 <= plane_ids[0] < len(plane_index) else None
        if first is not None:
            stats_view = PlaneView(stats_array, layout, first, params.channel)
            measured, first_sample = measure_diameter(
                stats_view, full.shape[layout.y_axis], detector.spec
            )
            if check_level:
                _check_level_diameter(params, measured, float(np.mean(factor)))
            elif lab_scale:
                params = _lab_or_measured(params, measured, float(lab), detector.spec)
            else:
                chosen = auto_diameter(measured, float(detector.spec.diameter_px))
                if chosen is not None:
                    params = dataclasses.replace(params, diameter=chosen)
    params, scale = resolve_params(params, detector.spec, level_factor=float(np.mean(factor)))
    shape_yx = (int(array.shape[layout.y_axis]), int(array.shape[layout.x_axis]))
    tiles = tile_grid(shape_yx, params.tile, params.overlap)
    total, done, state = len(tiles) * len(plane_ids), 0, {"nan_warned": False, "skipped": 0}
    if params.diameter is not None:
        expected = params.diameter / float(np.mean(factor))
    else:
        expected = float(detector.spec.diameter_px)
    gate_array = layout.levels[_gate_level(layout, params.level, expected)]
    frames = []
    yield done, total
    for plane in plane_ids:
        if not 0 <= plane < len(plane_index):
            raise ValueError(f"plane {plane} out of range (the image has {len(plane_index)})")
        view = PlaneView(array, layout, plane_index[plane], params.channel, cached=True)
        stats_view = PlaneView(stats_array, layout, plane_index[plane], params.channel)
        sample, first_sample = first_sample, None  # the measured overview serves plane 1 only
        norm, overview = _normalizer(view, stats_view, params, detector, sample)
        threshold = empty_threshold(overview) if params.skip_empty else None
        empty = None
        if threshold is not None and gate_array is not array:
            gate_view = PlaneView(gate_array, layout, plane_index[plane], params.channel)
            empty = _empty_tiles(gate_view, shape_yx, tiles, norm, threshold)
            threshold = None  # decided on the coarser level: read no pixel of empty tiles
        runner = _detect_plane(
            view, norm, tiles, detector, params, scale, cancel, state, empty, threshold
        )
        while True:
            try:
                done += next(runner)
            except StopIteration as stop:
                boxes = stop.value
                if params.classes is not None:
                    boxes = boxes[np.isin(boxes[:, 5], params.classes)]
                frame = _frame(plane, boxes, factor)
                if params.min_relative_area > 0:
                    frame[SMALL_COLUMN] = _small_flags(
                        frame, params.min_relative_area, full, layout
                    )
                frames.append(frame)
                break
            yield done, total
    df = pd.concat(frames, ignore_index=True) if frames else _frame(0, np.zeros((0, 6)), factor)
    if params.min_relative_area > 0 and SMALL_COLUMN not in df.columns:
        df[SMALL_COLUMN] = np.zeros(len(df), dtype=bool)
    df.attrs.update(
        n_planes=len(plane_index),
        plane_shape=layout.plane_shape,
        plane_axes=layout.plane_axes,
        level=params.level,
        tile=params.tile,
        overlap=params.overlap,
        scale=scale,
        conf=params.conf,
        skipped_tiles=state["skipped"],
        diameter=params.diameter,
        measured_diameter=measured,
        lab_scale=lab_scale and params.diameter == float(lab),
        level_factor=float(np.mean(factor)),
        channel_axis=layout.channel_axis,
    )
    return df


def plane_windows(
    image,
    params: DetectParams | None = None,
    *,
    channel_axis: int | None = None,
    rgb: bool | None = None,
    planes: Sequence[int] | None = None,
    axes: str | None = None,
    window: int = 2048,
    max_planes: int = 4,
) -> list[np.ndarray]:
    """Central windows of the planes a detection would analyse, as 2-D arrays.

    Same image arguments as :func:`detect_image`: the window is read at ``params.level``, in
    ``params.channel`` (RGB reduced as detection reduces it), from at most ``max_planes`` of
    the planes detected (spread evenly). What an INT8 model of the detector is calibrated on
    when a widget quantizes it on first use
    (:func:`napari_yolocell.training.quantize.quantize_on_first_use`).
    """
    params = params or DetectParams()
    shape = tuple(_as_levels(image)[0].shape)
    channel_axis = image_channel_axis(shape, axes, channel_axis, rgb, params)
    layout = _layout(image, channel_axis, rgb)
    _check_channel(layout, params.channel)
    array = layout.levels[min(max(params.level, 0), len(layout.levels) - 1)]
    plane_index = list(itertools.product(*(range(n) for n in layout.plane_shape)))
    ids = list(range(len(plane_index))) if planes is None else list(planes)
    ids = [i for i in ids if 0 <= i < len(plane_index)]
    if len(ids) > max_planes:
        ids = [ids[int(i)] for i in np.linspace(0, len(ids) - 1, max_planes)]
    out = []
    for plane in ids:
        view = PlaneView(array, layout, plane_index[plane], params.channel)
        h, w = view.shape
        y, x = max(0, (h - window) // 2), max(0, (w - window) // 2)
        out.append(view[slice(y, y + window), slice(x, x + window)])
    return out


def detect_image(
    image,
    detector: Detector | str,
    params: DetectParams | None = None,
    *,
    channel_axis: int | None = None,
    rgb: bool | None = None,
    planes: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Cancel = None,
    axes: str | None = None,
) -> pd.DataFrame:
    """Detect and locate nuclei in an image of any size.

    Parameters
    ----------
    image : array-like or list of array-like
        numpy, zarr or dask array of any dtype: 2-D (Y, X), RGB (..., Y, X, 3|4), or nD with
        extra plane axes (Z, T...) and optionally a channel axis. A list of arrays is a
        multiscale pyramid (full resolution first).
    detector : Detector or str
        A loaded detector (:func:`napari_yolocell.models.loading.load_detector`) or a model
        name/path.
    params : DetectParams, optional
        Settings; defaults derived from the model.
    channel_axis : int, optional
        Axis holding channels; ``params.channel`` selects one.
    rgb : bool, optional
        Whether the last axis is RGB(A) colour; None guesses (last axis of length 3 or 4).
    planes : sequence of int, optional
        Only these planes (flat C-order indices over the non-Y/X axes), e.g. the slice shown.
    progress : callable, optional
        Called as ``progress(done_tiles, total_tiles)``.
    cancel : callable or threading.Event, optional
        Checked before every batch; when true, :class:`DetectionCancelled` is raised.
    axes : str, optional
        tifffile axis codes of the image (``OpenedImage.axes``): an unlabelled leading axis
        of 2-4 then needs ``params.channel`` or ``params.planes``
        (:func:`image_channel_axis`). None: every extra axis is a plane.

    Returns
    -------
    pandas.DataFrame
        Columns ``plane, y, x, y0, x0, y1, x1, confidence, class``: centres and boxes in
        full-resolution pixels (y0/x0 inclusive, y1/x1 exclusive). ``df.attrs`` holds
        ``n_planes``, ``plane_shape``, the effective tile/overlap/scale/conf and
        ``skipped_tiles`` (empty tiles not analysed, see ``DetectParams.skip_empty``).

    Raises
    ------
    ValueError
        Empty image, fewer than 2 dimensions, unsupported dtype, bad channel/level/plane.
    DetectionCancelled
        When cancelled.
    """
    runner = iter_detect(
        image,
        detector,
        params,
        channel_axis=channel_axis,
        rgb=rgb,
        planes=planes,
        cancel=cancel,
        axes=axes,
    )
    while True:
        try:
            done, total = next(runner)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)


def counted(df: pd.DataFrame) -> pd.DataFrame:
    """The detections that count as nuclei: all but those flagged :data:`SMALL_COLUMN`."""
    if SMALL_COLUMN in df.columns:
        return df[~df[SMALL_COLUMN].to_numpy(bool)]
    return df


def n_planes_of(df: pd.DataFrame, n_planes: int | None = None) -> int:
    """Planes of the image a detection table came from: ``n_planes`` if given, else
    ``df.attrs["n_planes"]`` (set by :func:`detect_image`), else the largest plane + 1."""
    if n_planes is not None:
        return int(n_planes)
    return int(df.attrs.get("n_planes", int(df["plane"].max()) + 1 if len(df) else 1))


def count_per_plane(df: pd.DataFrame, n_planes: int | None = None) -> pd.Series:
    """Number of detections per plane, including planes with none.

    Rows flagged ``small`` (``DetectParams.min_relative_area``) are not counted.

    Parameters
    ----------
    df : pandas.DataFrame
        Output of :func:`detect_image`.
    n_planes : int, optional
        Number of planes; default ``df.attrs["n_planes"]`` or the largest plane index + 1.

    Returns
    -------
    pandas.Series
        Counts indexed by ``plane``, named ``"count"``.
    """
    n_planes = n_planes_of(df, n_planes)
    df = counted(df)
    counts = df.groupby("plane").size().reindex(range(n_planes), fill_value=0)
    counts.index.name = "plane"
    return counts.rename("count").astype(np.int64)
