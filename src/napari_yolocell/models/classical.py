"""Classical nucleus detector: Otsu threshold + distance-transform watershed.

It is the team's no-training baseline (BBBC039: F1 0.80) and a deterministic detector for
testing the tiling and border merge.

Threshold: Otsu on a single tile is meaningless when the tile holds no nucleus (it splits the
noise in two). The engine therefore calls :meth:`ClassicalDetector.prepare` with a normalised
overview of the whole plane and the threshold computed there is used for every tile. Without
``prepare`` (or a fixed ``threshold``) each tile gets its own Otsu threshold, and tiles whose
contrast (99th - 1st percentile) is below ``min_contrast`` grey levels return no detections.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import regionprops
from skimage.segmentation import watershed

from napari_yolocell.models.detector import Detector
from napari_yolocell.models.spec import CLASSICAL, ModelSpec


def _grey(tile: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 -> (H, W) float in 0..255."""
    tile = np.asarray(tile)
    if tile.ndim == 3:
        tile = tile.max(axis=-1)
    return tile.astype(np.float32)


class ClassicalDetector(Detector):
    """Otsu + watershed detector with the detector interface
    (:class:`~napari_yolocell.models.detector.Detector`).

    Parameters
    ----------
    spec : ModelSpec, optional
        Its ``diameter_px`` is the expected nucleus diameter; the engine rescales tiles to it
        when the user gives another diameter, exactly as for a neural network.
    threshold : float, optional
        Fixed foreground threshold in 0..255 (normalised units); overrides ``prepare``.
    min_contrast : float
        Per-tile fallback: tiles flatter than this (grey levels) have no nuclei.
    sigma : float
        Gaussian smoothing before thresholding, in pixels.

    Notes
    -----
    Confidence is the mean normalised intensity of the nucleus (0..1): it orders the boxes
    for NMS. The classical model's default confidence threshold is 0, so all are kept.
    """

    needs_overview = True
    grey_tiles = True

    def __init__(
        self,
        spec: ModelSpec | None = None,
        threshold: float | None = None,
        min_contrast: float = 20.0,
        sigma: float = 1.0,
    ) -> None:
        self.spec = spec or CLASSICAL
        self.fixed_threshold = threshold
        self.plane_threshold: float | None = None
        self.min_contrast = min_contrast
        self.sigma = sigma

    def prepare(self, overview: np.ndarray) -> None:
        """Set the threshold for the next plane from a normalised overview of it."""
        grey = _grey(overview)
        if grey.size == 0 or np.ptp(grey) < self.min_contrast:
            self.plane_threshold = np.inf  # flat plane: nothing is foreground
        else:
            self.plane_threshold = float(threshold_otsu(self._smooth(grey)))

    def _smooth(self, grey: np.ndarray) -> np.ndarray:
        if self.sigma <= 0:
            return grey
        return gaussian(grey, sigma=self.sigma, preserve_range=True)

    def _threshold(self, smooth: np.ndarray) -> float:
        if self.fixed_threshold is not None:
            return float(self.fixed_threshold)
        if self.plane_threshold is not None:
            return self.plane_threshold
        low, high = np.percentile(smooth, [1, 99])
        if high - low < self.min_contrast:
            return np.inf
        return float(threshold_otsu(smooth))

    def segment(self, tile: np.ndarray) -> np.ndarray:
        """Label image of the nuclei of one tile (watershed-split touching nuclei)."""
        smooth = self._smooth(_grey(tile))
        mask = smooth > self._threshold(smooth)
        diameter = float(self.spec.diameter_px)
        min_area = max(4.0, 0.1 * np.pi * (diameter / 2) ** 2)
        labels, _ = ndi.label(mask)
        sizes = np.bincount(labels.ravel())
        mask &= sizes[labels] >= min_area
        if not mask.any():
            return np.zeros(mask.shape, dtype=np.int32)
        distance = ndi.distance_transform_edt(mask)
        # Peaks closer than ~half a diameter belong to the same nucleus.
        peaks = peak_local_max(
            distance,
            min_distance=max(1, int(round(0.4 * diameter))),
            labels=ndi.label(mask)[0],
            exclude_border=False,
        )
        markers = np.zeros(mask.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        return watershed(-distance, markers, mask=mask)

    def _boxes(self, tile: np.ndarray) -> np.ndarray:
        grey = _grey(tile)
        props = regionprops(self.segment(tile), intensity_image=grey)
        rows = [
            (p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2], p.intensity_mean / 255.0, 0.0)
            for p in props
        ]
        return np.asarray(rows, dtype=np.float64).reshape(-1, 6)

    def predict(
        self, tiles: list[np.ndarray], conf: float, iou: float, max_det: int
    ) -> list[np.ndarray]:
        """Detect nuclei in each tile; ``iou`` is unused (watershed regions do not overlap)."""
        out = []
        for tile in tiles:
            boxes = self._boxes(tile)
            boxes = boxes[boxes[:, 4] >= conf]
            order = np.argsort(-boxes[:, 4], kind="stable")[:max_det]
            out.append(boxes[np.sort(order)])
        return out
