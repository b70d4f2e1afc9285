"""The npe2 reader opens OME-Zarr (NGFF 0.4 / 0.5) folders lazily as napari Image layers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from conftest import reader_imports

from napari_yolocell.shell.reader import (
    napari_get_reader,
    read_images,
    read_omezarr,
)

ome_writer = pytest.importorskip("ome_zarr.writer")
ome_format = pytest.importorskip("ome_zarr.format")

FORMATS = {"0.4": ome_format.FormatV04, "0.5": ome_format.FormatV05}
UM = {"y": "micrometer", "x": "micrometer"}
RNG = np.random.default_rng(5)


def write_ome_zarr(path, image, axes, version="0.4", scale_factors=(2,), **kwargs):
    """An OME-Zarr written by ome-zarr-py (one extra level per scale factor)."""
    fmt = FORMATS[version]()
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    ome_writer.write_image(
        image, group, axes=axes, fmt=fmt, scale_factors=list(scale_factors), **kwargs
    )
    return path


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    """(path per NGFF version, pixels): 200 x 240 uint16, 2 levels, 0.5 um pixels."""
    root = tmp_path_factory.mktemp("ngff")
    image = RNG.integers(0, 4000, (200, 240), dtype=np.uint16)
    paths = {
        v: write_ome_zarr(
            root / f"grey{v.replace('.', '')}.ome.zarr",
            image,
            "yx",
            v,
            scale={"y": 0.5, "x": 0.5},
            axes_units=UM,
        )
        for v in FORMATS
    }
    return paths, image


@pytest.mark.parametrize("version", list(FORMATS))
def test_get_reader_opens_ngff_as_lazy_multiscale(grey, version):
    paths, image = grey
    path = paths[version]
    reader = napari_get_reader(str(path))
    assert reader is read_omezarr
    assert napari_get_reader(str(path) + "/") is read_omezarr  # a folder path with its slash
    ((data, kwargs, kind),) = reader(str(path))
    assert kind == "image" and kwargs["multiscale"] and kwargs["name"] == path.name[:-9]
    assert [d.shape for d in data] == [(200, 240), (100, 120)]
    assert all(hasattr(d, "dask") for d in data)  # lazy: dask on the zarr chunks
    np.testing.assert_array_equal(np.asarray(data[0][30:90, 40:110]), image[30:90, 40:110])
    assert kwargs["scale"] == [0.5, 0.5]
    assert kwargs["metadata"]["pixel_size_um"] == {"Y": 0.5, "X": 0.5}
    assert kwargs["metadata"]["ngff_version"] == version
    assert kwargs["metadata"]["path"] == str(path)
    lo, hi = kwargs["contrast_limits"]
    assert 0 <= lo < hi <= 4000


def test_channels_split_and_scaled(tmp_path):
    image = RNG.integers(0, 1000, (2, 96, 128), dtype=np.uint16)
    image[1] //= 10  # a dim channel gets its own limits
    path = write_ome_zarr(
        tmp_path / "two.zarr",
        image,
        "cyx",
        "0.5",
        scale_factors=(),
        scale={"c": 1, "y": 0.25, "x": 0.25},
        axes_units=UM,
    )
    ((data, kwargs, _),) = napari_get_reader(str(path))(str(path))
    assert not kwargs["multiscale"] and data.shape == (2, 96, 128)
    assert kwargs["channel_axis"] == 0 and kwargs["name"] == ["two [ch0]", "two [ch1]"]
    assert kwargs["scale"] == [0.25, 0.25]  # the channel axis napari drops has no scale
    (lo0, hi0), (lo1, hi1) = kwargs["contrast_limits"]
    assert hi1 < hi0 and hi1 <= 100


def test_what_is_not_an_ngff_image_is_left_to_others(tmp_path):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")  # a zarr group without NGFF
    zarr.create_array(str(tmp_path / "array.zarr"), shape=(8, 8), dtype="u1")
    plate = zarr.open_group(str(tmp_path / "plate.zarr"), mode="w", zarr_format=2)
    plate.attrs["plate"] = {"rows": [{"name": "A"}], "columns": [{"name": "1"}], "wells": []}
    (tmp_path / "empty.zarr").mkdir()
    for name in ("plain.zarr", "array.zarr", "plate.zarr", "empty.zarr", "missing.zarr"):
        assert napari_get_reader(str(tmp_path / name)) is None, name


def test_broken_ngff_it_claimed_raises_one_line(tmp_path):
    group = zarr.open_group(str(tmp_path / "nolevel.zarr"), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [
        {"version": "0.4", "axes": ["y", "x"], "datasets": [{"path": "0"}]}
    ]
    broken_json = tmp_path / "broken.ome.zarr"
    broken_json.mkdir()
    (broken_json / "zarr.json").write_text("{not json")
    for path, why in (
        (tmp_path / "nolevel.zarr", "resolution level '0' is missing"),
        (broken_json, "not a zarr group"),
    ):
        reader = napari_get_reader(str(path))
        assert reader is read_omezarr
        with pytest.raises(ValueError) as info:
            reader(str(path))
        message = str(info.value)
        assert message.startswith(str(path)) and why in message and "\n" not in message


def test_a_list_mixing_tiff_and_zarr(grey, tmp_path):
    paths, image = grey
    tif = tmp_path / "plain.tif"
    tifffile.imwrite(tif, image)
    both = [str(tif), str(paths["0.4"])]
    reader = napari_get_reader(both)
    assert reader is read_images
    assert [kw["name"] for _, kw, _ in reader(both)] == ["plain", "grey04"]


def test_asking_imports_only_the_standard_library(grey):
    path = grey[0]["0.5"]
    asked, read = reader_imports(path)
    assert not asked & {"numpy", "tifffile", "zarr", "dask"}, asked
    assert {"numpy", "zarr"} <= read
    assert not read & {"torch", "pandas"}, read


def test_viewer_opens_omezarr_with_the_plugin(make_napari_viewer, grey):
    paths, image = grey
    viewer = make_napari_viewer()
    layers = viewer.open(str(paths["0.5"]), plugin="napari-yolocell")
    assert len(layers) == 1
    layer = viewer.layers[0]
    assert layer.multiscale and [d.shape for d in layer.data] == [(200, 240), (100, 120)]
    np.testing.assert_allclose(layer.scale, [0.5, 0.5])
    assert layer.metadata["path"] == str(paths["0.5"])
    np.testing.assert_array_equal(np.asarray(layer.data[0][:50, :60]), image[:50, :60])
