"""What a model is: :class:`ModelSpec` and the settings files stored beside weights.

The bottom of the models layer: every other module (engine, training, shell) describes a model
with a :class:`ModelSpec`. Nothing here loads a network.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIDECAR_SUFFIX = ".yolocell.json"


FAMILIES = ("yolov5", "yolov6", "classical", "yolo")


CHECKPOINT_KEY = "yolocell"


class WeightsError(ValueError):
    """A weights file that cannot be read as an ultralytics detection model."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about a model.

    Attributes
    ----------
    name : str
        Registry name, or the file name for a model given by path.
    family : str
        ``"yolov5"``, ``"yolov6"``, ``"classical"`` (or ``"yolo"`` when unknown).
    path : pathlib.Path or None
        Weights file or architecture YAML; None for the classical detector.
    sha256 : str or None
        Expected SHA-256 of the weights file (bundled models).
    unpacked_sha256 : str or None
        For weights shipped xz-compressed (``.pt.xz``, to keep the wheel small): the SHA-256
        of the unpacked ``.pt``, checked again before each load from the cache.
    int8 : dict or None
        Bundled INT8 OpenVINO version: ``{"dir": folder, "sha256": {file: hash}}``
        (see :mod:`napari_yolocell.training.quantize`); used by the ``openvino-int8`` backend and by
        ``auto`` on a CPU.
    normalize : str
        ``"percentile"`` or ``"none"``; must match how the training images were made.
    percentiles : tuple of float
        (low, high) percentiles of the percentile normalisation.
    diameter_px : float
        Typical nucleus diameter (pixels) in the training data: the scale at which the model
        works best. The engine rescales tiles when the user gives another diameter.
    lab_diameter_px : float or None
        For a model fine-tuned on a lab's images: the nucleus diameter in that lab's own
        pixels. Detection with the automatic size uses it (the images are resized by
        ``diameter_px / lab_diameter_px``, as in the fine-tune) instead of measuring.
    imgsz : int
        Training image size.
    default_conf : float
        Recommended confidence threshold.
    metrics : dict
        Validation metrics (precision, recall, mAP50, count error...).
    description : str
        Free text shown to users.
    aliases : tuple of str
        Other names accepted by :func:`resolve_model`.
    default : bool
        Whether this is the registry's default model.
    """

    name: str
    family: str = "yolo"
    path: Path | None = None
    sha256: str | None = None
    unpacked_sha256: str | None = None
    int8: dict[str, Any] | None = None
    normalize: str = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.8)
    diameter_px: float = 20.0
    lab_diameter_px: float | None = None
    imgsz: int = 640
    default_conf: float = 0.25
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    aliases: tuple[str, ...] = ()
    default: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (the format of sidecar files and registry entries)."""
        data = dataclasses.asdict(self)
        data["path"] = None if self.path is None else str(self.path)
        data["percentiles"] = list(self.percentiles)
        data["aliases"] = list(self.aliases)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> ModelSpec:
        """Build a spec from a registry entry / sidecar dict; unknown keys are ignored.

        ``file`` (registry form) or ``path`` is resolved relative to ``base``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        file = data.get("file") or data.get("path")
        if file is not None:
            kwargs["path"] = Path(file) if base is None else base / file
        if "percentiles" in kwargs:
            kwargs["percentiles"] = tuple(float(p) for p in kwargs["percentiles"])
        kwargs["aliases"] = tuple(kwargs.get("aliases", ()))
        int8 = kwargs.get("int8")
        if isinstance(int8, dict) and int8.get("dir") and base is not None:
            kwargs["int8"] = {**int8, "dir": str(base / int8["dir"])}
        kwargs.setdefault("name", Path(file).stem if file else "model")
        return cls(**kwargs)


CLASSICAL = ModelSpec(
    name="classical",
    family="classical",
    default_conf=0.0,
    description="Otsu threshold + distance-transform watershed (scikit-image); no training.",
)


def sidecar_path(weights: str | Path) -> Path:
    """Settings file stored next to a weights file: ``best.pt`` -> ``best.yolocell.json``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + SIDECAR_SUFFIX)


def write_sidecar(weights: str | Path, spec: ModelSpec) -> Path:
    """Write ``spec`` next to ``weights`` (used by training); returns the sidecar path."""
    path = sidecar_path(weights)
    data = spec.to_dict()
    data["path"] = Path(weights).name  # relative, so the pair can be moved together
    data["sha256"] = None
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path
