"""Read overlapping tiles of a chunked (lazy) image, decoding each chunk once.

Detection tiles overlap (64 px by default) and rarely line up with the file's chunks (TIFF
tiles of 256 or 512 px, or strips merged into bands). Read one by one, a 640 px tile decodes
4-9 chunks, and each chunk is decompressed again by every tile that touches it: 2-4 times over.
:class:`ChunkCache` keeps the decoded chunks that the next tiles still need. Tiles come row by
row, so chunks above the current tile are dropped as soon as the tiles pass them: memory stays
at about two or three rows of chunks, with a hard cap.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np

MAX_BYTES = 192 * 2**20
"""Cap on the decoded chunks held (bytes); the oldest are dropped first."""

MAX_CHUNK_BYTES = 32 * 2**20
"""Arrays with larger chunks (one chunk for a whole in-memory image, say) are read directly."""


def chunk_bounds(array, axis: int) -> np.ndarray | None:
    """Chunk edges ``[0, ..., n]`` of ``array`` along ``axis``; None if it is not chunked.

    Understands dask (``chunks`` as sizes per chunk) and zarr / h5py (one chunk size).
    """
    chunks = getattr(array, "chunks", None)
    if not chunks or not hasattr(array, "shape"):
        return None
    n = int(array.shape[axis])
    step = chunks[axis]
    if isinstance(step, (tuple, list)):
        sizes = np.asarray(step, dtype=np.int64)
    else:
        step = int(step)
        sizes = np.full(-(-n // step), step, dtype=np.int64)
        if len(sizes):
            sizes[-1] = n - step * (len(sizes) - 1)
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return edges if edges[-1] == n else None


class ChunkCache:
    """(Y, X) windows assembled from cached, chunk-aligned blocks.

    Parameters
    ----------
    read : callable
        ``read(ys, xs)`` returns the block ``[ys, xs]`` (slices on chunk edges) as numpy,
        (h, w) or (h, w, C).
    y_edges, x_edges : numpy.ndarray
        Chunk edges along Y and X (:func:`chunk_bounds`).
    max_bytes : int
        Cap on the cached blocks.
    """

    def __init__(
        self,
        read: Callable[[slice, slice], np.ndarray],
        y_edges: np.ndarray,
        x_edges: np.ndarray,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.read = read
        self.y_edges = np.asarray(y_edges)
        self.x_edges = np.asarray(x_edges)
        self.max_bytes = int(max_bytes)
        self.blocks: collections.OrderedDict = collections.OrderedDict()
        self.nbytes = 0
        self.decoded = 0  # blocks read from the array (for tests and benchmarks)

    def _span(self, edges: np.ndarray, start: int, stop: int) -> range:
        first = int(np.searchsorted(edges, start, side="right")) - 1
        last = int(np.searchsorted(edges, stop, side="left"))
        return range(max(first, 0), min(last, len(edges) - 1))

    def _block(self, i: int, j: int) -> np.ndarray:
        key = (i, j)
        block = self.blocks.get(key)
        if block is not None:
            self.blocks.move_to_end(key)
            return block
        ys = slice(int(self.y_edges[i]), int(self.y_edges[i + 1]))
        xs = slice(int(self.x_edges[j]), int(self.x_edges[j + 1]))
        block = np.asarray(self.read(ys, xs))
        self.decoded += 1
        self.blocks[key] = block
        self.nbytes += block.nbytes
        while self.nbytes > self.max_bytes and len(self.blocks) > 1:
            _, old = self.blocks.popitem(last=False)
            self.nbytes -= old.nbytes
        return block

    def _drop_rows_above(self, row: int) -> None:
        """Tiles come row by row: chunk rows above ``row`` are not needed again."""
        for key in [k for k in self.blocks if k[0] < row]:
            self.nbytes -= self.blocks.pop(key).nbytes

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        rows = self._span(self.y_edges, ys.start, ys.stop)
        cols = self._span(self.x_edges, xs.start, xs.stop)
        if not rows or not cols:
            return np.asarray(self.read(ys, xs))
        self._drop_rows_above(rows.start)
        out = None
        for i in rows:
            by0 = int(self.y_edges[i])
            y0, y1 = max(ys.start, by0), min(ys.stop, int(self.y_edges[i + 1]))
            for j in cols:
                bx0 = int(self.x_edges[j])
                x0, x1 = max(xs.start, bx0), min(xs.stop, int(self.x_edges[j + 1]))
                block = self._block(i, j)
                if out is None:
                    shape = (ys.stop - ys.start, xs.stop - xs.start, *block.shape[2:])
                    out = np.empty(shape, dtype=block.dtype)
                out[y0 - ys.start : y1 - ys.start, x0 - xs.start : x1 - xs.start] = block[
                    y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0
                ]
        return out
