"""Direct tile reader: the same pixels as tifffile/zarr for every layout it takes, and the
layouts it does not take fall back to zarr."""

import numpy as np
import pytest
import tifffile
import zarr

from napari_yolocell.io.tiff import open_tiff
from napari_yolocell.io.tiff_tiles import TiffTiles

KEYS = [
    (slice(None), slice(None)),
    (slice(100, 613), slice(250, 777)),  # across tile edges
    (slice(900, None), slice(1000, None)),  # the partial edge tiles
    (slice(7, 900, 3), slice(None, None, 5)),
    (5, slice(None)),
    (-1, slice(30, 40)),
    (slice(None, None, -7), 3),
    (slice(50, 10), slice(None)),  # empty
    (Ellipsis,),
]


def _image(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)


@pytest.mark.parametrize(
    ("shape", "dtype", "options"),
    [
        ((1001, 1200), "uint16", {"compression": "zlib"}),
        ((1001, 1200), ">u2", {"compression": "zlib"}),  # big-endian file
        ((1001, 1200), "float32", {"compression": "lzw", "predictor": True}),
        ((1001, 1200, 3), "uint8", {"compression": "zlib", "photometric": "rgb"}),
        ((1001, 1200), "uint8", {"compression": None}),
    ],
)
def test_same_pixels_as_tifffile(tmp_path, shape, dtype, options):
    data = _image(shape, np.dtype(dtype).newbyteorder("="))
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, data.astype(dtype), tile=(256, 256), **options)
    image = open_tiff(path)
    source = image.levels[0].yolocell_source
    if options["compression"] is None:  # uncompressed contiguous tiles are not memory-mapped
        assert isinstance(source, (TiffTiles, np.memmap))
        if not isinstance(source, TiffTiles):
            return
    assert isinstance(source, TiffTiles)
    assert source.shape == shape and source.chunks[:2] == (256, 256)
    assert source.dtype == data.dtype
    for key in KEYS:
        np.testing.assert_array_equal(source[key], data[key], err_msg=str(key))
    np.testing.assert_array_equal(np.asarray(source), data)
    image.close()


def test_jpeg_tiles_equal_tifffile(tmp_path):
    """JPEG tiles need the page's tables (whole-slide scans are JPEG)."""
    pytest.importorskip("imagecodecs")
    rng = np.random.default_rng(1)
    data = (rng.random((700, 900, 3)) * 60 + np.linspace(0, 180, 900)[None, :, None]).astype(
        "uint8"
    )
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, data, tile=(256, 256), compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        expected = tif.asarray()
    image = open_tiff(path)
    source = image.levels[0].yolocell_source
    assert isinstance(source, TiffTiles)
    np.testing.assert_array_equal(source[100:650, 200:800], expected[100:650, 200:800])
    image.close()


def test_pyramid_levels_each_read_directly(tmp_path):
    data = _image((1024, 1024), "uint16")
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(data, tile=(256, 256), subifds=1, compression="zlib")
        tif.write(data[::2, ::2], tile=(256, 256), subfiletype=1, compression="zlib")
    image = open_tiff(path)
    assert len(image.levels) == 2
    for level, expected in zip(image.levels, [data, data[::2, ::2]], strict=True):
        assert isinstance(level.yolocell_source, TiffTiles)
        np.testing.assert_array_equal(
            level.yolocell_source[300:700, 10:500], expected[300:700, 10:500]
        )
    image.close()


def test_planar_samples_and_strips_keep_zarr(tmp_path):
    planar = _image((3, 300, 400), "uint16")  # one page, samples stored plane by plane
    tifffile.imwrite(tmp_path / "planar.tif", planar, tile=(128, 128), compression="zlib")
    strips = _image((300, 400), "uint16")
    tifffile.imwrite(tmp_path / "strips.tif", strips, compression="zlib", rowsperstrip=16)
    for name, data in [("planar.tif", planar), ("strips.tif", strips)]:
        image = open_tiff(tmp_path / name)
        source = image.levels[0].yolocell_source
        assert isinstance(source, zarr.Array), name
        np.testing.assert_array_equal(np.asarray(image.levels[0]), data)
        image.close()


def test_multi_page_ome_reads_each_plane_directly(tmp_path):
    """A fluorescence OME-TIFF (channels x planes, one tiled page each): the engine's reads
    of any plane, channel and window equal tifffile's."""
    data = _image((2, 3, 300, 400), "uint16", seed=5)
    path = tmp_path / "czyx.ome.tif"
    tifffile.imwrite(path, data, tile=(128, 128), compression="zlib", metadata={"axes": "CZYX"})
    image = open_tiff(path)
    source = image.levels[0].yolocell_source
    assert isinstance(source, TiffTiles) and image.axes == "CZYX"
    assert source.chunks == (1, 1, 128, 128)
    for key in [
        (1, 2),
        (slice(None), 0, slice(10, 200)),
        (0, slice(0, 3, 2), slice(100, 250), slice(7, 390, 3)),
        (Ellipsis, 5),
        (slice(1, 1),),
        (-1, -1, slice(290, None), slice(None, None, -9)),
    ]:
        np.testing.assert_array_equal(source[key], data[key], err_msg=str(key))
    before = source.decoded
    source[1, 2, 0:128, 0:128]
    assert source.decoded == before + 1  # one plane's one tile, nothing else
    image.close()


def test_sparse_tiles_read_as_zeros(tmp_path):
    """A tile with no data (offset and byte count 0, as sparse writers leave) is zeros."""
    data = _image((512, 512), "uint16")
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, data, tile=(256, 256), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offsets, counts = page.tags["TileOffsets"], page.tags["TileByteCounts"]
        offsets.overwrite([0, *page.dataoffsets[1:]])
        counts.overwrite([0, *page.databytecounts[1:]])
    image = open_tiff(path)
    source = image.levels[0].yolocell_source
    assert isinstance(source, TiffTiles)
    got = source[:, :]
    assert not got[:256, :256].any()
    np.testing.assert_array_equal(got[256:, :], data[256:, :])
    np.testing.assert_array_equal(got, np.asarray(image.arrays[0]))
    image.close()


def test_threads_reading_through_zarr_and_directly_agree(tmp_path):
    """napari reads through zarr while the engine reads tiles directly, from one file handle."""
    from concurrent.futures import ThreadPoolExecutor

    data = _image((1500, 1300), "uint16", seed=3)
    path = tmp_path / "shared.tif"
    tifffile.imwrite(path, data, tile=(128, 128), compression="zlib")
    image = open_tiff(path)
    level = image.levels[0]
    source = level.yolocell_source
    rng = np.random.default_rng(0)
    windows = [(int(y), int(x)) for y, x in rng.integers(0, 1000, size=(40, 2))]

    def read(i):
        y, x = windows[i]
        key = (slice(y, y + 300), slice(x, x + 280))
        got = source[key] if i % 2 else np.asarray(level[key])
        return np.array_equal(got, data[key])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(read, range(len(windows))))
    image.close()
