"""Tests of the exact border merge."""

import numpy as np
import pytest

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import DetectParams, detect_image
from napari_yolocell.engine.merge import drop_shared_edge_boxes, ios_suppress, merge_tiles, nms
from napari_yolocell.engine.normalize import percentile_range, to_uint8
from napari_yolocell.engine.tiling import Tile, tile_grid
from napari_yolocell.models.classical import ClassicalDetector


def box(x0, y0, x1, y1, conf=0.9):
    return [x0, y0, x1, y1, conf, 0]


def iou_matrix(a, b):
    """IoU between (n, 4) and (m, 4) boxes, both y0, x0, y1, x1."""
    y0 = np.maximum(a[:, None, 0], b[None, :, 0])
    x0 = np.maximum(a[:, None, 1], b[None, :, 1])
    y1 = np.minimum(a[:, None, 2], b[None, :, 2])
    x1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def edge_centres(shape, tile, overlap, spacing=34.0, border=16.0):
    """Nucleus centres on every shared tile side and corner, >= spacing apart."""
    tiles = tile_grid(shape, tile, overlap)
    xs = sorted({t.x0 for t in tiles if t.left} | {t.x1 for t in tiles if t.right})
    ys = sorted({t.y0 for t in tiles if t.top} | {t.y1 for t in tiles if t.bottom})
    corners = [(y, x) for y in ys for x in xs]
    along = [(y, x) for x in xs for y in np.arange(border, shape[0] - border, spacing)]
    along += [(y, x) for y in ys for x in np.arange(border, shape[1] - border, spacing)]
    # Also just inside / outside the edges, where halves of nuclei get cut.
    near = [(y, x + d) for (y, x) in along[::3] for d in (-9, 9)]
    kept = []
    for c in corners + along + near:
        c = np.asarray(c, float)
        inside = border <= c[0] < shape[0] - border and border <= c[1] < shape[1] - border
        if inside and all(np.hypot(*(c - k)) >= spacing for k in kept):
            kept.append(c)
    return np.array(kept)


def edge_image(shape, tile, overlap, seed=0):
    centres = edge_centres(shape, tile, overlap)
    return make_nuclei_image(shape, centers=centres, diameter=(14.0, 24.0), seed=seed)


def assert_one_to_one(df, syn):
    det = df[["y0", "x0", "y1", "x1"]].to_numpy()
    iou = iou_matrix(syn.boxes, det)
    assert len(det) == syn.count
    assert ((iou > 0.5).sum(axis=1) == 1).all(), "every nucleus matched by exactly one box"
    assert ((iou > 0.5).sum(axis=0) == 1).all(), "every box matches exactly one nucleus"


def test_drop_shared_edge_boxes():
    tile = Tile(0, 100, 200, 300, left=True, right=False, bottom=True)
    boxes = np.array(
        [
            box(0.5, 50, 20, 70),
            box(180, 50, 199.5, 70),  # left shared / right border
            box(50, 185, 70, 198.5),
            box(50, 0, 70, 10),
            box(50, 50, 70, 70),
        ]
    )
    kept = drop_shared_edge_boxes(boxes, tile, margin=2)
    assert kept[:, 0].tolist() == [180, 50, 50]


def test_nms_and_ios():
    boxes = np.array(
        [
            box(0, 0, 10, 10, 0.8),
            box(1, 0, 11, 10, 0.9),
            box(30, 30, 40, 40, 0.5),
            box(31, 31, 35, 39, 0.6),
            box(100, 100, 110, 110, 0.1),
        ]
    )
    keep = nms(boxes, 0.5)
    assert keep.tolist() == [1, 2, 3, 4]
    # Box 3 lies inside box 2 (IoU 0.32, survives NMS); IOS keeps the more confident (3).
    assert ios_suppress(boxes[keep], 0.7).tolist() == [0, 2, 3]
    assert nms(np.zeros((0, 6))).size == 0


def test_nms_matches_torchvision():
    import torch
    import torchvision as torchvision

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 300, (400, 2))
    wh = rng.uniform(5, 40, (400, 2))
    boxes = np.column_stack([xy, xy + wh, rng.random(400), np.zeros(400)])
    ours = nms(boxes, 0.4)
    ref = torchvision.ops.nms(torch.as_tensor(boxes[:, :4]), torch.as_tensor(boxes[:, 4]), 0.4)
    assert ours.tolist() == sorted(ref.tolist())


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [((560, 600), 256, 64), ((600, 560), 320, 48), ((700, 700), 512, 64)],
)
def test_border_merge_counts_exactly(shape, tile, overlap):
    syn = edge_image(shape, tile, overlap)
    df = detect_image(syn.image, ClassicalDetector(), DetectParams(tile=tile, overlap=overlap))
    assert_one_to_one(df, syn)


def test_nms_only_overcounts_at_tile_edges():
    """Without dropping shared edges, cut halves of nuclei survive NMS + IOS."""
    shape, tile, overlap = (560, 600), 256, 64
    syn = edge_image(shape, tile, overlap)
    lo, hi = percentile_range(syn.image, 1, 99.8)
    detector = ClassicalDetector()
    detector.prepare(to_uint8(syn.image, lo, hi))
    tiles = tile_grid(shape, tile, overlap)
    inputs = [np.repeat(to_uint8(syn.image[t.slices], lo, hi)[..., None], 3, 2) for t in tiles]
    pairs = list(zip(tiles, detector.predict(inputs, 0.0, 0.5, 1000), strict=True))
    exact = merge_tiles(pairs, iou=0.5, ios=0.7, drop_edges=True)
    naive = merge_tiles(pairs, iou=0.5, ios=0.7, drop_edges=False)
    assert len(exact) == syn.count
    assert len(naive) > syn.count


def test_nms_with_a_few_huge_boxes_matches_torchvision():
    import torch
    import torchvision as torchvision

    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 2000, (3000, 2))
    wh = rng.uniform(8, 25, (3000, 2))
    wh[:5] = 600  # a few bogus giant boxes must still be compared with everything
    boxes = np.column_stack([xy, xy + wh, rng.random(3000), np.zeros(3000)])
    for iou in (0.1, 0.5):
        ref = torchvision.ops.nms(torch.as_tensor(boxes[:, :4]), torch.as_tensor(boxes[:, 4]), iou)
        assert nms(boxes, iou).tolist() == sorted(ref.tolist())
    assert len(ios_suppress(boxes, 0.7)) < len(boxes)
