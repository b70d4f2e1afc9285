"""Readers for the public labelled nucleus data sets used to train and benchmark the models.

Each returns ``(image_path, truth_boxes, name)`` items, the form
:func:`napari_yolocell.analysis.evaluate.evaluate_model` takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_yolocell.training.annotations import boxes_from_labels

__all__ = ["bbbc039_instances", "bbbc039_items"]


def bbbc039_instances(mask: np.ndarray) -> np.ndarray:
    """Instance labels from a BBBC039 mask.

    BBBC039 masks are a 4-colour map in channel 0 (touching nuclei get different values);
    instances are the 8-connected components of each value.
    """
    from skimage.measure import label

    colour = mask[..., 0] if mask.ndim == 3 else mask
    out = np.zeros(colour.shape, np.int32)
    nxt = 0
    for v in np.unique(colour):
        if v == 0:
            continue
        lab = label(colour == v, connectivity=2)
        out[lab > 0] = lab[lab > 0] + nxt
        nxt += int(lab.max())
    return out


def bbbc039_items(root: str | Path, split: str = "test", min_area: int = 25):
    """``(image_path, boxes, name)`` for one official BBBC039 split.

    Parameters
    ----------
    root : path
        The ``bbbc039`` folder (``images/``, ``masks/``, ``split/{training,validation,test}.txt``).
    split : {"training", "validation", "test"}
    min_area : int
        Objects under this many pixels are left out of the truth (fragments at the border).
    """
    from PIL import Image

    root = Path(root)
    stems = (root / "split" / f"{split}.txt").read_text().split()
    items = []
    for stem in stems:
        mask = np.asarray(Image.open(root / "masks" / f"{stem}.png"))
        boxes = boxes_from_labels(bbbc039_instances(mask), min_area=min_area)
        items.append((root / "images" / f"{stem}.tif", boxes, stem))
    return items
