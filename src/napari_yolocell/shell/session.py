"""Models of this napari session, shared by every open widget.

The Train widget registers the ``best.pt`` of a finished run, the Detect widget a ``.pt`` the
user picks; every widget that lists models (anything with ``refresh_models()``, registered
with :func:`watch_models`) is told, so the new model shows up everywhere at once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_yolocell.models.backends import LAYOUT_LABELS
from napari_yolocell.models.registry import list_models, resolve_model

__all__ = [
    "forget_session_model",
    "model_choices",
    "model_label",
    "register_session_model",
    "session_models",
    "watch_models",
]

log = logging.getLogger(__name__)

_MODELS: list[str] = []
# What each session model is ("YOLOv5 (ultralytics/yolov5)"...), read once when it is added.
_FAMILIES: dict[str, str] = {}
# Open widgets that list models, told about new ones; closed docks drop out on their own.
_WATCHERS: weakref.WeakSet[Any] = weakref.WeakSet()


def session_models() -> list[str]:
    """Weights files added in this session (trained or picked), oldest first."""
    return list(_MODELS)


#: An export's output layout (``models.backends.LAYOUT_LABELS``) as a user names the model.
_EXPORT_NAMES = {
    LAYOUT_LABELS["xywh-cls"]: "YOLOv5u/6/8 (ultralytics)",
    LAYOUT_LABELS["xywh-obj-cls"]: "YOLOv5/6",
    LAYOUT_LABELS["xyxy-score-cls"]: "YOLO (boxes after NMS)",
}
_EXPORTED = "exported model: "


def user_family(family: str, path: str | Path) -> str:
    """``family`` (:func:`~napari_yolocell.models.loading.describe_model`) in a user's words:
    an export reads ``YOLOv5/6 ONNX export`` instead of its tensor layout."""
    if not family.startswith(_EXPORTED):
        return family
    layout = family[len(_EXPORTED) :]
    kind = "ONNX" if Path(path).suffix.lower() == ".onnx" else "OpenVINO"
    return f"{_EXPORT_NAMES.get(layout, 'YOLO')} {kind} export"


def model_label(path: str | Path) -> str:
    """How a session model is listed: its file and own folder (``dapi_v5.pt in
    nuclephaser_dapi_v5``; a run's ``best.pt in yolov5n/weights``) and, when known, its
    family in a user's words (:func:`user_family`)."""
    p = Path(path)
    folder = p.parent.name
    if folder == "weights" and p.parent.parent.name:  # a training run: name the run too
        folder = f"{p.parent.parent.name}/{folder}"
    family = _FAMILIES.get(str(path))
    label = f"{p.name} in {folder}" if folder else p.name
    return label + (f" ({user_family(family, p)})" if family else "")


def model_choices(untrained: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``(label, value)`` model choices: the registry (default first), then ``untrained``
    architecture YAMLs, then the session's models.

    A registry that cannot be read is logged and leaves the classical detector, so a broken
    ``models.yaml`` never breaks a widget.
    """
    try:
        specs = list_models()
    except Exception as exc:  # noqa: BLE001 - a broken registry must not break the widget
        log.warning("cannot read the model registry: %s", exc)
        specs = [resolve_model("classical")]
    specs = sorted(specs, key=lambda s: not s.default)  # the default model first
    choices = [
        (s.name if s.family == "classical" else f"{s.name} ({s.family})", s.name) for s in specs
    ]
    choices += [(f"{name} (untrained)", name) for name in untrained]
    return choices + [(model_label(p), p) for p in _MODELS]


def watch_models(widget: Any) -> None:
    """Call ``widget.refresh_models()`` whenever a model is added (weakly referenced)."""
    _WATCHERS.add(widget)


def register_session_model(path: str | Path, family: str = "") -> str:
    """Add a weights file to the session's models and refresh every watching widget.

    Call from the GUI thread (the Train widget does, when a run ends). ``family`` is shown
    beside its name (:func:`napari_yolocell.models.loading.describe_model`).

    Returns
    -------
    str
        The absolute path as it appears in the model choices.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    """
    path = Path(path).expanduser()
    if not (path.is_file() or (path / "model.xml").is_file()):  # weights, ONNX or an IR folder
        raise FileNotFoundError(f"model weights file not found: {str(path)!r}")
    key = str(path.resolve())
    if key not in _MODELS:
        _MODELS.append(key)
    if family:
        _FAMILIES[key] = family
    _notify()
    return key


def forget_session_model(path: str | Path) -> None:
    """Remove a model from the session's list (if there) and refresh the watching widgets."""
    key = str(Path(path).expanduser().resolve())
    if key in _MODELS:
        _MODELS.remove(key)
        _notify()


def _notify() -> None:
    for widget in list(_WATCHERS):
        try:
            widget.refresh_models()
        except RuntimeError:  # its Qt side was deleted (dock closed): forget it
            _WATCHERS.discard(widget)
