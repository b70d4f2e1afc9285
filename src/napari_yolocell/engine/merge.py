"""Exact merging of per-tile detections into one set for the whole plane.

Boxes are float arrays of shape (n, 6) in the detectors' column order
(:data:`napari_yolocell.models.detector.BOX_COLUMNS`: ``x0, y0, x1, y1, confidence, class``).

The merge has three steps:

1. :func:`drop_shared_edge_boxes` drops, in each tile, the boxes touching (within ``margin``
   pixels) a side that the tile shares with a neighbour. The tile overlap is larger than the
   biggest nucleus, so a nucleus cut by that side lies whole inside the neighbour, away from
   the neighbour's own shared side, and is kept there.
2. :func:`nms` (class-agnostic, greedy, by confidence) removes the duplicates of nuclei lying
   whole inside an overlap, seen by two or four tiles.
3. :func:`ios_suppress` removes any box mostly contained in a more confident one
   (intersection over the smaller area), a clean-up for fragments.

NMS + IOS alone (as SAHI does) keeps half-nucleus fragments from tile edges next to whole
detections with IoU below the threshold, and over-counts dense images by ~2%; dropping shared
edges first makes the count exact. Overlap tests use a KD-tree on box centres, so the merge
scales to hundreds of thousands of boxes.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from napari_yolocell.engine.tiling import Tile

EMPTY = np.zeros((0, 6), dtype=np.float64)


def drop_shared_edge_boxes(boxes: np.ndarray, tile: Tile, margin: float = 2.0) -> np.ndarray:
    """Drop boxes touching a side of ``tile`` that it shares with a neighbour.

    Parameters
    ----------
    boxes : numpy.ndarray, shape (n, 6)
        Boxes in the tile's own pixel coordinates (0..width, 0..height).
    tile : Tile
        The tile, with its shared-side flags.
    margin : float
        A box within ``margin`` pixels of a shared side counts as touching it (detectors
        rarely place a cut box exactly on the edge).

    Returns
    -------
    numpy.ndarray, shape (m, 6)
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    height, width = tile.shape
    touch = np.zeros(len(boxes), dtype=bool)
    if tile.left:
        touch |= boxes[:, 0] <= margin
    if tile.top:
        touch |= boxes[:, 1] <= margin
    if tile.right:
        touch |= boxes[:, 2] >= width - margin
    if tile.bottom:
        touch |= boxes[:, 3] >= height - margin
    return boxes[~touch]


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _candidate_pairs(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of boxes that may intersect, found with a KD-tree on centres.

    Two boxes can only intersect if their centres are closer, per axis, than the mean of their
    sides. The search radius is set by the typical boxes; the few unusually large ones get
    their own radius, so one huge box does not make every pair a candidate.
    """
    empty = np.zeros(0, dtype=np.intp)
    if len(boxes) < 2:
        return empty, empty
    centres = np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    typical = max(2.0 * float(np.percentile(sides, 99)), 1e-6)
    large = np.flatnonzero(sides > typical)
    tree = cKDTree(centres)
    pairs = tree.query_pairs(r=typical, p=np.inf, output_type="ndarray").reshape(-1, 2)
    if len(large) == 0:  # query_pairs gives each pair once, i < j
        return pairs[:, 0].astype(np.intp), pairs[:, 1].astype(np.intp)
    extra = [pairs]
    found = tree.query_ball_point(centres[large], r=(sides[large] + typical) / 2, p=np.inf)
    for i, near in zip(large, found, strict=True):
        extra.append(np.column_stack([np.full(len(near), i), near]).astype(np.intp))
    pairs = np.sort(np.concatenate(extra).reshape(-1, 2).astype(np.intp), axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    # one integer key per pair: np.unique over rows is several times slower
    key = np.unique(pairs[:, 0] * len(boxes) + pairs[:, 1])
    return key // len(boxes), key % len(boxes)


def _intersections(boxes: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    width = np.minimum(boxes[i, 2], boxes[j, 2]) - np.maximum(boxes[i, 0], boxes[j, 0])
    height = np.minimum(boxes[i, 3], boxes[j, 3]) - np.maximum(boxes[i, 1], boxes[j, 1])
    return np.clip(width, 0, None) * np.clip(height, 0, None)


def _confidence_order(boxes: np.ndarray) -> np.ndarray:
    """Indices by decreasing confidence; ties by input order, so results are deterministic."""
    return np.argsort(-boxes[:, 4], kind="stable")


def _greedy_suppress(n: int, order: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Greedy suppression over the conflicting pairs (i, j); returns a keep mask."""
    keep = np.ones(n, dtype=bool)
    if len(i) == 0:
        return keep
    rank = np.empty(n, dtype=np.intp)
    rank[order] = np.arange(n)
    # Orient every pair as (stronger, weaker), then visit strong boxes in rank order.
    swap = rank[i] > rank[j]
    strong = np.where(swap, j, i)
    weak = np.where(swap, i, j)
    by_rank = np.argsort(rank[strong], kind="stable")
    for s, w in zip(strong[by_rank], weak[by_rank], strict=True):
        if keep[s]:
            keep[w] = False
    return keep


def _suppress(boxes: np.ndarray, threshold: float, denominator) -> np.ndarray:
    """Greedy suppression of pairs whose ``intersection / denominator`` exceeds ``threshold``;
    kept indices in input order. ``denominator(area_i, area_j, intersection)``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    i, j = _candidate_pairs(boxes)
    inter = _intersections(boxes, i, j)
    areas = _areas(boxes)
    hit = inter > threshold * np.maximum(denominator(areas[i], areas[j], inter), 1e-12)
    keep = _greedy_suppress(len(boxes), _confidence_order(boxes), i[hit], j[hit])
    return np.flatnonzero(keep)


def nms(boxes: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Class-agnostic greedy non-maximum suppression over a whole plane.

    The rule of :func:`napari_yolocell.models.detector.dense_nms` (torchvision's), with overlap
    candidates found by a KD-tree so it scales to hundreds of thousands of boxes.

    Parameters
    ----------
    boxes : numpy.ndarray, shape (n, 6)
        Boxes in one common coordinate frame.
    iou : float
        A box whose IoU with a more confident kept box exceeds this is removed.

    Returns
    -------
    numpy.ndarray of int
        Indices of the kept boxes, in input order.
    """
    return _suppress(boxes, iou, lambda a_i, a_j, inter: a_i + a_j - inter)


def ios_suppress(boxes: np.ndarray, threshold: float = 0.7) -> np.ndarray:
    """Remove boxes mostly inside a more confident box (intersection over smaller area).

    Parameters
    ----------
    boxes : numpy.ndarray, shape (n, 6)
    threshold : float
        A box is removed when its intersection with a more confident kept box exceeds this
        fraction of the smaller of the two areas.

    Returns
    -------
    numpy.ndarray of int
        Indices of the kept boxes, in input order.
    """
    return _suppress(boxes, threshold, lambda a_i, a_j, inter: np.minimum(a_i, a_j))


def offset_boxes(boxes: np.ndarray, tile: Tile) -> np.ndarray:
    """Shift boxes from tile coordinates to plane coordinates."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 6)
    out[:, [0, 2]] += tile.x0
    out[:, [1, 3]] += tile.y0
    return out


def merge_tiles(
    tile_boxes: list[tuple[Tile, np.ndarray]],
    iou: float = 0.5,
    ios: float | None = 0.7,
    margin: float = 2.0,
    drop_edges: bool = True,
) -> np.ndarray:
    """Merge per-tile detections into one set of boxes in plane coordinates.

    Parameters
    ----------
    tile_boxes : list of (Tile, numpy.ndarray)
        Each tile with its boxes in tile coordinates.
    iou : float
        IoU threshold of the final NMS.
    ios : float or None
        Intersection-over-smaller threshold of the clean-up step; None skips it.
    margin : float
        Shared-edge margin in pixels (see :func:`drop_shared_edge_boxes`).
    drop_edges : bool
        False gives plain NMS + IOS (SAHI-like), only useful for comparisons.

    Returns
    -------
    numpy.ndarray, shape (n, 6)
    """
    parts = []
    for tile, boxes in tile_boxes:
        if drop_edges:
            boxes = drop_shared_edge_boxes(boxes, tile, margin)
        parts.append(offset_boxes(boxes, tile))
    merged = np.concatenate(parts) if parts else EMPTY.copy()
    merged = merged[nms(merged, iou)]
    if ios is not None:
        merged = merged[ios_suppress(merged, ios)]
    return merged
