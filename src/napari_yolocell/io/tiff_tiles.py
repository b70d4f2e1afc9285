"""A tiled TIFF image level as a chunked array whose tiles tifffile decodes directly.

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
    """Read-only array view of one tiled TIFF image level: pages of ``(Y, X)`` or ``(Y, X, S)``.

    Attributes
    ----------
    shape : tuple of int
        The level's shape as tifffile's series has it: leading axes (one page per index, in
        C order), then ``(Y, X)`` or ``(Y, X, S)``.
    chunks : tuple of int
        One page by the TIFF tile: ``(1, ..., tilelength, tilewidth[, S])``.
    dtype : numpy.dtype
        Decoded pixel type (native byte order).
    decoded : int
        Tiles decoded so far (for tests and benchmarks).
    """

    def __init__(self, pages: list[Any], shape: tuple[int, ...]) -> None:
        key = pages[0].keyframe
        self.pages = pages
        self.shape = tuple(int(s) for s in shape)
        self.ndim = len(self.shape)
        self.samples = int(key.samplesperpixel) > 1
        self.lead = self.ndim - (3 if self.samples else 2)  # axes indexing pages
        self.plane = self.shape[self.lead :]
        self.dtype = np.dtype(key.dtype).newbyteorder("=")
        self.tile = (int(key.tilelength), int(key.tilewidth))
        self.chunks = (1,) * self.lead + self.tile + self.plane[2:]
        self.grid = (-(-self.plane[0] // self.tile[0]), -(-self.plane[1] // self.tile[1]))
        self.decoded = 0
        # napari may read the same file through zarr from another thread: seek + read locked
        self.filehandle = key.parent.filehandle
        if not self.filehandle.has_lock:
            self.filehandle.set_lock(True)
        self._decode = key.decode
        self._kwargs: dict[str, Any] = {"_fullsize": True}
        self._jpeg = key.compression in _JPEG
        if self._jpeg:
            self._kwargs["jpegheader"] = key.jpegheader

    @classmethod
    def from_level(cls, level: Any) -> TiffTiles | None:
        """The direct reader of a tifffile series level, or None when it does not qualify.

        Qualifies: tiled pages of one structure (no tile depth, samples interleaved or one
        sample), one page per index of the leading axes. Anything else (strips, planar RGB,
        missing pages) is read through zarr as before.
        """
        pages = list(getattr(level, "pages", None) or [])
        if not pages or any(p is None or not hasattr(p, "dataoffsets") for p in pages):
            return None
        key = pages[0].keyframe
        if not key.is_tiled or getattr(key, "imagedepth", 1) != 1:
            return None
        if getattr(key, "tiledepth", 1) != 1:
            return None
        samples = int(key.samplesperpixel)
        if samples > 1 and int(key.planarconfig) != 1:
            return None
        shape = tuple(int(s) for s in level.shape)
        plane = (int(key.imagelength), int(key.imagewidth), *((samples,) if samples > 1 else ()))
        lead = shape[: len(shape) - len(plane)]
        if shape[len(lead) :] != plane or int(np.prod(lead, dtype=np.int64)) != len(pages):
            return None
        ntiles = -(-plane[0] // key.tilelength) * -(-plane[1] // key.tilewidth)
        if any(p.keyframe is not key or len(p.dataoffsets) != ntiles for p in pages):
            return None
        return cls(pages, shape)

    def _read_tile(self, page: Any, i: int, j: int) -> np.ndarray:
        """Tile (i, j) of a page cropped to the image, as ``(h, w)`` or ``(h, w, S)``."""
        index = i * self.grid[1] + j
        offset = int(page.dataoffsets[index])
        count = int(page.databytecounts[index])
        h = min(self.tile[0], self.plane[0] - i * self.tile[0])
        w = min(self.tile[1], self.plane[1] - j * self.tile[1])
        if count == 0 or offset == 0:  # sparse file: an empty tile is zeros
            return np.zeros((h, w, *self.plane[2:]), self.dtype)
        fh = self.filehandle
        with fh.lock:
            if fh.closed:  # tifffile's file cache (zarr's store) may have closed it
                fh.open()
            fh.seek(offset)
            data = fh.read(count)
        kwargs = self._kwargs
        if self._jpeg:
            kwargs = {**kwargs, "jpegtables": page.jpegtables}
        segment = self._decode(data, index, **kwargs)[0]
        self.decoded += 1
        # normalised segment shape: (depth, length, width, samples)
        block = np.asarray(segment).reshape(segment.shape[-3:])[:h, :w]
        return block if self.samples else block[..., 0]

    def _region(self, page: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0, *self.plane[2:]), self.dtype)
        ty, tx = self.tile
        for i in range(y0 // ty, -(-y1 // ty)):
            for j in range(x0 // tx, -(-x1 // tx)):
                block = self._read_tile(page, i, j)
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
        # leading axes: which pages (an int drops its axis, a slice keeps it)
        lead = self.shape[: self.lead]
        lead_index = [np.arange(n)[k] for k, n in zip(key[: self.lead], lead, strict=True)]
        yx = key[self.lead : self.lead + 2]
        bounds, rest = [], []
        for k, n in zip(yx, self.plane[:2], strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0 or stop <= start:  # reversed or empty: let numpy do it
                    lo, hi = 0, n
                    rest.append(slice(start, None if stop < 0 else stop, step))
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
        inner = (*rest, *key[self.lead + 2 :])
        out_lead = sum((np.shape(ix) for ix in lead_index), ())
        grids = np.meshgrid(*[np.atleast_1d(ix) for ix in lead_index], indexing="ij")
        flat = np.ravel_multi_index(grids, lead).ravel() if self.lead else np.zeros(1, int)
        if flat.size == 0:
            empty = np.empty((y1 - y0, x1 - x0, *self.plane[2:]), self.dtype)[inner]
            return np.empty(out_lead + empty.shape, self.dtype)
        blocks = [self._region(self.pages[int(p)], y0, y1, x0, x1)[inner] for p in flat]
        out = np.stack(blocks)
        return out.reshape(out_lead + out.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)
