"""Typical nucleus size of an image, measured without a model.

A detector trained on ~20 px nuclei misses nuclei 5x larger (it sees their texture, not their
outline). Detection therefore measures the typical diameter on an overview of each image and,
only when it lies far outside the range the model was trained on, resizes the tiles so the
nuclei reach the model at its training size (:func:`auto_diameter`).

The measurement: Otsu foreground of a lightly smoothed image; for each connected component,
its largest inscribed radius (maximum of the Euclidean distance transform). In clumps of
touching nuclei this is still one nucleus' radius, so clumping does not inflate the estimate.
The median radius over the components is converted to the bounding-box diameter used
everywhere else (``sqrt(width * height)`` of a nucleus' box).
"""

from __future__ import annotations

import numpy as np

__all__ = ["estimate_diameter", "auto_diameter", "RADIUS_TO_DIAMETER"]

# Box diameter sqrt(w * h) per inscribed radius: chosen so that the estimate matches the truth
# on 169 training images of BBBC039, DSB2018 and Kromp 2020 (median estimate / truth 1.0,
# 10th-90th percentile 0.8-1.1; nuclei are elongated and Otsu masks slightly tight, a disc
# would give 2.0).
RADIUS_TO_DIAMETER = 2.43
MIN_COMPONENTS = 5
# Above this factor of the model's training diameter, tiles are shrunk; below it the model is
# used as is (it was trained with +-50 % scale augmentation on 20-45 px nuclei). Never enlarged:
# noise and textured nuclei read as small blobs, and upscaling a normal image would only cost
# time and accuracy.
AUTO_HIGH = 2.6


def estimate_diameter(image: np.ndarray, min_area: int = 12) -> float | None:
    """Typical nucleus diameter (px, bounding-box convention) of a 2-D grey image.

    Parameters
    ----------
    image : numpy.ndarray, shape (Y, X)
        Any real dtype; bright nuclei on a darker background.
    min_area : int
        Components smaller than this many pixels are noise and ignored.

    Returns
    -------
    float or None
        None when the image has no usable foreground (flat, or fewer than
        ``MIN_COMPONENTS`` objects): the caller then keeps the model's scale.
    """
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_otsu

    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 8 or not np.isfinite(img).any():
        return None
    img = np.nan_to_num(img, nan=float(np.nanmin(img)))
    if float(img.max()) <= float(img.min()):
        return None
    smooth = gaussian(img, sigma=1.0, preserve_range=True)
    fg = smooth > threshold_otsu(smooth)
    fraction = fg.mean()
    if not 0.002 < fraction < 0.9:
        return None
    labels, n = ndi.label(fg)
    if n < MIN_COMPONENTS:
        return None
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    dist = ndi.distance_transform_edt(fg)
    # Largest inscribed radius per component; ufunc.at is much faster than ndimage.maximum
    # (which sorts every pixel) for the same maxima.
    radii = np.zeros(n + 1)
    np.maximum.at(radii, labels.ravel(), dist.ravel())
    radii = radii[1:]
    keep = areas >= min_area
    if keep.sum() < MIN_COMPONENTS:
        return None
    return float(np.median(radii[keep]) * RADIUS_TO_DIAMETER)


def auto_diameter(estimate: float | None, model_diameter: float) -> float | None:
    """The diameter to rescale for, or None to use the model at its own scale.

    Only nuclei far larger than the model's comfortable range (over ``AUTO_HIGH`` times its
    training diameter) trigger resizing, so images like the training data are never touched by
    an estimation error.
    """
    if estimate is None or not np.isfinite(estimate):
        return None
    return float(estimate) if estimate > AUTO_HIGH * float(model_diameter) else None
