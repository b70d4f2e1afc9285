"""Model registry, integrity check and loading, all offline.

A model is named in one of these ways (see :func:`resolve_model`):

- a bundled model name or alias from ``models/registry.json`` (``"default"``, ``"v5"``,
  ``"v6"``...); bundled weights sit next to the registry and are SHA-256 checked;
- ``"classical"``: the Otsu + watershed baseline (no weights);
- an ultralytics architecture YAML shipped with ultralytics (``"yolov5n.yaml"``,
  ``"yolov6n.yaml"``): an untrained network, for tests and benchmarks;
- a path to any ultralytics detection checkpoint (``.pt``). Our settings for it (normalisation,
  nucleus diameter...) are read from a sidecar ``<weights>.yolocell.json`` written by training,
  or from a ``"yolocell"`` entry in the checkpoint; without either, percentile normalisation
  and the default settings are assumed.

Loading a ``.pt`` file unpickles Python objects, which can run code: only load weights you
trust. Bundled weights are checked against their SHA-256 before loading.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_yolocell.backends import Detector, make_detector

REGISTRY_DIR = Path(__file__).parent / "models"
REGISTRY_FILE = REGISTRY_DIR / "registry.json"
SIDECAR_SUFFIX = ".yolocell.json"
FAMILIES = ("yolov5", "yolov6", "classical", "yolo")
CHECKPOINT_KEY = "yolocell"


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
        (see :mod:`napari_yolocell.quantize`); used by the ``openvino-int8`` backend and by
        ``auto`` on a CPU.
    normalize : str
        ``"percentile"`` or ``"none"``; must match how the training images were made.
    percentiles : tuple of float
        (low, high) percentiles of the percentile normalisation.
    diameter_px : float
        Typical nucleus diameter (pixels) in the training data: the scale at which the model
        works best. The engine rescales tiles when the user gives another diameter.
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


def _read_registry(path: Path | None = None) -> list[ModelSpec]:
    path = REGISTRY_FILE if path is None else path
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as fh:
        entries = json.load(fh).get("models", [])
    return [ModelSpec.from_dict(e, base=path.parent) for e in entries]


def list_models() -> list[ModelSpec]:
    """Bundled models from the registry, followed by the classical baseline."""
    return [*_read_registry(), CLASSICAL]


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


def _family_from_name(name: str) -> str:
    lower = name.lower()
    for family in ("yolov5", "yolov6"):
        if family in lower:
            return family
    return "yolo"


def _spec_for_weights(path: Path) -> ModelSpec:
    """Spec of a user-provided checkpoint: sidecar settings if present, else defaults."""
    for side in (sidecar_path(path), path.with_name(path.name + SIDECAR_SUFFIX)):
        if side.exists():
            try:
                data = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot read model settings file {str(side)!r}: {err}") from err
            spec = ModelSpec.from_dict(data)
            return dataclasses.replace(spec, path=path, sha256=None)
    return ModelSpec(name=path.name, family=_family_from_name(path.name), path=path)


def _is_shipped_yaml(name: str) -> bool:
    return name.lower().endswith((".yaml", ".yml")) and not Path(name).exists()


def _lookup_registry(name: str) -> ModelSpec | None:
    models = _read_registry()
    key = name.lower()
    if key == "default":
        defaults = [m for m in models if m.default] or models[:1]
        return defaults[0] if defaults else None
    for spec in models:
        if key == spec.name.lower() or key in (a.lower() for a in spec.aliases):
            return spec
    return None


def resolve_model(name_or_path: str | Path | ModelSpec) -> ModelSpec:
    """Turn a model name, alias, YAML or weights path into a :class:`ModelSpec`.

    Raises
    ------
    FileNotFoundError
        For a weights path (or bundled weights file) that does not exist.
    ValueError
        For an unknown name.
    """
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    name = str(name_or_path)
    if name.lower() == "classical":
        return CLASSICAL
    spec = _lookup_registry(name)
    if spec is not None:
        if spec.path is None or not spec.path.exists():
            raise FileNotFoundError(
                f"weights file of bundled model {spec.name!r} is missing: {spec.path}"
            )
        return spec
    if name.lower() == "default":
        raise ValueError(
            "no bundled model is installed (models/registry.json is empty); use "
            "'classical' or a path to trained weights (.pt)"
        )
    if _is_shipped_yaml(name):
        return ModelSpec(
            name=name,
            family=_family_from_name(name),
            path=Path(name),
            description="untrained architecture (random weights)",
        )
    path = Path(name).expanduser()
    if path.suffix.lower() in (".pt", ".pth") or path.parent != Path("."):
        if not path.is_file():
            raise FileNotFoundError(f"model weights file not found: {str(path)!r}")
        return _spec_for_weights(path)
    known = [m.name for m in list_models()] + ["default", "yolov5n.yaml", "yolov6n.yaml"]
    raise ValueError(f"unknown model {name!r}; use a weights path (.pt) or one of {known}")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Refuse a file whose SHA-256 differs from ``expected``.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        On mismatch: the file is corrupt or was replaced, and is not loaded (it is pickled code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights file not found: {str(path)!r}")
    actual = file_sha256(path)
    if actual.lower() != expected.lower():
        raise ValueError(
            f"SHA-256 mismatch for model weights {str(path)!r}: expected {expected}, got "
            f"{actual}. The file is corrupt or was replaced; it was not loaded. Reinstall "
            "napari-yolocell to restore the bundled weights."
        )


def _with_checkpoint_metadata(detector: Detector) -> Detector:
    """Apply settings stored in a checkpoint's ``"yolocell"`` entry, if it carries one."""
    ckpt = getattr(getattr(detector, "model", None), "ckpt", None)
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if isinstance(meta, dict):
        spec = ModelSpec.from_dict({**meta, "path": str(detector.spec.path)})
        detector.spec = dataclasses.replace(spec, sha256=detector.spec.sha256)
    return detector


