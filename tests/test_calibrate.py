import numpy as np
import pandas as pd
import pytest

from napari_yolocell.analysis.calibrate import (
    calibrate_by_count,
    calibrate_by_points,
    calibrate_in_rois,
    match_points,
    separate_planes,
)
from napari_yolocell.analysis.roi import count_in_rois, in_any_roi
from napari_yolocell.data.synthetic import make_nuclei_image


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


def _stack_detections(seed: int = 7):
    """Two planes of one synthetic field: every nucleus found (confident) plus weak spurious
    boxes, as a low-threshold run would give."""
    truth = make_nuclei_image((300, 400), n_nuclei=24, seed=seed)
    rng = np.random.default_rng(seed)
    rows = []
    for plane in (0, 1):
        for (y0, x0, y1, x1), conf in zip(truth.boxes, rng.uniform(0.55, 0.95, 24), strict=True):
            rows.append([plane, (y0 + y1) / 2, (x0 + x1) / 2, y0, x0, y1, x1, conf, 0])
        for y, x in rng.uniform(20, 280, (6, 2)):  # spurious, weak
            rows.append([plane, y, x, y - 8, x - 8, y + 8, x + 8, rng.uniform(0.06, 0.3), 0])
    return truth, _dets(rows)


def test_in_any_roi_without_rois_is_everything():
    yx = np.array([[5.0, 5.0], [50.0, 50.0]])
    square = np.array([[0, 0], [0, 10], [10, 10], [10, 0]])
    assert in_any_roi(yx, []).tolist() == [True, True]
    assert in_any_roi(yx, [square]).tolist() == [True, False]
    assert in_any_roi(yx, [square, square + 45]).tolist() == [True, True]


def test_separate_planes_keeps_planes_from_matching():
    truth, dets = _stack_detections()
    planes = np.zeros(len(truth.centers), int)  # every nucleus clicked, on plane 0 only
    shifted, pts = separate_planes(dets, planes, truth.centers)
    matched = match_points(shifted, pts)
    assert matched.sum() == 24 and (dets.loc[matched, "plane"] == 0).all()
    # without the shift, plane 1's more confident copies would take some of plane 0's clicks
    assert (dets.loc[match_points(dets, truth.centers), "plane"] == 1).any()
    assert (shifted.loc[dets["plane"] == 1, "y"] > dets["y1"].max()).all()
    np.testing.assert_array_equal(pts, truth.centers)  # plane 0 is not moved


def test_calibrate_in_rois_points_and_count():
    truth, dets = _stack_detections()
    left = np.array([[0, 0], [0, 200], [300, 200], [300, 0]], float)
    in_left = truth.centers[:, 1] < 200
    # every nucleus of the left half clicked on both planes (and some outside, ignored)
    planes = np.repeat([0, 1], len(truth.centers))
    points = (planes, np.concatenate([truth.centers, truth.centers]))
    cal = calibrate_in_rois(dets, points=points, polygons=[left])
    inside = in_any_roi(dets[["y", "x"]].to_numpy(), [left])
    assert cal.target == 2 * in_left.sum() and cal.count == cal.target
    assert cal.conf > dets.loc[inside & (dets["confidence"] < 0.5), "confidence"].max()
    # the whole image without ROIs; a known count instead of clicks
    cal = calibrate_in_rois(dets[dets["plane"] == 0], known_count=24)
    assert cal.count == 24 and 0.3 <= cal.conf <= 0.55
    with pytest.raises(ValueError, match="inside the ROI"):
        calibrate_in_rois(dets, points=(planes[:1], np.array([[250.0, 390.0]])), polygons=[left])
    with pytest.raises(ValueError, match="known number"):
        calibrate_in_rois(dets, known_count=0)
