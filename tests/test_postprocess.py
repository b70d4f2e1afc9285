"""Tests of the per-image clean-up levers (engine/postprocess.py) and the ``small`` flag."""

import numpy as np

from napari_yolocell.engine.detect import COLUMNS, DetectParams, count_per_plane, detect_image
from napari_yolocell.engine.postprocess import (
    adaptive_conf,
    first_pass_diameter,
    small_object_mask,
    split_mask,
)
from napari_yolocell.io.tables import CSV_COLUMNS, detections_csv_table
from napari_yolocell.models.detector import Detector
from napari_yolocell.models.spec import ModelSpec


def grid_boxes(n=8, side=20.0, step=40.0, y0=30.0, x0=30.0):
    """``n`` nuclei of ``side`` px in a row (y0, x0, y1, x1)."""
    xs = x0 + step * np.arange(n)
    return np.column_stack([np.full(n, y0), xs, np.full(n, y0 + side), xs + side])


def test_small_objects_flagged_relative_to_confident_median():
    big = grid_boxes()
    small = np.array([[100, 100, 106, 106], [100, 200, 109, 209]], float)  # 36 and 81 px²
    boxes = np.vstack([big, small])
    scores = np.r_[np.full(len(big), 0.9), 0.4, 0.4]
    flags = small_object_mask(boxes, scores, 0.25)  # quarter of 400 px² = 100
    assert not flags[: len(big)].any()
    assert flags[len(big) :].all()
    assert not small_object_mask(boxes, scores, 0.0).any()  # off
    assert not small_object_mask(boxes[:3], scores[:3], 0.25).any()  # too few to judge


def test_small_objects_at_the_image_edge_are_not_flagged():
    boxes = np.vstack([grid_boxes(), [[0, 50, 6, 56], [150, 150, 156, 156]]])
    scores = np.r_[np.full(8, 0.9), 0.6, 0.6]
    flags = small_object_mask(boxes, scores, 0.25, shape=(300, 400))
    assert flags.tolist() == [False] * 8 + [False, True]  # the edge one is a cut nucleus


def test_split_parts_inside_a_confident_nucleus_are_flagged():
    whole = [0, 0, 40, 40]
    part = [0, 0, 20, 38]  # inside the whole one
    neighbour = [30, 30, 60, 60]  # overlaps but mostly outside
    boxes = np.array([whole, part, neighbour], float)
    flags = split_mask(boxes, np.array([0.9, 0.4, 0.8]))
    assert flags.tolist() == [False, True, False]
    # a part more confident than the whole box is kept
    assert not split_mask(boxes[:2], np.array([0.9, 0.95])).any()


def test_adaptive_conf_moves_to_the_valley_within_bounds():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.uniform(0.85, 0.95, 80), rng.uniform(0.2, 0.35, 20)]
    t = adaptive_conf(scores, 0.2)
    assert 0.3 < t <= 0.5
    assert 80 <= (scores >= t).sum() <= 82  # the confident group, give or take a bin
    assert adaptive_conf(scores[:10], 0.2) == 0.2  # too few detections
    assert adaptive_conf(np.full(50, 0.9), 0.2) == 0.2  # one group


def test_first_pass_diameter_only_for_far_larger_nuclei():
    scores = np.full(8, 0.9)
    assert first_pass_diameter(grid_boxes(side=25), scores, 23.0) is None
    big = grid_boxes(side=80, step=100)
    assert first_pass_diameter(big, scores, 23.0) == 80.0


class FixedDetector(Detector):
    """Fake detector: 8 nuclei of 20 px, one 6 px speck inside, one at the top edge."""

    def __init__(self):
        self.spec = ModelSpec(name="fixed", default_conf=0.25)

    def predict(self, tiles, conf, iou, max_det):
        yx = grid_boxes()
        boxes = np.vstack([yx, [[120, 120, 126, 126], [0, 300, 6, 306]]])[:, [1, 0, 3, 2]]
        scores = np.r_[np.full(8, 0.9), 0.5, 0.5]
        rows = np.column_stack([boxes, scores, np.zeros(len(boxes))])
        return [rows[rows[:, 4] >= conf] for _ in tiles]


def test_detect_flags_small_but_keeps_rows_and_csv_columns():
    image = np.zeros((256, 384), np.uint8)
    plain = detect_image(image, FixedDetector(), DetectParams(tile=512, auto_diameter=False))
    assert list(plain.columns) == COLUMNS  # off by default: the table is unchanged
    assert count_per_plane(plain).tolist() == [10]

    params = DetectParams(tile=512, auto_diameter=False, min_relative_area=0.25)
    df = detect_image(image, FixedDetector(), params)
    assert len(df) == 10  # rows kept
    assert df["small"].sum() == 1  # the interior speck; the edge one is a cut nucleus
    assert count_per_plane(df).tolist() == [9]
    assert list(detections_csv_table(df, "img").columns) == CSV_COLUMNS