_CACHE: dict[tuple, Detector] = {}
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def _cached_detector(spec: ModelSpec, device: str | None, backend: str) -> Detector:
    """Load once per (weights, file version, device, backend); keeps the last few models."""
    key = (str(spec.path), _fingerprint(spec), device, backend)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    detector = make_detector(spec, backend=backend, device=device)
    has_sidecar = spec.path is not None and sidecar_path(spec.path).exists()
    if spec.sha256 is None and not has_sidecar:
        detector = _with_checkpoint_metadata(detector)
    with _CACHE_LOCK:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = detector
    return detector


def clear_cache() -> None:
    """Forget loaded models (frees their memory once no one else holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _fingerprint(spec: ModelSpec) -> str:
    """Cache key part that changes when the weights file changes."""
    if spec.sha256:
        return spec.sha256
    if spec.path is not None and spec.path.is_file():
        stat = spec.path.stat()
        return f"{spec.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return str(spec.path)


def load_detector(
    name_or_path: str | Path | ModelSpec, device: str | None = None, backend: str = "torch"
) -> Detector:
    """Resolve, verify and load a model, ready for :func:`napari_yolocell.detect.detect_image`.

    Neural-network detectors are cached (same weights, device and backend -> same object);
    the classical detector is created fresh (it keeps a per-plane threshold).

    Parameters
    ----------
    name_or_path : str, Path or ModelSpec
        See :func:`resolve_model`.
    device : str, optional
        ``"cpu"``, ``"cuda:0"``...; default CUDA if available.
    backend : str
        Forward-pass backend (``"torch"``).

    Raises
    ------
    FileNotFoundError
        Missing weights file (the message names it).
    ValueError
        Unknown model, SHA-256 mismatch, or unreadable / corrupt weights (names the file).
    """
    spec = resolve_model(name_or_path)
    if spec.family == "classical":
        return make_detector(spec, backend=backend, device=device)
    if spec.sha256:
        verify_sha256(spec.path, spec.sha256)
    spec = unpack_weights(spec)
    return _cached_detector(spec, device, backend)


def unpack_weights(spec: ModelSpec, root: Path | None = None) -> ModelSpec:
    """For ``.xz`` weights: the same spec pointing at the unpacked ``.pt`` in the user cache.

    Unpacks once (to a temporary name, then renamed into place) and verifies
    ``spec.unpacked_sha256`` before every use, so a damaged cache file is replaced, never loaded.
    Other specs are returned unchanged.
    """
    if spec.path is None or Path(spec.path).suffix.lower() != ".xz":
        return spec
    from napari_yolocell.export_cache import cache_root

    folder = (root or cache_root()) / "unpacked-weights"
    folder.mkdir(parents=True, exist_ok=True)
    key = spec.unpacked_sha256 or spec.sha256 or file_sha256(spec.path)
    target = folder / f"{Path(spec.path).stem.removesuffix('.pt')}-{key[:16]}.pt"
    if target.is_file() and spec.unpacked_sha256:
        if file_sha256(target) != spec.unpacked_sha256.lower():
            target.unlink()
    if not target.is_file():
        tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with lzma.open(spec.path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (lzma.LZMAError, EOFError) as err:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"cannot unpack model weights {str(spec.path)!r}: {err}") from err
        if spec.unpacked_sha256:
            try:
                verify_sha256(tmp, spec.unpacked_sha256)
            except ValueError:
                tmp.unlink(missing_ok=True)
                raise
        os.replace(tmp, target)
    return dataclasses.replace(spec, path=target)
