import numpy as np
import pandas as pd
import pytest

from napari_yolocell.analysis.calibrate import calibrate_by_count, calibrate_by_points, match_points
from napari_yolocell.analysis.roi import count_in_rois


def _dets(rows):
    return pd.DataFrame(
        rows, columns=["plane", "y", "x", "y0", "x0", "y1", "x1", "confidence", "class"]
    )


def test_count_picks_threshold_with_the_known_count():
    conf = np.array([0.9, 0.85, 0.8, 0.6, 0.3, 0.2, 0.1])
    cal = calibrate_by_count(conf, 4)
    assert cal.count == 4 and 0.3 < cal.conf <= 0.6
    assert calibrate_by_count(conf, 0).count == 0
    with pytest.raises(ValueError):
        calibrate_by_count(conf, -1)


def test_points_pick_best_f1_threshold():
    # three true nuclei; two confident true detections, one weak true one, two weak false ones
    dets = _dets(
        [
            [0, 10, 10, 5, 5, 15, 15, 0.9, 0],
            [0, 50, 50, 45, 45, 55, 55, 0.8, 0],
            [0, 90, 90, 85, 85, 95, 95, 0.4, 0],
            [0, 130, 130, 125, 125, 135, 135, 0.3, 0],
            [0, 170, 170, 165, 165, 175, 175, 0.2, 0],
        ]
    )
    pts = np.array([[10, 11], [49, 50], [91, 90]])
    np.testing.assert_array_equal(match_points(dets, pts), [True, True, True, False, False])
    cal = calibrate_by_points(dets, pts)
    assert cal.count == 3 and 0.3 < cal.conf <= 0.4
    row = cal.curve[np.isclose(cal.curve["conf"], cal.conf)].iloc[0]
    assert row["f1"] == pytest.approx(1.0)


def test_two_detections_on_one_point_match_once():
    dets = _dets([[0, 10, 10, 5, 5, 15, 15, 0.9, 0], [0, 11, 11, 6, 6, 16, 16, 0.8, 0]])
    np.testing.assert_array_equal(match_points(dets, np.array([[10, 10]])), [True, False])


def test_roi_counts():
    dets = _dets(
        [
            [0, 10, 10, 5, 5, 15, 15, 0.9, 0],
            [0, 50, 50, 45, 45, 55, 55, 0.8, 0],
            [1, 10, 10, 5, 5, 15, 15, 0.9, 0],
        ]
    )
    square = np.array([[0, 0], [0, 30], [30, 30], [30, 0]])
    big = np.array([[0, 0], [0, 100], [100, 100], [100, 0]])
    out = count_in_rois(dets, [square, big], names=["a", "b"])
    assert out.to_dict("records") == [
        {"plane": 0, "roi": "a", "count": 1},
        {"plane": 0, "roi": "b", "count": 2},
        {"plane": 1, "roi": "a", "count": 1},
        {"plane": 1, "roi": "b", "count": 1},
    ]
