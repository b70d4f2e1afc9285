"""Intensity normalisation to 8-bit, shared by detection and dataset export.

Modes
-----
``"percentile"``
    Clip to the (low, high) percentiles of the plane and map linearly to 0..255. The
    percentiles are computed on a strided view of at most ``max_pixels`` pixels (or on a lower
    pyramid level passed in), so a huge lazy array is never loaded whole.
``"none"``
    uint8 passes unchanged; any other dtype is clipped to 0..255 and cast to uint8 (no
    rescaling: use it only for data already in 8-bit range).

NaN pixels are ignored when computing percentiles and become 0 (background). A constant plane
(``hi == lo``) maps to all zeros instead of dividing by zero.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np

MODES = ("percentile", "none")


def sample_stride(shape_yx: tuple[int, int], max_pixels: int = 2_000_000) -> int:
    """Smallest integer stride so that ``plane[::s, ::s]`` has at most ``max_pixels`` pixels."""
    n_pixels = int(shape_yx[0]) * int(shape_yx[1])
    if n_pixels <= max_pixels:
        return 1
    stride = math.ceil(math.sqrt(n_pixels / max_pixels))
    while math.ceil(shape_yx[0] / stride) * math.ceil(shape_yx[1] / stride) > max_pixels:
        stride += 1
    return stride


def strided_sample(plane, max_pixels: int = 2_000_000) -> np.ndarray:
    """Read a strided sub-sample of a (lazy) 2-D plane as a numpy array.

    The plane is (Y, X) or (Y, X, C). Only ``plane[::s, ::s]`` is requested from the array,
    so zarr/dask/tifffile arrays are never materialised at full size.
    """
    stride = sample_stride(plane.shape[:2], max_pixels)
    return np.asarray(plane[::stride, ::stride])


def percentile_range(
    plane, low: float = 1.0, high: float = 99.8, max_pixels: int = 2_000_000
) -> tuple[float, float]:
    """Intensity range (lo, hi) of a plane from its ``low``/``high`` percentiles.

    Parameters
    ----------
    plane : array-like, shape (Y, X)
        Numpy, zarr or dask array; pass a lower pyramid level to make this cheaper still.
    low, high : float
        Percentiles in [0, 100].
    max_pixels : int
        The plane is sub-sampled with a regular stride to at most this many pixels.

    Returns
    -------
    lo, hi : float
        ``hi >= lo``; both 0.0 if the plane is all NaN.
    """
    if not 0 <= low <= high <= 100:
        raise ValueError(f"need 0 <= low <= high <= 100, got ({low}, {high})")
    sample = strided_sample(plane, max_pixels)
    exact = integer_quantiles(sample, np.true_divide([low, high], 100))
    if exact is not None:
        lo, hi = exact
        return float(lo), float(max(hi, lo))
    sample = sample.astype(np.float32, copy=False)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(finite, [low, high])
    return float(lo), float(max(hi, lo))


def level_counts(values: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Histogram of 8/16-bit integer ``values``: (count of each level from the lowest, lowest).

    None for other dtypes and empty arrays.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "ui" or values.dtype.itemsize > 2 or values.size == 0:
        return None
    flat = values.ravel()
    if flat.dtype.kind == "u":
        return np.bincount(flat), 0
    lowest = int(flat.min())
    return np.bincount(flat.astype(np.int32) - lowest), lowest


def order_statistics(counts: np.ndarray, lowest: int, ranks) -> np.ndarray:
    """Values at 0-based ``ranks`` of the sorted data behind a :func:`level_counts` histogram."""
    return np.searchsorted(np.cumsum(counts), np.asarray(ranks), side="right") + lowest


def integer_quantiles(values: np.ndarray, q) -> np.ndarray | None:
    """``np.quantile(values.astype(np.float32), q)`` (linear method) for 8/16-bit integers,
    bit for bit, from a histogram instead of a partition of every pixel, which weighed on
    the detection of small images (docs/benchmarks.md, "The per-image fixed costs, cut").

    None for other dtypes or empty arrays: use :func:`numpy.quantile`.
    """
    hist = level_counts(values)
    if hist is None:
        return None
    n = int(np.asarray(values).size)
    virtual = (n - 1) * np.asarray(q, dtype=np.float64)
    below = np.floor(virtual)
    above = np.minimum(below + 1, n - 1)
    a = order_statistics(*hist, below).astype(np.float32)
    b = order_statistics(*hist, above).astype(np.float32)
    # numpy's own interpolation on the two neighbours (a 2-sample quantile at the same
    # fraction), so rounding is exactly that of np.quantile over the whole sample
    return np.array(
        [np.quantile(np.array([x, y]), g) for x, y, g in zip(a, b, virtual - below, strict=True)]
    )


def to_uint8(tile, lo: float, hi: float) -> np.ndarray:
    """Clip ``tile`` to [lo, hi] and map it linearly to uint8 0..255.

    NaN maps to 0. If ``hi <= lo`` (constant image) the result is all zeros.
    """
    arr = np.asarray(tile, dtype=np.float32)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (arr - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def uint8_mapping(lo: float, hi: float) -> Callable[[np.ndarray], np.ndarray]:
    """``to_uint8(tile, lo, hi)`` as a function of the tile.

    uint8 and uint16 tiles go through a lookup table of :func:`to_uint8` of every possible
    value: the same result, about 10x faster than the float arithmetic (which was a tenth of
    the time per tile on a slide).
    """
    tables: dict = {}

    def norm(tile) -> np.ndarray:
        tile = np.asarray(tile)
        if tile.dtype not in (np.uint8, np.uint16):
            return to_uint8(tile, lo, hi)
        table = tables.get(tile.dtype)
        if table is None:
            values = np.arange(np.iinfo(tile.dtype).max + 1, dtype=tile.dtype)
            table = tables[tile.dtype] = to_uint8(values, lo, hi)
        return np.take(table, tile)

    return norm


def clip_uint8(tile) -> np.ndarray:
    """Mode ``"none"``: uint8 unchanged, other dtypes clipped to 0..255 (NaN -> 0)."""
    arr = np.asarray(tile)
    if arr.dtype == np.uint8:
        return arr
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(arr, 0, 255).astype(np.uint8)


def check_mode(mode: str) -> str:
    """Validate a normalisation mode name."""
    if mode not in MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; choose one of {MODES}")
    return mode


def normalize_image(
    arr,
    mode: str = "percentile",
    percentiles: tuple[float, float] = (1.0, 99.8),
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Normalise a 2-D image (or tile) to uint8 with the given mode.

    Parameters
    ----------
    arr : array-like
        Image to convert.
    mode : {"percentile", "none"}
        See the module docstring.
    percentiles : tuple of float
        (low, high) percentiles for ``mode="percentile"``.
    value_range : tuple of float, optional
        Precomputed (lo, hi), e.g. of the whole plane when ``arr`` is one tile of it, so all
        tiles of a plane share one mapping.

    Returns
    -------
    numpy.ndarray of uint8
    """
    check_mode(mode)
    if mode == "none":
        return clip_uint8(arr)
    if value_range is None:
        value_range = percentile_range(arr, *percentiles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return to_uint8(arr, *value_range)
