"""npe2 sample data: a real BBBC039 nucleus image and a large synthetic image with known truth."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from napari_yolocell.data.synthetic import NucleusField, place_nuclei

__all__ = [
    "SYNTHETIC_SHAPE",
    "nuclei_sample",
    "sample_image_path",
    "sample_truth",
    "sample_truth_boxes",
    "synthetic_sample",
]

DATA_DIR = Path(__file__).parent
#: Full-resolution shape of :func:`synthetic_sample`.
SYNTHETIC_SHAPE = (8192, 8192)
_SYNTHETIC_LEVELS = 4
_SYNTHETIC_SEED = 0

LayerData = tuple[Any, dict[str, Any], str]


@cache
def sample_truth() -> dict[str, Any]:
    """Provenance and ground truth of the shipped BBBC039 image (``data/sample.json``).

    Returns
    -------
    dict
        Keys include ``filename``, ``true_count`` (nuclei >= 25 px), ``n_boxes``, ``license``,
        ``attribution``, ``boxes_csv`` and ``mask``.
    """
    return json.loads((DATA_DIR / "sample.json").read_text(encoding="utf-8"))


def sample_image_path() -> Path:
    """Path of the shipped BBBC039 sample image (uint16 TIFF, 520 x 696)."""
    return DATA_DIR / sample_truth()["filename"]


def sample_truth_boxes() -> np.ndarray:
    """(N, 4) float truth boxes ``y0, x0, y1, x1`` (exclusive end) of the sample image."""
    path = DATA_DIR / sample_truth()["boxes_csv"]
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2).astype(np.float64)


def nuclei_sample() -> list[LayerData]:
    """napari sample: one BBBC039 field (U2OS nuclei, Hoechst) with its true nucleus count.

    Returns
    -------
    list of LayerDataTuple
        One image layer; ``metadata`` holds ``true_count``, ``truth_boxes`` and provenance.
    """
    info = sample_truth()
    image = tifffile.imread(sample_image_path())
    lo, hi = np.percentile(image, [0.1, 99.9])
    metadata = {
        "true_count": int(info["true_count"]),
        "truth_boxes": sample_truth_boxes(),
        "path": str(sample_image_path()),
        "source": f"{info['dataset']} {info['source_image']}",
        "license": info["license"],
        "attribution": info["attribution"],
    }
    kwargs = {
        "name": "BBBC039 nuclei",
        "metadata": metadata,
        "contrast_limits": [float(lo), float(max(hi, lo + 1))],
    }
    return [(image, kwargs, "image")]


def synthetic_sample() -> list[LayerData]:
    """napari sample: an 8192 x 8192 uint16 synthetic nucleus image, rendered lazily.

    A 4-level pyramid of dask arrays whose chunks are rendered on demand from nucleus
    positions fixed up front, so the layer appears at once.

    Returns
    -------
    list of LayerDataTuple
        One multiscale image layer; ``metadata`` holds ``true_count``, ``centers`` (N, 2) and
        ``boxes`` (N, 4) in full-resolution pixels.
    """
    field = _synthetic_field()
    levels = [
        field.to_dask(2**lvl, chunk=512, dtype=np.uint16, seed=_SYNTHETIC_SEED)
        for lvl in range(_SYNTHETIC_LEVELS)
    ]
    metadata = {
        "true_count": len(field),
        "centers": field.centers.copy(),
        "boxes": field.boxes,
        "synthetic": {"shape": SYNTHETIC_SHAPE, "seed": _SYNTHETIC_SEED, "density_per_mp": 400},
    }
    kwargs = {
        "name": "synthetic nuclei 8k",
        "multiscale": True,
        "metadata": metadata,
        # Known from the generator (background 200, peaks 1500-3500): no need to read pixels.
        "contrast_limits": [100.0, 3000.0],
    }
    return [(levels, kwargs, "image")]


@cache
def _synthetic_field() -> NucleusField:
    return place_nuclei(SYNTHETIC_SHAPE, density=400.0, seed=_SYNTHETIC_SEED)
