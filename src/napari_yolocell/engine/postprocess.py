"""Per-image clean-up of a plane's detections: what is counted as a nucleus.

Measured on labelled sources the bundled models never saw (``benchmarks/bench_heldout.py``),
the errors on other labs' images are mostly over-counts by low-confidence false positives
far smaller than the image's nuclei (micronuclei, debris) and by parts of one large nucleus
found next to it. The functions here flag them from the boxes and scores alone, so they cost no
extra forward pass:

* :func:`small_object_mask`: boxes under a fraction of the image's typical (median) nucleus
  area. Detection keeps them in its table with ``small = True`` (micronucleus assays count
  them) but counts exclude them (``DetectParams.min_relative_area``).
* :func:`split_mask`: boxes mostly inside a larger, more confident box.
* :func:`adaptive_conf`: a per-image confidence threshold (Otsu of the image's confidence
  distribution, kept within bounds).
* :func:`first_pass_diameter`: the typical nucleus size from confident detections of a first
  pass at the model's scale.

Boxes are ``(n, 4)`` corner arrays in any consistent order (``y0, x0, y1, x1`` or
``x0, y0, x1, y1``): only areas and intersections are used.
"""

from __future__ import annotations

import numpy as np

from napari_yolocell.engine.merge import _areas, _candidate_pairs, _intersections
from napari_yolocell.engine.size import AUTO_HIGH

__all__ = [
    "REFERENCE_CONF",
    "adaptive_conf",
    "first_pass_diameter",
    "small_object_mask",
    "split_mask",
]

# Detections at least this confident define an image's typical nucleus (true nuclei score
# ~0.85, the false positives ~0.4 on held-out sources).
REFERENCE_CONF = 0.5
MIN_REFERENCE = 5


def _as_boxes6(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((len(boxes), 6))
    out[:, :4] = boxes
    out[:, 4] = np.asarray(scores, dtype=np.float64).reshape(-1)
    return out


def _reference(areas: np.ndarray, scores: np.ndarray) -> np.ndarray:
    confident = scores >= REFERENCE_CONF
    return areas[confident] if confident.sum() >= MIN_REFERENCE else areas


def small_object_mask(
    boxes: np.ndarray,
    scores: np.ndarray,
    min_relative_area: float = 0.25,
    shape: tuple[int, int] | None = None,
    border: float = 2.0,
) -> np.ndarray:
    """Flag boxes far smaller than the image's typical nucleus.

    Parameters
    ----------
    boxes : numpy.ndarray, shape (n, 4)
        Detections of ONE image plane.
    scores : numpy.ndarray, shape (n,)
        Their confidences.
    min_relative_area : float
        A box whose area is under this fraction of the median area of the confident boxes
        (score >= ``REFERENCE_CONF``; all boxes if fewer than 5 are) is flagged. 0 flags none.
    shape : (int, int), optional
        Image ``(height, width)``; boxes are then ``y0, x0, y1, x1`` and a box within
        ``border`` pixels of the image edge is never flagged (a nucleus cut by the edge is
        legitimately small).
    border : float
        See ``shape``.

    Returns
    -------
    numpy.ndarray of bool, shape (n,)
        True for the small objects (micronuclei, debris).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) < MIN_REFERENCE or not min_relative_area > 0:
        return np.zeros(len(boxes), dtype=bool)
    areas = _areas(_as_boxes6(boxes, scores))
    typical = float(np.median(_reference(areas, scores)))
    small = areas < min_relative_area * typical
    if shape is not None:
        height, width = shape
        small &= ~(
            (boxes[:, 0] <= border)
            | (boxes[:, 1] <= border)
            | (boxes[:, 2] >= height - border)
            | (boxes[:, 3] >= width - border)
        )
    return small


def split_mask(
    boxes: np.ndarray,
    scores: np.ndarray,
    min_inside: float = 0.6,
    min_parent_conf: float = REFERENCE_CONF,
) -> np.ndarray:
    """Flag boxes mostly inside a larger, more confident box (a nucleus split into parts).

    Parameters
    ----------
    boxes : numpy.ndarray, shape (n, 4)
    scores : numpy.ndarray, shape (n,)
    min_inside : float
        Fraction of the box's own area that must lie inside the other box.
    min_parent_conf : float
        The containing box must score at least this.

    Returns
    -------
    numpy.ndarray of bool, shape (n,)
    """
    b6 = _as_boxes6(boxes, scores)
    flagged = np.zeros(len(b6), dtype=bool)
    i, j = _candidate_pairs(b6)
    if not len(i):
        return flagged
    inter = _intersections(b6, i, j)
    areas = _areas(b6)
    s = b6[:, 4]
    for small, big in ((i, j), (j, i)):
        hit = (
            (areas[big] > areas[small])
            & (s[big] > s[small])
            & (s[big] >= min_parent_conf)
            & (inter >= min_inside * np.maximum(areas[small], 1e-12))
        )
        flagged[small[hit]] = True
    return flagged


def adaptive_conf(
    scores: np.ndarray, conf: float, upper: float = 0.5, min_detections: int = 20
) -> float:
    """Per-image confidence threshold: Otsu's split of the image's confidences.

    True nuclei score high (~0.85) and the false positives of unfamiliar images lower (~0.4);
    when the image's confidences above ``conf`` fall into two groups, the threshold moves up to
    the valley between them, never above ``upper``.

    Parameters
    ----------
    scores : numpy.ndarray
        Confidences of one image's detections (made at ``conf`` or lower).
    conf : float
        The model's threshold: the result is never below it.
    upper : float
        Highest threshold the rule may choose.
    min_detections : int
        With fewer detections above ``conf``, ``conf`` is returned.

    Returns
    -------
    float
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = s[s >= conf]
    if len(s) < min_detections or float(s.max()) <= float(s.min()):
        return float(conf)
    from skimage.filters import threshold_otsu

    return float(np.clip(threshold_otsu(s, nbins=64), conf, max(conf, upper)))


def first_pass_diameter(
    boxes: np.ndarray, scores: np.ndarray, model_diameter: float, high: float = AUTO_HIGH
) -> float | None:
    """Nucleus diameter to rescale for, from a first detection pass at the model's scale.

    Parameters
    ----------
    boxes, scores : numpy.ndarray
        Detections of the first pass.
    model_diameter : float
        The model's training diameter (``ModelSpec.diameter_px``).
    high : float
        Rescale only when the median box diameter ``sqrt(w * h)`` of the confident boxes is
        over ``high`` times ``model_diameter`` (the rule of
        :func:`~napari_yolocell.engine.size.auto_diameter`).

    Returns
    -------
    float or None
        None = keep the model's scale.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    confident = scores >= REFERENCE_CONF
    if confident.sum() < MIN_REFERENCE:
        return None
    d = float(np.median(np.sqrt(_areas(_as_boxes6(boxes[confident], scores[confident])))))
    return d if d > high * float(model_diameter) else None
