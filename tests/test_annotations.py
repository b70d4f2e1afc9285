import numpy as np
import pytest

from napari_yolocell.training.annotations import (
    boxes_from_labels,
    boxes_from_points,
    boxes_from_shapes,
    clip_boxes,
)


def test_shapes_rectangle_polygon_and_3d_vertices():
    rect = np.array([[10, 20], [10, 60], [30, 60], [30, 20]])
    poly = np.array([[5, 5], [15, 2], [12, 9]])
    nd = np.array([[3, 10, 20], [3, 30, 40]])  # (z, y, x) vertices: last two axes count
    boxes = boxes_from_shapes([rect, poly, nd])
    np.testing.assert_allclose(boxes, [[10, 20, 30, 60], [5, 2, 15, 9], [10, 20, 30, 40]])


def test_points_make_centred_boxes():
    boxes = boxes_from_points(np.array([[50.0, 40.0], [0.0, 0.0]]), diameter=10)
    np.testing.assert_allclose(boxes, [[45, 35, 55, 45], [-5, -5, 5, 5]])
    with pytest.raises(ValueError, match="diameter"):
        boxes_from_points(np.zeros((1, 2)), 0)


def test_labels_one_box_per_instance_exclusive_end():
    lab = np.zeros((20, 20), np.uint16)
    lab[3, 5] = 1  # one pixel
    lab[10:14, 2:8] = 2
    lab[0:2, 0:2] = 3  # 4 px: left out by min_area=5
    np.testing.assert_allclose(boxes_from_labels(lab), [[3, 5, 4, 6], [10, 2, 14, 8], [0, 0, 2, 2]])
    assert len(boxes_from_labels(lab, min_area=5)) == 1
    with pytest.raises(ValueError, match="integer"):
        boxes_from_labels(lab.astype(float))


def test_clip_reports_partial_outside_and_zero_size():
    boxes = np.array(
        [
            [10, 10, 20, 20],  # inside
            [-5, 90, 5, 110],  # partly outside: clipped
            [200, 200, 210, 210],  # wholly outside: dropped
            [30, 30, 30, 40],  # zero height: dropped
            [20, 20, 10, 10],  # drawn from the other corner: normalised
        ]
    )
    kept, keep, rep = clip_boxes(boxes, (100, 100))
    np.testing.assert_array_equal(keep, [True, True, False, False, True])
    np.testing.assert_allclose(kept, [[10, 10, 20, 20], [0, 90, 5, 100], [10, 10, 20, 20]])
    assert (rep.n_in, rep.n_kept, rep.n_clipped, rep.n_outside, rep.n_degenerate) == (5, 3, 1, 1, 1)
    assert "wholly outside" in rep.summary()
