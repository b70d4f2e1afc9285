"""The bundled models and how a model name, alias, YAML or weights path becomes a spec.

A model is named in one of these ways (see :func:`resolve_model`):

- a bundled model name or alias from ``models/weights/registry.json`` (``"default"``, ``"v5"``,
  ``"v6"``...); bundled weights sit next to the registry and are SHA-256 checked;
- ``"classical"``: the Otsu + watershed baseline (no weights);
- an ultralytics architecture YAML shipped with ultralytics (``"yolov5n.yaml"``,
  ``"yolov6n.yaml"``): an untrained network, for tests and benchmarks;
- a path to any ultralytics detection checkpoint (``.pt``). Our settings for it (normalisation,
  nucleus diameter...) are read from a sidecar ``<weights>.yolocell.json`` written by training,
  or from a ``"yolocell"`` entry in the checkpoint; without either, percentile normalisation
  and the default settings are assumed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from napari_yolocell.models.spec import CLASSICAL, SIDECAR_SUFFIX, ModelSpec, sidecar_path

REGISTRY_DIR = Path(__file__).parent / "weights"
REGISTRY_FILE = REGISTRY_DIR / "registry.json"


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
            "no bundled model is installed (models/weights/registry.json is empty); use "
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
    if path.suffix.lower() in (".pt", ".pth", ".onnx") or path.parent != Path(".") or path.is_dir():
        if not (path.is_file() or (path / "model.xml").is_file()):
            raise FileNotFoundError(f"model weights file not found: {str(path)!r}")
        return _spec_for_weights(path)
    known = [m.name for m in list_models()] + ["default", "yolov5n.yaml", "yolov6n.yaml"]
    raise ValueError(f"unknown model {name!r}; use a weights path (.pt) or one of {known}")
