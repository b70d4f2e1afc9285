"""Tests of the synthetic nucleus generator."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy.spatial.distance import pdist
from skimage.measure import label, regionprops

from napari_yolocell.data.synthetic import make_lazy_nuclei_image, make_nuclei_image, place_nuclei
from napari_yolocell.data.synthetic_tiff import write_synthetic_tiff


def test_make_nuclei_image_truth():
    syn = make_nuclei_image(shape=(512, 512), seed=1)
    assert syn.image.shape == (512, 512) and syn.image.dtype == np.uint16
    n = syn.count
    assert 80 <= n <= 130  # ~400 per megapixel
    assert syn.centers.shape == (n, 2) and syn.boxes.shape == (n, 4) and syn.diameters.shape == (n,)
    assert pdist(syn.centers).min() >= 1.1 * 24 + 2  # never touching
    assert np.all(syn.boxes[:, :2] < syn.boxes[:, 2:])
    assert np.all((syn.boxes >= 0) & (syn.boxes <= 512))
    inside = np.all((syn.boxes > 0) & (syn.boxes < 512), axis=1)
    box_centres = (syn.boxes[:, :2] + syn.boxes[:, 2:]) / 2
    np.testing.assert_allclose(box_centres[inside], syn.centers[inside])
    # separable by a simple threshold: one connected component per nucleus
    assert label(syn.image > 800).max() == n
    assert list(syn.truth().columns) == ["y", "x", "y0", "x0", "y1", "x1", "diameter"]


def test_exact_centers_on_tile_edges():
    centers = np.array([[256.0, 256.0], [256.0, 100.0], [0.0, 0.0]])
    syn = make_nuclei_image(shape=(512, 512), centers=centers, noise=0, diameter=(20, 20))
    np.testing.assert_array_equal(syn.centers, centers)  # order preserved
    regions = regionprops(label(syn.image > 1000))
    assert len(regions) == 3
    found = sorted(tuple(np.round(r.centroid).astype(int)) for r in regions if r.area > 150)
    # centroid of a blob centred on the corner between pixels 255 and 256 is 255.5
    assert (255, 100) in found or (256, 100) in found
    assert syn.image[0, 0] > 1000  # clipped nucleus in the corner still rendered


def test_regions_render_identically():
    field = place_nuclei((1024, 1024), n_nuclei=300, seed=2)
    full = field.render(0, 0, 1024, 1024)
    tiles = np.block(
        [[field.render(y, x, 256, 256) for x in range(0, 1024, 256)] for y in range(0, 1024, 256)]
    )
    np.testing.assert_array_equal(full, tiles)


def test_impossible_count_raises():
    with pytest.raises(ValueError, match="cannot place"):
        make_nuclei_image(shape=(64, 64), n_nuclei=50)


def test_write_synthetic_tiff_pyramid(tmp_path):
    path = tmp_path / "syn.tif"
    truth = write_synthetic_tiff(
        path, shape=(1000, 1300), tile=256, levels=3, density=300, noise=0, seed=5
    )
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert [lvl.shape for lvl in series.levels] == [(1000, 1300), (500, 650), (250, 325)]
        assert tif.pages[0].is_tiled and tif.is_bigtiff
        assert tif.shaped_metadata[0]["true_count"] == len(truth)
        level0 = series.asarray()
    expected = place_nuclei((1000, 1300), density=300, noise=0, seed=5).render(0, 0, 1000, 1300)
    np.testing.assert_array_equal(level0, expected)  # tiles rendered independently agree
    assert len(truth) == round(300 * 1.3)
    assert label(level0 > 800).max() == len(truth)


def test_lazy_image_is_deterministic():
    arr, field = make_lazy_nuclei_image(shape=(1024, 1024), chunk=256, seed=4)
    assert arr.chunksize == (256, 256)
    a = arr[200:600, 300:700].compute()
    b = arr.compute()[200:600, 300:700]
    np.testing.assert_array_equal(a, b)
    assert len(field.truth()) == len(field) > 0
