"""Tests of the lazy TIFF core (tiff_io) and the npe2 reader (_reader)."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
from conftest import reader_imports
from tifffile.zarr import ZarrTiffStore

from napari_yolocell.data.synthetic_tiff import write_synthetic_tiff
from napari_yolocell.io.tiff import TiffReadError, open_tiff, open_tiffs
from napari_yolocell.shell.reader import napari_get_reader, read_tiff

RNG = np.random.default_rng(42)


def _layer(path):
    reader = napari_get_reader(str(path))
    assert callable(reader)
    layers = reader(str(path))
    assert len(layers) == 1
    return layers[0]


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """Tiled BigTIFF with a 3-level SubIFD pyramid and the arrays written."""
    path = tmp_path_factory.mktemp("pyr") / "pyramid.tif"
    base = RNG.integers(0, 4000, (1000, 1300), dtype=np.uint16)
    levels = [base, base[::2, ::2].copy(), base[::4, ::4].copy()]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(levels[0], tile=(256, 256), compression="zlib", subifds=2)
        for lvl in levels[1:]:
            tw.write(lvl, tile=(256, 256), compression="zlib", subfiletype=1)
    return path, levels


def test_plain_2d(tmp_path):
    data = RNG.integers(0, 4000, (100, 120), dtype=np.uint16)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data)
    image = open_tiff(path)
    assert image.axes == "YX" and image.channel_axis is None and not image.rgb
    assert not image.is_pyramid and image.scale == (1.0, 1.0)
    np.testing.assert_array_equal(image.data.compute(), data)

    arr, kwargs, kind = _layer(path)
    assert kind == "image" and kwargs["name"] == "plain" and not kwargs["multiscale"]
    assert isinstance(arr, np.memmap)  # lazy, and napari gets no dask array (cold open)
    np.testing.assert_array_equal(np.asarray(arr), data)
    lo, hi = kwargs["contrast_limits"]
    assert 0 <= lo < hi <= 4000
    assert kwargs["metadata"]["path"] == str(path)


def test_pyramid_subifds(pyramid):
    path, written = pyramid
    image = open_tiff(path)
    assert image.is_pyramid and image.metadata["is_pyramid"]
    assert [lvl.shape for lvl in image.levels] == [w.shape for w in written]
    assert image.metadata["tiled"] and image.metadata["tile_shape"] == (256, 256)
    for lvl, w in zip(image.levels, written, strict=True):
        assert isinstance(lvl, da.Array)
        np.testing.assert_array_equal(lvl[37:300, 100:290].compute(), w[37:300, 100:290])
    np.testing.assert_array_equal(image.levels[2].compute(), written[2])

    data, kwargs, _ = _layer(path)
    assert kwargs["multiscale"] is True and isinstance(data, list) and len(data) == 3
    assert kwargs["metadata"]["level_shapes"] == [w.shape for w in written]
    for lvl, w in zip(data, written, strict=True):  # napari gets the zarr arrays, not dask
        assert not hasattr(lvl, "dask")
        np.testing.assert_array_equal(lvl[37:300, 100:290], w[37:300, 100:290])


def test_read_path_imports_only_what_it_needs(pyramid):
    """A cold open through napari: asking imports nothing heavy, reading no dask/torch/pandas."""
    path, _ = pyramid
    asked, read = reader_imports(path)
    assert not asked & {"numpy", "tifffile", "zarr", "dask"}, asked
    assert {"numpy", "tifffile", "zarr"} <= read
    assert not read & {"dask", "distributed", "scipy", "pandas", "torch"}, read


def test_ome_channels_and_pixel_size(tmp_path):
    data = RNG.integers(0, 1000, (3, 64, 80), dtype=np.uint16)
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(
        path,
        data,
        ome=True,
        metadata={
            "axes": "CYX",
            "PhysicalSizeX": 0.325,
            "PhysicalSizeY": 0.325,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeYUnit": "µm",
            "Channel": {"Name": ["DAPI", "GFP", "RFP"]},
        },
    )
    image = open_tiff(path)
    assert image.axes == "CYX" and image.channel_axis == 0
    assert image.channel_names == ["DAPI", "GFP", "RFP"]
    assert image.scale == pytest.approx((1.0, 0.325, 0.325))
    assert image.metadata["pixel_size_um"] == pytest.approx({"Y": 0.325, "X": 0.325})

    arr, kwargs, _ = _layer(path)
    assert kwargs["channel_axis"] == 0
    assert kwargs["name"] == ["cells [DAPI]", "cells [GFP]", "cells [RFP]"]
    assert kwargs["scale"] == pytest.approx([0.325, 0.325])  # channel axis dropped
    assert len(kwargs["contrast_limits"]) == 3
    np.testing.assert_array_equal(np.asarray(arr), data)


def test_ome_nanometre_units(tmp_path):
    path = tmp_path / "nm.ome.tif"
    tifffile.imwrite(
        path,
        np.zeros((8, 8), np.uint8),
        ome=True,
        metadata={
            "PhysicalSizeX": 250,
            "PhysicalSizeY": 250,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeYUnit": "nm",
        },
    )
    assert open_tiff(path).scale == pytest.approx((0.25, 0.25))


def test_imagej_hyperstack(tmp_path):
    data = RNG.integers(0, 255, (2, 3, 2, 32, 40), dtype=np.uint8)
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.5),
        metadata={"axes": "TZCYX", "unit": "um", "spacing": 2.0},
    )
    image = open_tiff(path)
    assert image.axes == "TZCYX" and image.channel_axis == 2
    assert image.scale == pytest.approx((1.0, 2.0, 1.0, 0.5, 0.5))
    np.testing.assert_array_equal(image.data.compute(), data)

    arr, kwargs, _ = _layer(path)
    assert arr.shape == data.shape  # all dims kept
    assert kwargs["channel_axis"] == 2 and len(kwargs["name"]) == 2
    assert kwargs["scale"] == pytest.approx([1.0, 2.0, 0.5, 0.5])


def test_rgb(tmp_path):
    data = RNG.integers(0, 255, (50, 60, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, data, photometric="rgb", compression="lzw", rowsperstrip=1)
    image = open_tiff(path)
    assert image.axes == "YXS" and image.rgb and image.channel_axis is None
    np.testing.assert_array_equal(image.data.compute(), data)
    arr, kwargs, _ = _layer(path)
    assert kwargs["rgb"] is True and "channel_axis" not in kwargs
    assert len(kwargs["scale"]) == 2


def test_uncompressed_is_memory_mapped(tmp_path):
    data = RNG.integers(0, 60000, (300, 2100), dtype=np.uint16)
    path = tmp_path / "raw.tif"
    tifffile.imwrite(path, data, byteorder=">")  # big-endian to check byte order handling
    image = open_tiff(path)
    assert image.data.chunksize == (300, 1024)
    np.testing.assert_array_equal(image.data[5:250, 1000:2050].compute(), data[5:250, 1000:2050])


def test_svs_fixture(fixtures_dir):
    path = fixtures_dir / "CMU-1-Small-Region.svs"
    image = open_tiff(path)
    assert image.rgb and image.axes == "YXS" and image.shape == (2967, 2220, 3)
    assert image.metadata["compression"] == "JPEG" and image.metadata["tiled"]
    assert image.metadata["n_series"] > 1  # thumbnail/label/macro are not the main image
    assert image.scale[:2] == pytest.approx((0.499, 0.499))
    with tifffile.TiffFile(path) as tif:
        ref = tif.pages[0].asarray()
    np.testing.assert_array_equal(image.data[100:700, 300:900].compute(), ref[100:700, 300:900])
    _, kwargs, _ = _layer(path)
    assert kwargs["rgb"] is True and kwargs["name"] == "CMU-1-Small-Region"


def test_truncated_file_raises_clear_error(pyramid, tmp_path):
    path, _ = pyramid
    raw = path.read_bytes()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(raw[: len(raw) // 2])
    reader = napari_get_reader(str(bad))
    assert callable(reader)  # a TIFF header: ours to report, not "no reader found"
    with pytest.raises(TiffReadError, match="truncated.tif.*truncated"):
        reader(str(bad))


def test_garbage_and_empty_files(tmp_path):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00" + bytes(RNG.integers(0, 255, 500, dtype=np.uint8)))
    with pytest.raises(TiffReadError, match="garbage.tif"):
        open_tiff(garbage)
    empty = tmp_path / "empty.tiff"
    empty.write_bytes(b"")
    assert callable(napari_get_reader(str(empty)))
    with pytest.raises(TiffReadError, match="empty.tiff"):
        read_tiff(str(empty))
    assert issubclass(TiffReadError, ValueError)
    with pytest.raises(TiffReadError, match="not found"):
        open_tiff(tmp_path / "missing.tif")


def test_missing_codec_names_imagecodecs(tmp_path):
    path = tmp_path / "codec.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint16), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].tags["Compression"].valueoffset
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 2] = struct.pack("<H", 60000)  # a codec nobody has
    path.write_bytes(bytes(raw))
    with pytest.raises(TiffReadError, match=r"codec\.tif.*60000.*pip install imagecodecs"):
        open_tiff(path)


def test_non_tiff_paths_return_none(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert napari_get_reader(str(text)) is None
    png_named_tif = tmp_path / "photo.tif"
    png_named_tif.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    assert napari_get_reader(str(png_named_tif)) is None  # leave it to imageio
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    assert napari_get_reader(str(empty_dir)) is None
    assert napari_get_reader([str(text)]) is None


def test_folder_and_list_of_paths(tmp_path):
    folder = tmp_path / "stack"
    folder.mkdir()
    planes = [RNG.integers(0, 999, (40, 50), dtype=np.uint16) for _ in range(3)]
    for i, plane in enumerate(planes):
        tifffile.imwrite(folder / f"z{i}.tif", plane)
    (folder / "readme.txt").write_text("ignored")
    (image,) = open_tiffs(folder)
    assert image.axes == "IYX" and image.shape == (3, 40, 50)
    np.testing.assert_array_equal(image.data.compute(), np.stack(planes))
    layers = napari_get_reader(str(folder))(str(folder))
    assert len(layers) == 1 and layers[0][0].shape == (3, 40, 50)

    tifffile.imwrite(folder / "odd.tif", np.zeros((7, 7), np.uint8))  # breaks stacking
    assert len(open_tiffs(folder)) == 4
    with pytest.raises(TiffReadError, match="cannot be stacked"):
        open_tiff(folder)

    paths = [str(folder / "z0.tif"), str(folder / "z1.tif")]
    layers = napari_get_reader(paths)(paths)
    assert [kw["name"] for _, kw, _ in layers] == ["z0", "z1"]


def test_opening_is_lazy(tmp_path, monkeypatch):
    """Opening an 8k x 8k pyramid decodes no tiles; a 512 x 512 read decodes only its tiles."""
    path = tmp_path / "big.tif"
    truth = write_synthetic_tiff(
        path, shape=(8192, 8192), tile=512, levels=4, density=60, noise=0, seed=3
    )
    requested: list[str] = []
    original_get = ZarrTiffStore.get

    async def counting_get(self, key, *args, **kwargs):
        if not key.rsplit("/", 1)[-1].startswith((".z", "zarr.json")):
            requested.append(key)
        return await original_get(self, key, *args, **kwargs)

    monkeypatch.setattr(ZarrTiffStore, "get", counting_get)

    tracemalloc.start()
    image = open_tiff(path)
    assert requested == []  # headers only
    region = image.levels[0][1000:1512, 2000:2512].compute()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    level_bytes = 8192 * 8192 * 2
    assert region.shape == (512, 512)
    assert 1 <= len(requested) <= 4 and all(k.startswith("0/") for k in requested)
    assert peak < level_bytes / 10, f"peak {peak / 1e6:.1f} MB"
    assert image.metadata["tiff_metadata"]["true_count"] == len(truth)

    # The reader computes contrast limits from the smallest level only.
    requested.clear()
    data, kwargs, _ = read_tiff(str(path))[0]
    assert kwargs["multiscale"] and [d.shape for d in data][-1] == (1024, 1024)
    assert requested and all(k.startswith("3/") for k in requested)


def test_viewer_opens_pyramid_as_multiscale(make_napari_viewer, pyramid):
    path, written = pyramid
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-yolocell")
    assert len(layers) == 1
    layer = viewer.layers[0]
    assert layer.multiscale and len(layer.data) == 3
    assert layer.data[0].shape == written[0].shape
    assert layer.metadata["path"] == str(path)
