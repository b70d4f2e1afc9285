"""Tests of the npe2 sample data."""

from __future__ import annotations

import numpy as np
from skimage.io import imread
from skimage.measure import label, regionprops

from napari_yolocell.data.samples import (
    DATA_DIR,
    nuclei_sample,
    sample_image_path,
    sample_truth,
    sample_truth_boxes,
    synthetic_sample,
)


def _mask_boxes(mask_path, min_area=25):
    """Decode a BBBC039 mask: channel 0 values 0..3, instances = 8-connected components."""
    channel = imread(mask_path)[..., 0]
    boxes = []
    for value in range(1, int(channel.max()) + 1):
        for region in regionprops(label(channel == value, connectivity=2)):
            if region.area >= min_area:
                boxes.append(region.bbox)
    return np.array(sorted(boxes), float)


def test_nuclei_sample_truth_matches_mask():
    info = sample_truth()
    assert sample_image_path().is_file() and sample_image_path().stat().st_size < 2_000_000
    assert info["license"] == "CC0-1.0"
    mask_boxes = _mask_boxes(DATA_DIR / info["mask"])
    assert info["true_count"] == len(mask_boxes) == info["n_boxes"] == 140
    np.testing.assert_array_equal(sample_truth_boxes(), mask_boxes)

    ((image, kwargs, kind),) = nuclei_sample()
    assert kind == "image" and image.shape == (520, 696) and image.dtype == np.uint16
    assert kwargs["metadata"]["true_count"] == 140
    lo, hi = kwargs["contrast_limits"]
    assert 0 <= lo < hi <= 4095


def test_synthetic_sample_truth():
    ((levels, kwargs, kind),) = synthetic_sample()
    assert kind == "image" and kwargs["multiscale"]
    assert [lvl.shape for lvl in levels] == [(8192, 8192), (4096, 4096), (2048, 2048), (1024, 1024)]
    meta = kwargs["metadata"]
    n = meta["true_count"]
    assert meta["centers"].shape == (n, 2) and meta["boxes"].shape == (n, 4)
    assert 20000 < n < 30000  # ~400 per megapixel

    # Count blobs in a crop: components not touching the crop border vs boxes fully inside.
    y0, x0, size = 2048, 3072, 1024
    crop = levels[0][y0 : y0 + size, x0 : x0 + size].compute()
    regions = regionprops(label(crop > 800))
    inner = [r for r in regions if min(r.bbox[:2]) > 0 and max(r.bbox[2:]) < size]
    b = meta["boxes"]
    fully = (
        (b[:, 0] >= y0 + 1)
        & (b[:, 1] >= x0 + 1)
        & (b[:, 2] <= y0 + size - 1)
        & (b[:, 3] <= x0 + size - 1)
    )
    assert abs(len(inner) - int(fully.sum())) <= 2
    assert len(inner) > 50
