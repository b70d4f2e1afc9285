"""Follow an ROI Shapes layer: counts refresh when ROIs are added, moved, deleted or renamed.

The widget keeps one :class:`RoiWatcher`; :meth:`RoiWatcher.watch` moves it to the ROI layer
chosen in the widget. ROIs are named by the layer's ``name`` feature (shown as the shapes'
text): missing, blank or repeated names are filled with ``roi_<i>``
(:func:`~napari_yolocell.io.tables.unique_roi_names`), so a name never changes once shown, and
a deleted ROI's name is never given to a new one (names stay unique for the whole session, so
CSVs written at two moments never call two regions the same).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from napari_yolocell.io.tables import roi_name, unique_roi_names

__all__ = ["RoiWatcher", "name_rois", "rename_selected"]

# Mid-edit actions: a drag emits many "changing" events; counting waits for "changed".
_PENDING = ("adding", "changing", "removing")
#: Layer metadata key: every name the layer's ROIs ever had (deleted ones included).
USED_KEY = "yolocell_roi_names_used"


def _fresh_names(old: list[Any], used: set[str]) -> list[str]:
    """:func:`unique_roi_names`, with generated names skipping those of deleted ROIs."""
    names = unique_roi_names(old)
    given = {str(n).strip() for n in old if isinstance(n, str)}
    taken = set(names)
    for i, (before, name) in enumerate(zip(old, names, strict=True)):
        if name == before or name not in used - given:
            continue
        k = i
        while roi_name(k) in used or roi_name(k) in taken:
            k += 1
        names[i] = roi_name(k)
        taken.add(names[i])
    return names


def name_rois(layer: Any) -> bool:
    """Give every shape of ``layer`` a unique ``name`` feature shown as text; True if changed."""
    features = layer.features
    old = features["name"].tolist() if "name" in features else [None] * len(layer.data)
    used = set(layer.metadata.get(USED_KEY, ()))
    names = _fresh_names(old, used)
    layer.metadata[USED_KEY] = sorted(used | set(names))
    changed = names != old or "name" not in features
    if changed:
        features = features.copy()
        features["name"] = pd.Series(names, index=features.index, dtype=object)
        layer.features = features
    if layer.feature_defaults.get("name", pd.Series([None])).iloc[0] != "":
        # a new shape would copy the last name (or NaN, which the text cannot show)
        layer.feature_defaults = {**layer.feature_defaults.iloc[0].to_dict(), "name": ""}
    if getattr(layer.text.string, "format", None) != "{name}":  # show the names on the canvas
        layer.text = {"string": "{name}", "color": "yellow", "size": 10, "anchor": "upper_left"}
    return changed


def rename_selected(layer: Any, name: str) -> int:
    """Rename the selected shapes of ``layer`` (several: ``name_1``, ``name_2``...)."""
    name = name.strip()
    selected = sorted(layer.selected_data)
    if not name or not selected:
        return 0
    features = layer.features.copy()
    if "name" not in features:
        features["name"] = [None] * len(layer.data)
    features["name"] = features["name"].astype(object)
    for k, i in enumerate(selected):
        features.loc[features.index[i], "name"] = name if len(selected) == 1 else f"{name}_{k + 1}"
    others = [n for j, n in enumerate(features["name"]) if j not in selected]
    if name in others:
        raise ValueError(f"an ROI is already named {name!r}")
    layer.features = features
    return len(selected)


class RoiWatcher:
    """Calls ``on_change()`` whenever the watched ROI layer's shapes or names change.

    Parameters
    ----------
    on_change : callable
        Called without arguments after an ROI was added, moved, deleted or renamed, and
        when another layer is watched.
    """

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.layer: Any = None

    def watch(self, layer: Any) -> None:
        """Follow ``layer`` (None: none) instead of the previous one."""
        if layer is self.layer:
            return
        if self.layer is not None:
            self.layer.events.data.disconnect(self._on_data)
            self.layer.events.features.disconnect(self._on_features)
        self.layer = layer
        if layer is not None:
            name_rois(layer)
            layer.events.data.connect(self._on_data)
            layer.events.features.connect(self._on_features)
        self.on_change()

    def _on_data(self, event: Any) -> None:
        action = str(getattr(getattr(event, "action", None), "value", ""))
        if action in _PENDING:
            return
        if action == "added":
            name_rois(self.layer)  # new shapes copy the last name: give them their own
        self.on_change()

    def _on_features(self, _event: Any = None) -> None:
        if self.layer is not None and len(self.layer.features) == len(self.layer.data):
            self.on_change()
