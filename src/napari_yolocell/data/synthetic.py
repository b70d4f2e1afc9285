"""Synthetic fluorescence nucleus images with known ground truth.

napari-free. Nuclei are soft-edged, slightly elliptic, dome-shaped blobs that never overlap, on a
flat background with read noise and shot noise. Positions are fixed up front, so any region (a
tile, a dask chunk, a downsampled pyramid level) can be rendered independently and blobs that
cross region borders come out identical on both sides. This is what lets
:func:`napari_yolocell.data.synthetic_tiff.write_synthetic_tiff` stream gigapixel pyramidal
BigTIFFs in bounded memory (positions come from :mod:`napari_yolocell.data.hard_core`).

Coordinates: continuous pixel coordinates where pixel ``i`` spans ``[i, i + 1)``; ``centers``
are the centres of ``boxes`` (``y0, x0`` inclusive top-left, ``y1, x1`` exclusive bottom-right),
matching the detections DataFrame of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from napari_yolocell.data.hard_core import hard_core_density, hard_core_exact

if TYPE_CHECKING:
    import dask.array as da
    import pandas as pd

__all__ = [
    "NucleusField",
    "SyntheticImage",
    "make_lazy_nuclei_image",
    "make_nuclei_image",
    "place_nuclei",
    "prepare_noise",
    "tissue_mask_at",
]

_EDGE_PX = 1.2  # width of the soft nucleus edge (sigmoid scale) at full resolution
_SHOT_GAIN = 1.0  # shot-noise variance per unit of signal


@dataclass
class SyntheticImage:
    """A synthetic image and its ground truth.

    Attributes
    ----------
    image : numpy.ndarray
        (H, W) image.
    centers : numpy.ndarray
        (N, 2) float nucleus centres ``y, x``.
    boxes : numpy.ndarray
        (N, 4) float boxes ``y0, x0, y1, x1`` (exclusive end), clipped to the image.
    diameters : numpy.ndarray
        (N,) major-axis diameters in pixels.
    """

    image: np.ndarray
    centers: np.ndarray
    boxes: np.ndarray
    diameters: np.ndarray

    @property
    def count(self) -> int:
        """Number of nuclei."""
        return int(len(self.centers))

    def truth(self) -> pd.DataFrame:
        """Ground truth as a DataFrame with columns ``y, x, y0, x0, y1, x1, diameter``."""
        return _truth_frame(self.centers, self.boxes, self.diameters)


class NucleusField:
    """Fixed nucleus geometry that can render any region at any downsampling factor.

    Parameters
    ----------
    shape : tuple of int
        Full-resolution (H, W).
    centers : numpy.ndarray
        (N, 2) centres ``y, x`` in full-resolution pixel coordinates.
    semi_axes : numpy.ndarray
        (N, 2) semi-axes ``a >= b`` in pixels.
    angles : numpy.ndarray
        (N,) orientation of the major axis (radians, from the x axis towards y).
    peaks : numpy.ndarray
        (N,) peak intensity above background.
    background, noise : float
        Background level and Gaussian read-noise sigma (shot noise is added on top; 0 = no
        noise at all).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        centers: np.ndarray,
        semi_axes: np.ndarray,
        angles: np.ndarray,
        peaks: np.ndarray,
        background: float = 200.0,
        noise: float = 30.0,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        self.semi_axes = np.asarray(semi_axes, dtype=np.float64).reshape(-1, 2)
        self.angles = np.asarray(angles, dtype=np.float64).reshape(-1)
        self.peaks = np.asarray(peaks, dtype=np.float64).reshape(-1)
        self.background = float(background)
        self.noise = float(noise)
        # Sorted by y so a region's candidates are found with a binary search.
        self._order = np.argsort(self.centers[:, 0], kind="stable")
        self._ys = self.centers[self._order, 0]
        self._reach = (
            float(self.semi_axes[:, 0].max()) * 1.5 + 4 * _EDGE_PX if len(centers) else 0.0
        )

    def __len__(self) -> int:
        return len(self.centers)

    @property
    def diameters(self) -> np.ndarray:
        """(N,) major-axis diameters."""
        return 2 * self.semi_axes[:, 0]

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) ellipse bounding boxes ``y0, x0, y1, x1`` clipped to the image."""
        a, b = self.semi_axes[:, 0], self.semi_axes[:, 1]
        c, s = np.cos(self.angles), np.sin(self.angles)
        hx = np.sqrt((a * c) ** 2 + (b * s) ** 2)
        hy = np.sqrt((a * s) ** 2 + (b * c) ** 2)
        y, x = self.centers[:, 0], self.centers[:, 1]
        h, w = self.shape
        return np.stack(
            [
                np.clip(y - hy, 0, h),
                np.clip(x - hx, 0, w),
                np.clip(y + hy, 0, h),
                np.clip(x + hx, 0, w),
            ],
            axis=1,
        )

    def truth(self) -> pd.DataFrame:
        """Ground truth DataFrame (columns ``y, x, y0, x0, y1, x1, diameter``)."""
        return _truth_frame(self.centers, self.boxes, self.diameters)

    def render(
        self,
        y0: int,
        x0: int,
        height: int,
        width: int,
        factor: int = 1,
        dtype: np.dtype | type = np.uint16,
        seed: int | list[int] | None = None,
    ) -> np.ndarray:
        """Render a region of the image, optionally downsampled.

        Parameters
        ----------
        y0, x0 : int
            Top-left of the region in pixels OF THE DOWNSAMPLED LEVEL.
        height, width : int
            Region size in pixels of that level.
        factor : int
            Downsampling factor of the level (1 = full resolution).
        dtype : numpy dtype
            Output dtype; integer outputs are rounded and clipped to the dtype range.
        seed : int or list of int, optional
            Noise seed; None gives no noise. Use a seed derived from the region position so
            re-rendering gives the same pixels.

        Returns
        -------
        numpy.ndarray
            (height, width) array.
        """
        signal = self._signal(y0, x0, height, width, factor)
        out = signal + np.float32(self.background)
        if seed is not None and self.noise > 0:
            # Averaging factor**2 pixels divides the noise sigma by factor.
            var = np.float32(self.noise**2) + np.float32(_SHOT_GAIN) * signal
            sigma = np.sqrt(var) / np.float32(factor)
            out += _unit_noise(height, width, seed) * sigma
        return _cast(out, dtype)

    def to_dask(
        self,
        factor: int = 1,
        chunk: int = 512,
        dtype: np.dtype | type = np.uint16,
        seed: int = 0,
    ) -> da.Array:
        """Lazy image (or downsampled level) rendered chunk by chunk on demand.

        Parameters
        ----------
        factor : int
            Downsampling factor (level shape = ceil(shape / factor)).
        chunk : int
            Chunk edge length.
        dtype : numpy dtype
            Output dtype.
        seed : int
            Noise seed; chunks get seeds derived from their position, so reads are repeatable.

        Returns
        -------
        dask.array.Array
        """
        import dask.array as da

        dtype = np.dtype(dtype)
        shape = (-(-self.shape[0] // factor), -(-self.shape[1] // factor))

        def block(block_info: dict | None = None) -> np.ndarray:
            (ys, ye), (xs, xe) = block_info[None]["array-location"]
            return self.render(ys, xs, ye - ys, xe - xs, factor, dtype, seed=[seed, factor, ys, xs])

        return da.map_blocks(
            block,
            dtype=dtype,
            chunks=da.core.normalize_chunks((chunk, chunk), shape),
            name=f"synthetic-nuclei-{id(self):x}-{seed}-f{factor}-{chunk}",
            meta=np.empty((0, 0), dtype),
        )

    def _signal(self, y0: int, x0: int, height: int, width: int, factor: int) -> np.ndarray:
        f = float(factor)
        if not len(self):
            return np.zeros((height, width), dtype=np.float32)
        # Candidate nuclei: centre within reach of the region (full-res coordinates).
        fy0, fy1 = y0 * f - self._reach, (y0 + height) * f + self._reach
        fx0, fx1 = x0 * f - self._reach, (x0 + width) * f + self._reach
        lo, hi = np.searchsorted(self._ys, [fy0, fy1])
        band = self._order[lo:hi]
        cx_all = self.centers[band, 1]
        sel = band[(cx_all >= fx0) & (cx_all <= fx1)]
        if sel.size == 0:
            return np.zeros((height, width), dtype=np.float32)
        cy = self.centers[sel, 0] / f - y0  # level coordinates relative to the region
        cx = self.centers[sel, 1] / f - x0
        a = self.semi_axes[sel, 0] / f
        b = self.semi_axes[sel, 1] / f
        th = self.angles[sel]
        peak = self.peaks[sel]
        edge = max(_EDGE_PX / f, 0.35)
        half = int(np.ceil(a.max() + 3 * edge)) + 1  # covers r <= 1 + edge / mean radius
        offs = np.arange(-half, half + 1)
        iy = np.floor(cy).astype(np.int64)[:, None] + offs  # (n, w) pixel rows
        ix = np.floor(cx).astype(np.int64)[:, None] + offs
        dy = (iy + 0.5 - cy[:, None]).astype(np.float32)[:, :, None]
        dx = (ix + 0.5 - cx[:, None]).astype(np.float32)[:, None, :]
        c = np.cos(th).astype(np.float32)[:, None, None]
        s = np.sin(th).astype(np.float32)[:, None, None]
        u = (dx * c + dy * s) / a.astype(np.float32)[:, None, None]
        v = (dy * c - dx * s) / b.astype(np.float32)[:, None, None]
        r = np.sqrt(u * u + v * v)
        # Soft edge: smoothstep over +-edge px around r = 1. Compact support keeps every blob
        # inside its window, so regions rendered separately agree exactly. The dome makes
        # centres brighter, as in real nuclei.
        scale = ((a + b) / 2 / (2 * edge)).astype(np.float32)[:, None, None]
        t = np.clip(scale * (1 - r) + 0.5, 0, 1)
        prof = t * t * (3 - 2 * t) * (1 - 0.3 * np.minimum(r, 1) ** 2)
        prof *= peak.astype(np.float32)[:, None, None]
        # Accumulate on a canvas padded by the window margin: no bounds masks needed.
        pad = half + 1
        ph, pw = height + 2 * pad, width + 2 * pad
        iy = np.clip(iy + pad, 0, ph - 1)  # clip only matters for far-away candidates
        ix = np.clip(ix + pad, 0, pw - 1)
        flat = (iy[:, :, None] * pw + ix[:, None, :]).ravel()
        canvas = np.bincount(flat, weights=prof.ravel(), minlength=ph * pw).reshape(ph, pw)
        return canvas[pad : pad + height, pad : pad + width].astype(np.float32)


def place_nuclei(
    shape: tuple[int, int],
    n_nuclei: int | None = None,
    density: float | None = None,
    diameter: tuple[float, float] = (12.0, 24.0),
    intensity: tuple[float, float] = (1500.0, 3500.0),
    min_distance: float | None = None,
    background: float = 200.0,
    noise: float = 30.0,
    seed: int = 0,
    centers: np.ndarray | None = None,
    tissue: float = 1.0,
) -> NucleusField:
    """Draw non-overlapping nucleus positions and shapes.

    Positions come from random sequential adsorption (a hard-core process: every pair of
    centres is at least ``min_distance`` apart), processed in row bands so huge images need
    bounded memory.

    Parameters
    ----------
    shape : tuple of int
        Image (H, W).
    n_nuclei : int, optional
        Exact number of nuclei. Default: from ``density``.
    density : float, optional
        Nuclei per megapixel (BBBC039 U2OS fields have about 400). Used when ``n_nuclei`` is None;
        default 400.
    diameter : tuple of float
        Range of major-axis diameters (pixels).
    intensity : tuple of float
        Range of peak intensities above background.
    min_distance : float, optional
        Minimum centre distance; default ``1.1 * diameter[1] + 2`` so blobs never touch.
    background, noise : float
        Background level and read-noise sigma.
    seed : int
        Random seed.
    centers : numpy.ndarray, optional
        (N, 2) explicit centres ``y, x`` (not checked for overlap).
    tissue : float
        Fraction of the image covered by "tissue": below 1, nuclei are kept only inside smooth
        random blobs covering about this fraction, the rest is bare background, as on a slide.

    Returns
    -------
    NucleusField
    """
    h, w = int(shape[0]), int(shape[1])
    rng = np.random.default_rng(seed)
    d_lo, d_hi = float(diameter[0]), float(diameter[1])
    if min_distance is None:
        min_distance = 1.1 * d_hi + 2.0
    if centers is not None:
        pts = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    elif n_nuclei is not None:
        pts = hard_core_exact(h, w, int(n_nuclei), float(min_distance), rng)
    else:
        pts = hard_core_density(
            h, w, 400.0 if density is None else float(density), min_distance, rng
        )
    if tissue < 1.0:
        pts = pts[tissue_mask_at(pts, (h, w), tissue, seed)]
    n = len(pts)
    d = rng.uniform(d_lo, d_hi, n)
    ratio = rng.uniform(0.7, 1.0, n)
    semi = np.stack([d / 2, d / 2 * ratio], axis=1)
    angles = rng.uniform(0, np.pi, n)
    peaks = rng.uniform(float(intensity[0]), float(intensity[1]), n)
    return NucleusField((h, w), pts, semi, angles, peaks, background, noise)


TISSUE_CELL = 256  # px per cell of the tissue mask: blobs are many cells across


def tissue_mask_at(
    points: np.ndarray, shape: tuple[int, int], fraction: float, seed: int = 0
) -> np.ndarray:
    """Whether each (y, x) point lies in the tissue of a slide-like random layout.

    The layout is a smoothed random field on a grid of ``TISSUE_CELL``-px cells, thresholded so
    that about ``fraction`` of the cells are tissue; it depends only on ``shape``, ``fraction``
    and ``seed``.
    """
    from scipy.ndimage import gaussian_filter

    if not 0 < fraction <= 1:
        raise ValueError(f"tissue fraction must be in (0, 1], got {fraction}")
    gh, gw = -(-int(shape[0]) // TISSUE_CELL), -(-int(shape[1]) // TISSUE_CELL)
    field = np.random.default_rng([int(seed), 11]).standard_normal((gh, gw))
    field = gaussian_filter(field, sigma=max(1.0, min(gh, gw) / 10), mode="reflect")
    mask = field >= np.quantile(field, 1.0 - fraction)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    iy = np.clip((pts[:, 0] // TISSUE_CELL).astype(int), 0, gh - 1)
    ix = np.clip((pts[:, 1] // TISSUE_CELL).astype(int), 0, gw - 1)
    return mask[iy, ix]


def make_nuclei_image(
    shape: tuple[int, int] = (512, 512),
    n_nuclei: int | None = None,
    diameter: tuple[float, float] = (12.0, 24.0),
    centers: np.ndarray | None = None,
    dtype: np.dtype | type = np.uint16,
    background: float = 200,
    intensity: tuple[float, float] = (1500, 3500),
    noise: float = 30.0,
    min_distance: float | None = None,
    seed: int = 0,
) -> SyntheticImage:
    """Render a synthetic nucleus image in memory.

    Parameters
    ----------
    shape : tuple of int
        (H, W).
    n_nuclei : int, optional
        Number of nuclei; default about 400 per megapixel (e.g. ~105 for 512 x 512).
    diameter : tuple of float
        Range of major-axis diameters in pixels (minor axis is 70-100 % of it).
    centers : numpy.ndarray, optional
        (N, 2) exact centres ``y, x`` (e.g. on tile edges); overrides ``n_nuclei``.
    dtype : numpy dtype
        Output dtype (integers are clipped to their range).
    background : float
        Background level.
    intensity : tuple of float
        Range of peak intensities above background.
    noise : float
        Gaussian read-noise sigma; shot noise (variance = signal) is added too. 0 gives a
        noise-free image.
    min_distance : float, optional
        Minimum centre distance (default ``1.1 * diameter[1] + 2``: blobs never touch).
    seed : int
        Random seed.

    Returns
    -------
    SyntheticImage
    """
    field = place_nuclei(
        shape,
        n_nuclei=n_nuclei,
        diameter=diameter,
        intensity=intensity,
        min_distance=min_distance,
        background=background,
        noise=noise,
        seed=seed,
        centers=centers,
    )
    image = field.render(0, 0, field.shape[0], field.shape[1], 1, dtype, seed=[seed, 0, 0, 0])
    return SyntheticImage(image, field.centers.copy(), field.boxes, field.diameters)


def make_lazy_nuclei_image(
    shape: tuple[int, int] = (8192, 8192),
    chunk: int = 1024,
    density: float = 400.0,
    diameter: tuple[float, float] = (12.0, 24.0),
    dtype: np.dtype | type = np.uint16,
    seed: int = 0,
    **kwargs: float,
) -> tuple[da.Array, NucleusField]:
    """A dask array whose chunks are rendered on demand from known nucleus positions.

    Parameters
    ----------
    shape : tuple of int
        (H, W).
    chunk : int
        Chunk edge length.
    density : float
        Nuclei per megapixel.
    diameter : tuple of float
        Range of major-axis diameters.
    dtype : numpy dtype
        Output dtype.
    seed : int
        Random seed (positions and per-chunk noise).
    **kwargs
        ``intensity``, ``background``, ``noise``, ``min_distance`` for :func:`place_nuclei`.

    Returns
    -------
    (dask.array.Array, NucleusField)
        The lazy image and its truth (``field.truth()``).
    """
    field = place_nuclei(shape, density=density, diameter=diameter, seed=seed, **kwargs)
    arr = field.to_dask(1, chunk, dtype, seed)
    return arr, field


_NOISE_BANK: dict[int, np.ndarray] = {}
_BANK_SIZE = 2048


def prepare_noise(seed: int) -> None:
    """Build the shared noise bank for ``seed`` now, before several threads render tiles."""
    _unit_noise(1, 1, [seed])


def _unit_noise(height: int, width: int, seed: int | list[int]) -> np.ndarray:
    """Standard-normal noise for a region, cut at a seeded random offset from a cached bank.

    Drawing fresh normals dominated tile rendering; a 16 MB bank reused at random offsets looks
    the same to a detector and makes gigapixel writes several times faster.
    """
    rng = np.random.default_rng(seed)
    if height > _BANK_SIZE // 2 or width > _BANK_SIZE // 2:
        return rng.standard_normal((height, width), dtype=np.float32)
    bank_seed = int(np.atleast_1d(seed)[0])
    bank = _NOISE_BANK.get(bank_seed)
    if bank is None:
        bank = np.random.default_rng([bank_seed, 7]).standard_normal(
            (_BANK_SIZE, _BANK_SIZE), dtype=np.float32
        )
        _NOISE_BANK.clear()  # keep at most one bank
        _NOISE_BANK[bank_seed] = bank
    oy = int(rng.integers(0, _BANK_SIZE - height + 1))
    ox = int(rng.integers(0, _BANK_SIZE - width + 1))
    return bank[oy : oy + height, ox : ox + width]


def _truth_frame(centers: np.ndarray, boxes: np.ndarray, diameters: np.ndarray) -> pd.DataFrame:
    import pandas as pd

    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return pd.DataFrame(
        {
            "y": centers[:, 0],
            "x": centers[:, 1],
            "y0": boxes[:, 0],
            "x0": boxes[:, 1],
            "y1": boxes[:, 2],
            "x1": boxes[:, 3],
            "diameter": np.asarray(diameters, dtype=np.float64).reshape(-1),
        }
    )


def _cast(img: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        np.rint(img, out=img)
        np.clip(img, info.min, info.max, out=img)
    return img.astype(dtype, copy=False)
