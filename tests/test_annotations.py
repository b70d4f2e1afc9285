import numpy as np
import pytest

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.shell.layers import boxes_to_rectangles
from napari_yolocell.training.annotations import (
    annotation_boxes,
    boxes_from_labels,
    boxes_from_points,
    boxes_from_shapes,
    clip_boxes,
)
from napari_yolocell.training.dataset import plane_samples, safe_name, samples_from_annotations


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


# --------------------------------------------------------------------------- layer data -> samples


def test_samples_from_annotations_planes_and_checks():
    stack = np.zeros((3, 64, 64), np.uint16)
    pts = np.array([[0, 10, 10], [2, 30, 30], [2, 40, 40]], float)
    samples = samples_from_annotations(stack, "my stack", "points", pts, diameter=8)
    assert [s.name for s in samples] == ["my_stack_p0", "my_stack_p2"]
    assert [len(s.boxes) for s in samples] == [1, 2]
    np.testing.assert_allclose(samples[0].boxes[0], [6.5, 6.5, 14.5, 14.5])
    with pytest.raises(ValueError, match="2-D but the image is 3-D"):
        samples_from_annotations(stack, "s", "points", pts[:, 1:])
    with pytest.raises(ValueError, match="lies inside"):
        samples_from_annotations(stack, "s", "points", pts + [0, 500, 500])
    rect = [np.array([[1, 9.5, 9.5], [1, 9.5, 19.5], [1, 19.5, 19.5], [1, 19.5, 9.5]])]
    (sample,) = samples_from_annotations(stack, "s", "shapes", rect, shape_types=["rectangle"])
    assert sample.name == "s_p1"
    np.testing.assert_allclose(sample.boxes, [[10, 10, 20, 20]])
    labels = np.zeros((3, 64, 64), np.int32)
    labels[1, 5:9, 5:12] = 1
    (sample,) = samples_from_annotations(stack, "s", "labels", labels)
    np.testing.assert_allclose(sample.boxes, [[5, 5, 9, 12]])


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei_image((256, 320), n_nuclei=15, seed=4)


def test_clicked_points_on_a_scaled_image_map_to_its_pixels(nuclei):
    """Points clicked in world units (a layer without scale) over an image at 0.5 um/px."""
    scale, translate = (0.5, 0.5), (10.0, 20.0)
    world = (nuclei.centers - 0.5) * scale + translate  # what napari stores for the clicks
    (boxes,) = annotation_boxes(
        "points",
        world,
        nuclei.image.shape,
        diameter=12,
        image_scale=scale,
        image_translate=translate,
    ).values()
    np.testing.assert_allclose((boxes[:, :2] + boxes[:, 2:]) / 2, nuclei.centers, atol=1e-9)
    np.testing.assert_allclose(boxes[:, 2:] - boxes[:, :2], 12.0)


def test_rectangles_round_trip_and_every_shape_kind(nuclei):
    """Boxes drawn as napari rectangles (as the Import tab shows them) read back exactly."""
    rects = boxes_to_rectangles(nuclei.boxes)
    (boxes,) = annotation_boxes("shapes", rects, nuclei.image.shape).values()
    np.testing.assert_allclose(boxes, nuclei.boxes)
    types = ["rectangle", "ellipse", "polygon"] * 5
    assert len(annotation_boxes("shapes", rects, nuclei.image.shape, shape_types=types)[0]) == 15
    with pytest.raises(ValueError, match="lines or paths"):
        annotation_boxes("shapes", rects[:2], nuclei.image.shape, shape_types=["line", "path"])
    with pytest.raises(ValueError, match="is empty: draw boxes"):
        annotation_boxes("shapes", [], nuclei.image.shape, name="boxes")


def test_labels_stack_shape_and_kind_checks(nuclei):
    labels = np.zeros((2, *nuclei.image.shape), np.int32)
    for i, (y0, x0, y1, x1) in enumerate(nuclei.boxes.astype(int)[:6]):
        labels[i % 2, y0:y1, x0:x1] = i + 1
    per_plane = annotation_boxes("labels", labels, labels.shape)
    assert sorted(per_plane) == [0, 1] and [len(b) for b in per_plane.values()] == [3, 3]
    with pytest.raises(ValueError, match=r"has shape \(256, 320\) but the image has"):
        annotation_boxes("labels", labels[0], labels.shape, name="painted")
    with pytest.raises(ValueError, match="'painted' is empty: paint nuclei"):
        annotation_boxes("labels", np.zeros_like(labels), labels.shape, name="painted")
    with pytest.raises(ValueError, match="unknown annotation kind"):
        annotation_boxes("tracks", labels, labels.shape)


def test_plane_samples_of_an_rgb_stack_and_safe_names():
    rgb = np.zeros((2, 32, 48, 3), np.uint8)
    rgb[1, ..., 2] = 200
    boxes = {1: np.array([[4.0, 4.0, 12.0, 12.0]])}
    (sample,) = plane_samples(rgb, "slide 3 (DAPI)", boxes, rgb=True)
    assert sample.name == "slide_3_DAPI_p1" and sample.image.shape == (32, 48, 3)
    assert sample.image[..., 2].max() == 200
    assert safe_name("../..") == "image" and safe_name("a b.c") == "a_b.c"
