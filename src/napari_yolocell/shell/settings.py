"""Remember a widget's settings between napari sessions (one small JSON file per widget).

Stored in the per-user settings folder of :func:`~napari_yolocell.models.safety.config_dir`
(``$YOLOCELL_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/napari-yolocell``, else
``~/.config/napari-yolocell``), under ``widgets/<name>.json``. A value that no longer fits (a
model that is gone, a renamed choice) is skipped; an unreadable file is ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from napari_yolocell.io.tables import write_text_atomic
from napari_yolocell.models.safety import config_dir

__all__ = ["load_settings", "persist", "save_settings", "settings_path"]

log = logging.getLogger(__name__)


def settings_path(name: str) -> Path:
    """The settings file of widget ``name``."""
    return config_dir() / "widgets" / f"{name}.json"


def load_settings(name: str) -> dict[str, Any]:
    """The saved settings of widget ``name`` (empty when none or unreadable)."""
    try:
        data = json.loads(settings_path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_settings(name: str, values: Mapping[str, Any]) -> None:
    """Write the settings of widget ``name`` (a failure is logged, never shown: not vital)."""
    path = settings_path(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(values, indent=1, default=str))
    except OSError as exc:
        log.warning("cannot save the widget settings to %s: %s", path, exc)


def persist(name: str, widgets: Mapping[str, Any]) -> None:
    """Restore ``widgets`` (key -> magicgui value widget) from the file, then save on change.

    Restored in the order given (a model before the confidence it sets, say).
    """
    saved = load_settings(name)
    for key, widget in widgets.items():
        if key in saved:
            try:
                widget.value = saved[key]
            except (ValueError, TypeError, KeyError):  # gone from the choices, out of range
                log.debug("setting %s.%s=%r not restored", name, key, saved[key])

    def save(_value: Any = None) -> None:
        values = {}
        for key, widget in widgets.items():
            value = widget.value
            values[key] = str(value) if isinstance(value, Path) else value
        save_settings(name, values)

    for widget in widgets.values():
        widget.changed.connect(save)
