"""Streaming writer of large synthetic nucleus BigTIFFs with known truth (tests, benchmarks).

:func:`write_synthetic_tiff` renders a tiled, pyramidal BigTIFF tile by tile from a
:class:`~napari_yolocell.data.synthetic.NucleusField`: nucleus positions are fixed up front, so
blobs that cross tile borders come out identical on both sides and lower levels are rendered
from the same positions. Memory stays bounded for gigapixel images.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile

from napari_yolocell.data.synthetic import NucleusField, place_nuclei, prepare_noise

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["write_synthetic_tiff"]


def write_synthetic_tiff(
    path: str | os.PathLike,
    shape: tuple[int, int] = (8192, 8192),
    tile: int = 512,
    levels: int = 4,
    diameter: tuple[float, float] = (12.0, 24.0),
    density: float = 400.0,
    seed: int = 0,
    compression: str | None = "zlib",
    compressionargs: dict | None = None,
    dtype: np.dtype | type = np.uint16,
    maxworkers: int | None = None,
    **kwargs: float,
) -> pd.DataFrame:
    """Stream a tiled, pyramidal (SubIFD) BigTIFF of synthetic nuclei to disk.

    The image is generated tile by tile (never whole in memory); pyramid levels are rendered
    from the same nucleus positions at 1/2, 1/4, ... resolution (not pixel-exact downsamples).
    Memory is bounded by the nucleus table (~100 bytes per nucleus) plus a few tiles.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (``.tif``).
    shape : tuple of int
        Full-resolution (H, W), e.g. (32768, 32768) for a gigapixel image.
    tile : int
        Tile edge length (multiple of 16).
    levels : int
        Total number of resolution levels including full resolution (1 = no pyramid).
    diameter : tuple of float
        Range of major-axis diameters at full resolution.
    density : float
        Nuclei per megapixel.
    seed : int
        Random seed.
    compression : str or None
        tifffile compression, e.g. ``"zlib"`` (default), ``"zstd"``, None.
    compressionargs : dict, optional
        Codec arguments; default ``{"level": 1}`` for zlib/zstd (fast; noisy data compress
        poorly at any level).
    dtype : numpy dtype
        Pixel type.
    maxworkers : int, optional
        Threads used by tifffile to compress tiles (default: tifffile's choice).
    **kwargs
        ``intensity``, ``background``, ``noise``, ``min_distance`` for :func:`place_nuclei`.

    Returns
    -------
    pandas.DataFrame
        Ground truth, columns ``y, x, y0, x0, y1, x1, diameter`` (full-resolution pixels).
        The count is also stored in the file (tifffile JSON description, ``true_count``).
    """
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    field = place_nuclei(shape, density=density, diameter=diameter, seed=seed, **kwargs)
    dtype = np.dtype(dtype)
    if compressionargs is None and compression in ("zlib", "zstd", "deflate", "adobe_deflate"):
        compressionargs = {"level": 1}
    h, w = field.shape
    level_shapes = [(h, w)]
    for _ in range(1, max(1, int(levels))):
        ph, pw = level_shapes[-1]
        if min(ph, pw) < 2:
            break
        level_shapes.append((-(-ph // 2), -(-pw // 2)))

    if maxworkers is None:
        maxworkers = max(2, min(4, os.cpu_count() or 1))
    encode = _tile_encoder(compression, compressionargs)
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for lvl, lshape in enumerate(level_shapes):
            if encode is not None:
                # Render + compress tiles in a small thread pool (numpy and the codecs release the
                # GIL), in order, with a bounded number of tiles in flight.
                tiles = _encoded_tiles(
                    field, lshape, tile, 2**lvl, dtype, seed, lvl, encode, maxworkers
                )
                kwargs_c = dict(compression=compression)
            else:
                tiles = _tile_iterator(field, lshape, tile, 2**lvl, dtype, seed, lvl)
                kwargs_c = dict(
                    compression=compression,
                    compressionargs=compressionargs,
                    maxworkers=maxworkers,
                    buffersize=16 * tile * tile * dtype.itemsize,
                )
            common = dict(dtype=dtype, tile=(tile, tile), photometric="minisblack", **kwargs_c)
            if lvl == 0:
                tw.write(
                    tiles,
                    shape=lshape,
                    subifds=len(level_shapes) - 1,
                    metadata={"true_count": len(field), "seed": seed},
                    **common,
                )
            else:
                # Keep tifffile's default (shaped) metadata: metadata=None here breaks the
                # shaped series of the main IFD.
                tw.write(tiles, shape=lshape, subfiletype=1, **common)
    return field.truth()


def _tile_encoder(
    compression: str | None, compressionargs: dict | None
) -> Callable[[np.ndarray], bytes] | None:
    """Encoder for pre-compressed tiles, or None to let tifffile compress."""
    if compression not in ("zlib", "zstd", "adobe_deflate", "deflate"):
        return None
    import imagecodecs

    level = (compressionargs or {}).get("level")
    if compression == "zstd":
        return lambda data: imagecodecs.zstd_encode(data, level=level)
    return lambda data: imagecodecs.zlib_encode(data, level=level)


def _encoded_tiles(
    field: NucleusField,
    shape: tuple[int, int],
    tile: int,
    factor: int,
    dtype: np.dtype,
    seed: int,
    level: int,
    encode: Callable[[np.ndarray], bytes],
    workers: int,
) -> Iterator[bytes]:
    h, w = shape
    prepare_noise(seed)  # build the shared noise bank before threads start

    def job(ty: int, tx: int) -> bytes:
        th, tw_ = min(tile, h - ty), min(tile, w - tx)
        data = field.render(ty, tx, th, tw_, factor, dtype, seed=[seed, level, ty, tx])
        if (th, tw_) != (tile, tile):
            padded = np.zeros((tile, tile), dtype)  # encoded tiles must be full size
            padded[:th, :tw_] = data
            data = padded
        return encode(np.ascontiguousarray(data))

    pending: deque[Future[bytes]] = deque()
    with ThreadPoolExecutor(workers) as pool:
        for ty in range(0, h, tile):
            for tx in range(0, w, tile):
                pending.append(pool.submit(job, ty, tx))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _tile_iterator(
    field: NucleusField,
    shape: tuple[int, int],
    tile: int,
    factor: int,
    dtype: np.dtype,
    seed: int,
    level: int,
) -> Iterator[np.ndarray]:
    h, w = shape
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            th, tw_ = min(tile, h - ty), min(tile, w - tx)
            # tifffile pads partial edge tiles itself.
            yield field.render(ty, tx, th, tw_, factor, dtype, seed=[seed, level, ty, tx])
