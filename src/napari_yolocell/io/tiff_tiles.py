"""One tiled TIFF page as a chunked array whose tiles tifffile decodes directly.

The detection engine reads a large image chunk by chunk (``engine.detect.PlaneView`` through
:class:`~napari_yolocell.io.chunk_cache.ChunkCache`). Through zarr's store each chunk also pays
zarr's per-chunk machinery; reading the tile's bytes and calling tifffile's decoder is the same
decode with less around it (docs/benchmarks.md, "8192 x 8192, idle"). napari and dask keep using
the zarr array; only the engine reads through this.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_JPEG = {6, 7, 33007, 34892}


class TiffTiles:
    """Read-only array view of one tiled, single-page TIFF image level (YX or YXS).

    Attributes
    ----------
    shape : tuple of int
        ``(Y, X)`` or ``(Y, X, S)`` as tifffile's series level has it.
    chunks : tuple of int
        The TIFF tile, ``(tilelength, tilewidth[, S])``.
    dtype : numpy.dtype
        Decoded pixel type (native byte order).
    decoded : int
        Tiles decoded so far (for tests and benchmarks).
    """

    def __init__(self, page: Any, shape: tuple[int, ...]) -> None:
        self.page = page
        self.shape = tuple(int(s) for s in shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(page.dtype).newbyteorder("=")
        self.tile = (int(page.tilelength), int(page.tilewidth))
        self.chunks = self.tile + self.shape[2:]
        self.grid = (-(-self.shape[0] // self.tile[0]), -(-self.shape[1] // self.tile[1]))
        self.decoded = 0
        # napari may read the same file through zarr from another thread: seek + read locked
        if not page.parent.filehandle.has_lock:
            page.parent.filehandle.set_lock(True)
        self._decode = page.decode
        self._kwargs: dict[str, Any] = {"_fullsize": True}
        if page.compression in _JPEG:
            self._kwargs.update(jpegtables=page.jpegtables, jpegheader=page.keyframe.jpegheader)

    @classmethod
    def from_level(cls, level: Any) -> TiffTiles | None:
        """The direct reader of a tifffile series level, or None when it does not qualify.

        Qualifies: one page, tiled, no tile depth, samples interleaved (or one sample), and the
        level's shape is the page's ``(Y, X[, S])``. Anything else (stacks, planar RGB, strips)
        is read through zarr as before.
        """
        pages = getattr(level, "pages", None)
        if pages is None or len(pages) != 1 or pages[0] is None:
            return None
        page = pages[0]
        if not hasattr(page, "dataoffsets") or not page.is_tiled:
            return None
        if getattr(page, "imagedepth", 1) != 1 or getattr(page, "tiledepth", 1) != 1:
            return None
        samples = int(page.samplesperpixel)
        if samples > 1 and int(page.planarconfig) != 1:
            return None
        shape = tuple(int(s) for s in level.shape)
        expected = (int(page.imagelength), int(page.imagewidth))
        if samples > 1:
            expected = (*expected, samples)
        if shape != expected or len(page.dataoffsets) != (
            -(-expected[0] // page.tilelength) * -(-expected[1] // page.tilewidth)
        ):
            return None
        return cls(page, shape)

    def _read_tile(self, i: int, j: int) -> np.ndarray:
        """Tile (i, j) cropped to the image, as ``(h, w)`` or ``(h, w, S)``."""
        index = i * self.grid[1] + j
        offset = int(self.page.dataoffsets[index])
        count = int(self.page.databytecounts[index])
        h = min(self.tile[0], self.shape[0] - i * self.tile[0])
        w = min(self.tile[1], self.shape[1] - j * self.tile[1])
        if count == 0 or offset == 0:  # sparse file: an empty tile is zeros
            return np.zeros((h, w, *self.shape[2:]), self.dtype)
        fh = self.page.parent.filehandle
        with fh.lock:
            if fh.closed:  # tifffile's file cache (zarr's store) may have closed it
                fh.open()
            fh.seek(offset)
            data = fh.read(count)
        segment = self._decode(data, index, **self._kwargs)[0]
        self.decoded += 1
        # normalised segment shape: (depth, length, width, samples)
        block = np.asarray(segment).reshape(segment.shape[-3:])[:h, :w]
        return block if self.ndim == 3 else block[..., 0]

    def _region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0, *self.shape[2:]), self.dtype)
        ty, tx = self.tile
        for i in range(y0 // ty, -(-y1 // ty)):
            for j in range(x0 // tx, -(-x1 // tx)):
                block = self._read_tile(i, j)
                by, bx = i * ty, j * tx
                sy0, sy1 = max(y0, by), min(y1, by + block.shape[0])
                sx0, sx1 = max(x0, bx), min(x1, bx + block.shape[1])
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = block[
                    sy0 - by : sy1 - by, sx0 - bx : sx1 - bx
                ]
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        if len(key) != self.ndim:
            raise IndexError(f"too many indices for a {self.ndim}-D image")
        bounds, rest = [], []
        for k, n in zip(key[:2], self.shape[:2], strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0 or stop <= start:  # reversed or empty: let numpy do it
                    lo, hi = 0, n
                    rest.append(slice(start - lo, None if stop < 0 else stop - lo, step))
                else:
                    lo, hi = start, stop
                    rest.append(slice(None, None, step))
            else:
                k = int(np.asarray(k))
                k = k + n if k < 0 else k
                if not 0 <= k < n:
                    raise IndexError(f"index {k} out of range for axis of size {n}")
                lo, hi = k, k + 1
                rest.append(0)
            bounds.append((lo, hi))
        (y0, y1), (x0, x1) = bounds
        block = self._region(y0, y1, x0, x1)
        return block[(*rest, *key[2:])]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)
