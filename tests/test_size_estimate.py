"""Nucleus size measurement and automatic rescaling of far-too-large nuclei."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from skimage.transform import rescale

from napari_yolocell.data.samples import sample_image_path, sample_truth, sample_truth_boxes
from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import DetectParams, detect_image
from napari_yolocell.engine.size import AUTO_HIGH, auto_diameter, estimate_diameter
from napari_yolocell.models.loading import load_detector


def _median_box_diameter(boxes: np.ndarray) -> float:
    return float(np.median(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))))


@pytest.mark.parametrize("diameter", [(12.0, 18.0), (24.0, 32.0), (50.0, 70.0)])
def test_estimate_matches_synthetic_truth(diameter):
    n = 120 if diameter[1] < 40 else 40
    syn = make_nuclei_image((1024, 1024), n_nuclei=n, diameter=diameter, seed=1)
    truth = _median_box_diameter(syn.boxes)
    assert estimate_diameter(syn.image) == pytest.approx(truth, rel=0.2)


def test_estimate_on_the_real_sample_and_its_4x_enlargement():
    image = tifffile.imread(sample_image_path())
    truth = _median_box_diameter(sample_truth_boxes())
    small = estimate_diameter(image)
    big = estimate_diameter(rescale(image.astype(np.float32), 4, order=1))
    assert small == pytest.approx(truth, rel=0.25)
    assert big == pytest.approx(4 * truth, rel=0.25)


def test_no_estimate_without_objects():
    assert estimate_diameter(np.zeros((200, 200))) is None
    assert estimate_diameter(np.full((200, 200), np.nan)) is None
    noise = np.random.default_rng(0).normal(100, 10, (512, 512))
    est = estimate_diameter(noise)
    assert est is None or auto_diameter(est, 23.0) is None  # noise never triggers rescaling


def test_auto_only_shrinks_far_larger_nuclei():
    assert auto_diameter(None, 23.0) is None
    assert auto_diameter(10.0, 23.0) is None  # small nuclei: the model's own range
    assert auto_diameter(0.99 * AUTO_HIGH * 23.0, 23.0) is None
    assert auto_diameter(100.0, 23.0) == 100.0


def test_bundled_model_counts_4x_larger_nuclei_by_itself():
    """The sample enlarged 4x (nuclei ~80-100 px): counted as well as the original."""
    image = rescale(tifffile.imread(sample_image_path()).astype(np.float32), 4, order=1)
    detector = load_detector("default", device="cpu", backend="torch")
    true = sample_truth()["true_count"]
    auto = detect_image(image, detector)
    assert auto.attrs["diameter"] == pytest.approx(4 * 23, rel=0.35)
    assert abs(len(auto) - true) <= 0.08 * true
    fixed = detect_image(image, detector, DetectParams(auto_diameter=False))
    assert fixed.attrs["diameter"] is None  # what users got without the measurement: worse
    assert abs(len(fixed) - true) > 2 * abs(len(auto) - true)
