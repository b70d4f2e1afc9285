"""Tooltips of the widgets' controls, in a biologist's words.

Detection parameters start with the engine's own help
(:func:`~napari_yolocell.engine.detect.param_help`, also the command line's ``--help``), so the
two never disagree; the second sentence says when to change the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from napari_yolocell.engine.detect import param_help

__all__ = ["TOOLTIPS", "apply_tooltips"]


def _param(name: str, advice: str) -> str:
    text = param_help(name)
    return f"{text[:1].upper()}{text[1:]}. {advice}"


#: attribute name of a control -> tooltip (shared by the Detect and Train widgets).
TOOLTIPS: dict[str, str] = {
    "level": _param(
        "level",
        "Big slides are stored at several zoom levels; a coarser level (1, 2...) is faster "
        "but misses small nuclei. Results are always in full-resolution pixels.",
    ),
    "current_plane": "Z-stacks and time series: count only the plane shown instead of all.",
    "backend": "The software that runs the network. 'auto' picks the fastest one installed; "
    "change it only if a run fails or to compare speeds. Counts are the same.",
    "conf": "How sure the model must be that a spot is a nucleus. Lower: more nuclei found, "
    "more false ones. Moving it after a run re-filters at once (no re-run); use "
    "'Calibrate confidence' to set it from a known count.",
    "iou": _param(
        "iou",
        "How much two boxes may overlap and still count as two nuclei (IoU = intersection "
        "over union). Raise it for tightly packed nuclei counted as one; lower it when one "
        "nucleus gets two boxes.",
    ),
    "tile": _param(
        "tile",
        "Large images are cut into square tiles of this side for the network. Keep the "
        "default unless memory runs out (smaller) or a GPU is idle (larger).",
    ),
    "overlap": _param(
        "overlap",
        "Neighbouring tiles share this margin so nuclei cut by a tile edge are seen whole. "
        "0 = derived from the nucleus size (recommended).",
    ),
    "diameter": "Typical nucleus diameter in full-resolution pixels. 0 = measured on the "
    "image. Give it when nuclei are much larger or smaller than usual (strong zoom, "
    "binning): tiles are then rescaled to what the model was trained on.",
    "normalize": _param(
        "normalize",
        "How pixel brightness is rescaled before detection. Keep 'model default'; "
        "'percentile' helps very dim or very bright images.",
    ),
    "roi": "A Shapes layer whose rectangles / polygons / ellipses are regions to count in. "
    "The table follows the shapes as you draw, move, delete or rename them.",
    "roi_name": "Name for the selected ROI(s), used in the table and the CSV files.",
    "model_file": "A trained model file (.pt). It is checked at once and, when readable, "
    "selected in the list above.",
    "known_count": "Number of nuclei you counted by eye in the image (or in the ROI, when one "
    "is set): the confidence is chosen to match it.",
    "clicked": "A Points layer in which you clicked every nucleus of the ROI: the confidence "
    "that best matches your clicks is chosen.",
    # Train widget
    "ex_diameter": "Points only: the box drawn around each clicked centre; about the nucleus "
    "diameter in pixels.",
    "ex_region": "A Shapes layer of rectangles around the parts you annotated completely. Only "
    "the image inside them is exported (each rectangle as its own training image), so the "
    "nuclei you did not annotate elsewhere are not taught as background.",
    "ex_tile": "Side of the training images cut from your image (px); the model is trained "
    "at this size.",
    "ex_overlap": "Margin shared by neighbouring training images (px).",
    "ex_val": "Share of the images kept aside to check the model during training. 0 means the "
    "model is checked on its own training images (scores look too good).",
    "ex_test": "Share kept aside for a final, independent check (Evaluate tab).",
    "tr_patience": "Stop early when the validation score has not improved for this many "
    "epochs (0 = never).",
    "tr_imgsz": "Size the training images are resized to; use the export's tile size.",
    "tr_epochs": "Passes over the training images. More takes longer and helps up to a point.",
}


def apply_tooltips(owner: Any, names: Mapping[str, str] | None = None) -> None:
    """Set the tooltip of each control of ``owner`` named in :data:`TOOLTIPS` (or ``names``)."""
    for attr, text in (names or TOOLTIPS).items():
        widget = getattr(owner, attr, None)
        if widget is not None and hasattr(widget, "tooltip"):
            widget.tooltip = text
