"""Decoded-chunk cache: same pixels as direct reads, each chunk decoded once per pass."""

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import DetectParams, detect_image
from napari_yolocell.engine.normalize import to_uint8, uint8_mapping
from napari_yolocell.engine.tiling import tile_grid
from napari_yolocell.io.chunk_cache import ChunkCache, chunk_bounds
from napari_yolocell.io.tiff import open_tiff
from napari_yolocell.io.tiff_tiles import TiffTiles
from napari_yolocell.models.loading import load_detector


class CountingChunks:
    """A chunked array (zarr-style ``chunks``) that counts the chunks read from it."""

    def __init__(self, data, chunks):
        self.data, self.chunks = data, chunks
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.data[key]


def _cache(arr):
    def read(ys, xs):
        return arr[ys, xs]

    return ChunkCache(read, chunk_bounds(arr, 0), chunk_bounds(arr, 1))


def test_chunk_bounds_of_dask_zarr_and_numpy():
    d = da.zeros((1000, 700), chunks=((300, 300, 400), 256))
    assert chunk_bounds(d, 0).tolist() == [0, 300, 600, 1000]
    assert chunk_bounds(d, 1).tolist() == [0, 256, 512, 700]
    z = zarr.create_array(store={}, shape=(1000, 700), chunks=(512, 512), dtype="u2")
    assert chunk_bounds(z, 0).tolist() == [0, 512, 1000]
    assert chunk_bounds(np.zeros((10, 10)), 0) is None


@pytest.mark.parametrize("channels", [(), (3,)])
def test_windows_equal_direct_reads(channels):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 65535, (1100, 900, *channels), dtype=np.uint16)
    arr = CountingChunks(data, (256, 300, *channels))
    cache = _cache(arr)
    for _ in range(60):
        y0, x0 = rng.integers(0, 1000), rng.integers(0, 800)
        h, w = rng.integers(1, 1100 - y0 + 1), rng.integers(1, 900 - x0 + 1)
        key = (slice(int(y0), int(y0 + h)), slice(int(x0), int(x0 + w)))
        np.testing.assert_array_equal(cache[key], data[key])


def test_tile_grid_decodes_each_chunk_once_and_memory_stays_bounded():
    data = np.random.default_rng(1).integers(0, 255, (3000, 2600), dtype=np.uint8)
    arr = CountingChunks(data, (512, 512))
    cache = _cache(arr)
    peak = 0
    for tile in tile_grid(data.shape, 640, 64):
        np.testing.assert_array_equal(cache[tile.slices], data[tile.slices])
        peak = max(peak, cache.nbytes)
    n_chunks = 6 * 6  # ceil(3000 / 512) x ceil(2600 / 512)
    assert cache.decoded == len(arr.reads) == n_chunks
    assert len(set(map(str, arr.reads))) == n_chunks
    # about three rows of chunks at a time, not the whole image
    assert peak <= 3 * 6 * 512 * 512


def test_memory_cap_keeps_results_correct():
    data = np.arange(2000 * 2000, dtype=np.uint32).reshape(2000, 2000)
    arr = CountingChunks(data, (256, 256))
    cache = ChunkCache(lambda ys, xs: arr[ys, xs], *(chunk_bounds(arr, a) for a in (0, 1)), 10)
    for tile in tile_grid(data.shape, 640, 64):
        np.testing.assert_array_equal(cache[tile.slices], data[tile.slices])
    assert len(cache.blocks) == 1  # cap below one chunk: only the last one kept


def test_uint8_mapping_equals_to_uint8():
    rng = np.random.default_rng(2)
    for tile in (
        rng.integers(0, 65535, (300, 200), dtype=np.uint16),
        rng.integers(0, 255, (300, 200), dtype=np.uint8),
        rng.normal(500, 200, (300, 200)).astype(np.float32),
    ):
        for lo, hi in ((100.0, 3000.0), (3.5, 200.25), (10.0, 10.0)):
            np.testing.assert_array_equal(uint8_mapping(lo, hi)(tile), to_uint8(tile, lo, hi))


def test_detection_through_the_cache_equals_in_memory(tmp_path):
    """A tiled, compressed TIFF (read through the cache) gives the same detections as the
    same pixels in memory, and no TIFF tile is decoded twice."""
    syn = make_nuclei_image(shape=(1500, 1700), seed=11)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, syn.image, tile=(256, 256), compression="zlib")
    det = load_detector("classical")
    params = DetectParams(tile=640, overlap=64)
    ref = detect_image(syn.image, det, params)
    image = open_tiff(path)
    arr = CountingChunks(image.levels[0], tuple(c[0] for c in image.levels[0].chunks))
    got = detect_image(arr, det, params)
    assert len(ref) > 100
    np.testing.assert_allclose(
        got[["y", "x"]].to_numpy(), ref[["y", "x"]].to_numpy(), rtol=0, atol=1e-9
    )
    tiles = [k for k in arr.reads if k[0].step in (None, 1)]
    assert len(tiles) == len(set(map(str, tiles))) == 6 * 7  # each 256 px TIFF tile once
    # the reader's own dask arrays: TIFF tiles decoded by tifffile directly, each once, same
    # answer
    source = image.levels[0].yolocell_source
    assert isinstance(source, TiffTiles)
    direct = detect_image(image.levels, det, params)
    np.testing.assert_array_equal(direct[["y", "x"]].to_numpy(), got[["y", "x"]].to_numpy())
    assert source.decoded == 6 * 7
