"""Tests of the intensity normalisation."""

import numpy as np
import pytest
from conftest import RecordingArray

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.normalize import (
    integer_quantiles,
    normalize_image,
    percentile_range,
    sample_stride,
    to_uint8,
)


def test_percentile_range_and_mapping():
    arr = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    lo, hi = percentile_range(arr, 1, 99)
    assert lo == pytest.approx(9.99) and hi == pytest.approx(989.01)
    out = to_uint8(arr, lo, hi)
    assert out.dtype == np.uint8
    assert out[0, 0] == 0 and out[-1, -1] == 255
    assert 120 <= out.ravel()[500] <= 135


def test_large_plane_is_read_strided_only():
    rec = RecordingArray(np.zeros((3000, 3000), dtype=np.uint16))
    percentile_range(rec, max_pixels=100_000)
    assert len(rec.keys) == 1
    step = rec.keys[0][0].step
    assert step == sample_stride((3000, 3000), 100_000) and step > 1
    assert rec.data[::step, ::step].size <= 100_000


def test_constant_image_maps_to_zeros():
    arr = np.full((20, 20), 7.0)
    lo, hi = percentile_range(arr)
    assert lo == hi == 7.0
    assert not normalize_image(arr).any()


def test_nan_is_ignored_and_becomes_zero():
    arr = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    arr[0, :5] = np.nan
    lo, hi = percentile_range(arr, 0, 100)
    assert np.isfinite([lo, hi]).all() and hi > lo
    out = normalize_image(arr, "percentile", (0, 100))
    assert (out[0, :5] == 0).all() and out.max() == 255
    assert percentile_range(np.full((4, 4), np.nan)) == (0.0, 0.0)


def test_mode_none():
    u8 = np.array([[0, 17, 255]], dtype=np.uint8)
    assert normalize_image(u8, "none") is u8
    u16 = np.array([[0, 100, 300, 65535]], dtype=np.uint16)
    assert normalize_image(u16, "none").tolist() == [[0, 100, 255, 255]]
    f = np.array([[-5.0, np.nan, 12.7]])
    assert normalize_image(f, "none").tolist() == [[0, 0, 12]]


def test_bad_mode_and_percentiles():
    with pytest.raises(ValueError, match="mode"):
        normalize_image(np.zeros((2, 2)), "zscore")
    with pytest.raises(ValueError):
        percentile_range(np.zeros((2, 2)), 50, 10)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (512, 700)])
def test_integer_quantiles_are_numpys_bit_for_bit(dtype, shape):
    # the histogram path must give the partition's answer exactly, so normalised tiles (and
    # every count) stay what they were
    rng = np.random.default_rng(shape[0])
    info = np.iinfo(dtype)
    image = make_nuclei_image(shape=(512, 700), n_nuclei=40, seed=shape[1]).image
    image = image[: shape[0], : shape[1]].astype(np.float64)
    image = image / max(image.max(), 1) * min(info.max, 4095) + rng.integers(0, 50, shape)
    values = np.clip(image + (info.min if info.min < 0 else 0), info.min, info.max).astype(dtype)
    for q in ([0.01, 0.998], [0.0, 1.0], rng.random(3)):
        expected = np.quantile(values.astype(np.float32), q)
        assert np.array_equal(integer_quantiles(values, q), expected)
    assert integer_quantiles(values.astype(np.float32), [0.5]) is None
