"""napari dock widget: detect and count nuclei in an image layer (the thin shell).

The widget only gathers parameters, starts a task and turns results into layers:

- :func:`run_detection` is what the task runs (load the model, then
  :func:`~napari_yolocell.engine.detect.detect_image`), through the shared
  :mod:`~napari_yolocell.shell._worker` (progress, Cancel, one outcome);
- :meth:`DetectWidget.results_to_layers` returns LayerDataTuples built by
  :func:`~napari_yolocell.shell.layers.detections_to_layers` (testable without a viewer);
- counting, ROI counts, CSV export and calibration reuse the table kept from the last run, so
  moving the confidence slider or calibrating never re-runs the model;
- the user's edits of the result layers (deleted, added or moved boxes and points) are folded
  into that table (:func:`~napari_yolocell.shell.layers.apply_layer_edits`), so the slider
  filters the edited set and the count, layer names and every export follow the edits; a
  re-run keeps an edited result as plain layers;
- results above :data:`~napari_yolocell.shell.layers.LARGE_RESULT` nuclei draw boxes only for the
  visible region (:meth:`DetectWidget.show_boxes_in_view`); the points always hold all;
- the widget has two tabs: *Image* (this module) and *Batch*
  (:class:`~napari_yolocell.shell.batch_widget.BatchPanel`, a folder of files -> CSVs), which
  gets its model and settings from :meth:`DetectWidget.batch_settings`.

Models trained or picked in this session are listed through
:mod:`~napari_yolocell.shell.session`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
    Table,
)

from napari_yolocell.analysis.calibrate import Calibration, calibrate_in_rois
from napari_yolocell.analysis.roi import counts_table
from napari_yolocell.engine.detect import (
    DetectParams,
    counted,
    detect_image,
    param_help,
    plane_windows,
    unlabelled_axis,
)
from napari_yolocell.io.coords import to_table_coords
from napari_yolocell.io.geojson import detections_to_geojson, write_geojson
from napari_yolocell.io.tables import (
    COUNT_COLUMNS,
    DETECTION_COLUMNS,
    WHOLE_IMAGE_ROI,
    detections_csv_table,
    write_csv_atomic,
)
from napari_yolocell.models.detector import BACKEND_CHOICES
from napari_yolocell.models.loading import describe_model, load_detector
from napari_yolocell.models.registry import resolve_model
from napari_yolocell.shell import _qt, session
from napari_yolocell.shell._worker import OneTaskAtATime, Outcome, Progress, Task, start
from napari_yolocell.shell.batch_widget import BatchPanel, DetectSettings
from napari_yolocell.shell.first_use_int8 import INT8_STEP, QUANTIZE_TIP, quantize_first
from napari_yolocell.shell.help import apply_tooltips
from napari_yolocell.shell.layers import (
    BOXES_KEY,
    DRAWN_KEY,
    ID,
    KIND_KEY,
    LARGE_RESULT,
    MAX_BOXES_IN_VIEW,
    SOURCE_KEY,
    LayerDataTuple,
    apply_layer_edits,
    detections_to_layers,
    edits_summary,
    filter_detections,
    points_to_table,
    roi_polygons,
    set_layer_features,
    update_result_layers,
)
from napari_yolocell.shell.measure_panel import MarkerPanel
from napari_yolocell.shell.progress_row import ProgressRow
from napari_yolocell.shell.roi_watch import RoiWatcher, rename_selected
from napari_yolocell.shell.settings import persist
from napari_yolocell.shell.view_follow import ViewFollower

if TYPE_CHECKING:
    import napari

__all__ = ["LOW_CONF", "DetectWidget", "run_detection"]

#: Runs use at most this confidence, so the slider and calibration can go down to it later
#: without re-running (the calibration grid starts at 0.05 too).
LOW_CONF = 0.05
UNTRAINED = ("yolov5n.yaml", "yolov6n.yaml")
#: Data events of a result layer that end a user's edit (the "-ing" ones announce it).
EDIT_DONE = ("added", "removed", "changed")
#: The ROI table: the counts CSV's columns without the image's name.
ROI_COLUMNS = [c for c in COUNT_COLUMNS if c != "image"]


#: Detection defaults (one source with the CLI: :class:`DetectParams`).
DEFAULTS = DetectParams()
#: Channel choices of an unlabelled first axis besides a channel number.
ASK, PLANES = "ask", "planes"
#: Layer metadata key of the user's answer for an unlabelled first axis (asked once per layer).
AXIS_KEY = "yolocell_first_axis"


#: Tooltips of the pyramid-level diameter and the size filter (help text from DetectParams).
_LEVEL_AND_SIZE_TIPS = {
    "diameter": "Typical nucleus diameter, 0 = measured on the image. Counted in the pixels "
    "'diameter in px of' names: full resolution (level 0) by default, also when a coarser "
    "level is analysed.",
    "diameter_pixels": param_help("diameter_pixels").capitalize() + ".",
    "min_relative_area": param_help("min_relative_area").capitalize() + ".",
}


def _layer_axes(layer: Any) -> str:
    """tifffile axis codes of ``layer``'s data: the reader's, else unlabelled (``Q``) + YX."""
    ndim = len((layer.data[0] if layer.multiscale else layer.data).shape)
    axes = str(layer.metadata.get("axes") or "")
    if len(axes) == ndim:
        return axes
    spatial = "YXS" if layer.rgb else "YX"
    return "Q" * (ndim - len(spatial)) + spatial


def _ambiguous_length(layer: Any) -> int:
    """Length of ``layer``'s unlabelled first axis of 2-4 (channels or planes?), else 0."""
    if layer is None:
        return 0
    full = layer.data[0] if layer.multiscale else layer.data
    axis = unlabelled_axis(full.shape, _layer_axes(layer), None, bool(layer.rgb))
    return 0 if axis is None else int(full.shape[axis])


@dataclass
class _Job:
    """One run's settings, captured when Run is pressed (plain values for the worker)."""

    source: str
    image: Any
    model: str
    backend: str
    params: DetectParams
    rgb: bool
    planes: list[int] | None
    axes: str | None
    scale: list[float]
    translate: list[float]
    plane_shape: tuple[int, ...]
    quantize: bool = True


@dataclass
class _Result:
    """The low-threshold table of one image and what is needed to draw it."""

    source: str
    df: pd.DataFrame
    model: str
    run_conf: float
    scale: list[float] | None
    translate: list[float] | None
    plane_shape: tuple[int, ...]
    n_planes: int = 1


def run_detection(job: _Job, report: Callable[..., None], cancel: threading.Event) -> pd.DataFrame:
    """Load the job's model and detect (the worker thread's part of a run).

    With ``job.quantize``, a model without an INT8 version gets one first, calibrated on the
    planes about to be detected (:func:`~napari_yolocell.shell.first_use_int8.quantize_first`).
    """
    if job.quantize:
        images = partial(
            plane_windows, job.image, job.params, rgb=job.rgb, planes=job.planes, axes=job.axes
        )
        quantize_first(job.model, job.backend, images, report, cancel)
    detector = load_detector(job.model, backend=job.backend)
    return detect_image(
        job.image,
        detector,
        job.params,
        rgb=job.rgb,
        planes=job.planes,
        progress=report,
        cancel=cancel,
        axes=job.axes,
    )


def _level_text(attrs: dict) -> str:
    """Which pyramid level a run analysed, for the count label (nothing for level 0)."""
    level = int(attrs.get("level", 0) or 0)
    if not level:
        return ""
    return f" on level {level} (1/{attrs.get('level_factor', 1.0):.3g} resolution)"


class DetectWidget(OneTaskAtATime, Container):
    """Detect, count and export nuclei of an image layer.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        # labels=False: the two tabs' containers hold the labelled controls. Not scrollable
        # here: each tab scrolls (see add_tabs), so the tab bar stays in sight.
        super().__init__(labels=False)
        self.viewer = napari_viewer
        self._results: dict[str, _Result] = {}
        self._active: str | None = None
        self._calibrated: dict[str, float] = {}
        self.task: Task | None = None
        self._calibrate_after_run = False
        self._run_again = False
        self._updating = False  # set while the widget itself redraws result layers
        self.last_calibration: Calibration | None = None

        # --- input
        self.image = ComboBox(label="image", choices=lambda _w: _qt.layers_of(self.viewer, "image"))
        self.level = ComboBox(label="level", choices=self._level_choices)
        self.current_plane = CheckBox(text="current plane only", value=False)
        self.channel = ComboBox(
            label="channel",
            choices=self._channel_choices,
            tooltip="RGB images: colour channel holding the nuclei; an unlabelled first axis "
            "of 2-4 (plain multi-page TIFF): the nuclear stain's channel, or planes",
        )
        # --- model
        self.model = ComboBox(
            label="model", choices=lambda _w: session.model_choices(untrained=UNTRAINED)
        )
        self.model_file = FileEdit(label="add .pt", mode="r", filter="*.pt *.pth *.onnx model.xml")
        self.add_model_button = PushButton(text="Add", tooltip="add the model file typed above")
        self._model_typed = False  # typed text is checked on Enter / focus-out / Add only
        self.backend = ComboBox(
            label="runtime",
            value="auto",
            choices=[BACKEND_CHOICES[0], *reversed(BACKEND_CHOICES[1:])],  # auto, fastest first
        )
        self.quantize = CheckBox(text="INT8 on first use (CPU)", value=True, tooltip=QUANTIZE_TIP)
        # --- parameters
        self.conf = FloatSlider(label="confidence", value=0.25, min=0.0, max=1.0, step=0.01)
        self.legend = _qt.colour_legend("turbo", "box colour: confidence 0", "1")
        self.iou = FloatSpinBox(
            label="IoU (NMS)", value=DEFAULTS.iou, min=0.05, max=0.95, step=0.05
        )
        self.tile = SpinBox(label="tile", value=DEFAULTS.tile, min=64, max=8192, step=32)
        self.overlap = SpinBox(label="overlap (0 = auto)", value=0, min=0, max=4096)
        self.diameter = FloatSpinBox(
            label="diameter px (0 = auto)", value=0.0, min=0.0, max=2000.0, step=1.0
        )
        self.diameter_pixels = ComboBox(
            label="diameter in px of",
            value=DEFAULTS.diameter_pixels,
            choices=[("full resolution (level 0)", "full"), ("the analysed level", "level")],
        )
        self.min_relative_area = FloatSpinBox(
            label="min relative area",
            value=DEFAULTS.min_relative_area,
            min=0.0,
            max=1.0,
            step=0.05,
        )
        self.normalize = ComboBox(
            label="normalisation",
            choices=[("model default", None), ("percentile", "percentile"), ("none", "none")],
        )
        self.advanced_toggle = CheckBox(text="show advanced settings", value=False)
        self.roi = ComboBox(
            label="ROI (Shapes)",
            choices=lambda _w: _qt.layers_of(self.viewer, "shapes", results=False),
            nullable=True,
        )
        self.roi_name = LineEdit(label="ROI name", value="")
        self.rename_button = PushButton(text="Rename selected ROI")
        # --- run
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressRow("tiles")
        self.count_label = Label(value="no detections yet")
        self.boxes_button = PushButton(
            text="Show boxes in view",
            visible=False,
            tooltip=f"results above {LARGE_RESULT:,} nuclei draw boxes only for the visible "
            f"region (at most {MAX_BOXES_IN_VIEW:,}); they follow the view when you stop "
            "panning or zooming, or when you press this",
        )
        self.roi_table = Table(value={c: [] for c in ROI_COLUMNS}, visible=False)
        self.export_detections_button = PushButton(text="Export detections CSV...")
        self.export_counts_button = PushButton(text="Export counts CSV...")
        self.export_geojson_button = PushButton(
            text="Export GeoJSON...",
            tooltip="nuclei (and ROIs as annotations) for QuPath: File > Import objects",
        )
        # --- calibrate
        self.known_count = SpinBox(label="known count", value=0, min=0, max=10_000_000)
        self.clicked = ComboBox(
            label="or clicked nuclei",
            choices=lambda _w: _qt.layers_of(self.viewer, "points", results=False),
            nullable=True,
        )
        self.calibrate_button = PushButton(text="Calibrate confidence")
        self.calibration_label = Label(value="")
        self.marker_panel = MarkerPanel(self)
        apply_tooltips(self)
        apply_tooltips(self, _LEVEL_AND_SIZE_TIPS)

        def row(*widgets):
            return Container(widgets=list(widgets), layout="horizontal", labels=False)

        def full_width(*widgets):
            return Container(widgets=list(widgets), labels=False)

        self.advanced = Container(
            widgets=[
                self.level,
                self.current_plane,
                self.backend,
                self.quantize,
                self.iou,
                self.tile,
                self.overlap,
                self.diameter,
                self.diameter_pixels,
                self.normalize,
            ],
            visible=False,
        )
        self.single = Container(
            widgets=[
                self.image,
                self.channel,
                self.model,
                self.model_file,
                self.add_model_button,
                self.conf,
                self.min_relative_area,
                full_width(self.legend, self.advanced_toggle),
                self.advanced,
                self.roi,
                self.roi_name,
                full_width(
                    self.rename_button,
                    row(self.run_button, self.cancel_button),
                    self.progress,
                    self.count_label,
                    self.boxes_button,
                    self.roi_table,
                    row(self.export_detections_button, self.export_counts_button),
                    self.export_geojson_button,
                ),
                self.marker_panel,
                full_width(_qt.heading("Calibrate confidence")),
                self.known_count,
                self.clicked,
                full_width(self.calibrate_button, self.calibration_label),
            ]
        )
        self.batch = BatchPanel(self.batch_settings)
        self.tabs = _qt.add_tabs(self, [("Image", self.single), ("Batch", self.batch)])
        self.roi_table.native.setMaximumHeight(140)

        _qt.wrap_labels(self.count_label, self.calibration_label)
        self.rois = RoiWatcher(self._refresh_counts)
        self.follower = ViewFollower(self.viewer, self._follow_view)
        self._boxes_view: tuple[float, ...] | None = None
        self.image.changed.connect(self._on_image_changed)
        self.model.changed.connect(self._on_model_changed)
        self.model_file.changed.connect(self._on_model_file)
        edit = self.model_file.line_edit.native
        edit.textEdited.connect(self._on_model_typed)
        edit.editingFinished.connect(self._on_model_entered)
        self.add_model_button.changed.connect(self._on_add_model)
        self.conf.changed.connect(self._apply_conf)
        self.roi.changed.connect(lambda _v: self.rois.watch(self.roi.value))
        self.rename_button.changed.connect(self._on_rename)
        self.advanced_toggle.changed.connect(lambda v: setattr(self.advanced, "visible", v))
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.boxes_button.changed.connect(self.show_boxes_in_view)
        for button, export, what, kind in (
            (self.export_detections_button, self.export_detections, "detections", "csv"),
            (self.export_counts_button, self.export_counts, "counts", "csv"),
            (self.export_geojson_button, self.export_geojson, "nuclei", "geojson"),
        ):
            button.changed.connect(partial(self._export_dialog, export, what, kind))
        self.calibrate_button.changed.connect(self._on_calibrate_clicked)
        for event in ("inserted", "removed", "reordered"):
            getattr(self.viewer.layers.events, event).connect(lambda _e: self.reset_choices())
        session.watch_models(self)
        self._on_image_changed()
        self._on_model_changed()
        persist(
            "detect",
            {
                "model": self.model,
                "backend": self.backend,
                "quantize": self.quantize,
                "iou": self.iou,
                "tile": self.tile,
                "overlap": self.overlap,
                "diameter": self.diameter,
                "diameter_pixels": self.diameter_pixels,
                "min_relative_area": self.min_relative_area,
                "normalize": self.normalize,
                "advanced": self.advanced_toggle,
            },
        )

    # ------------------------------------------------------------------ choices

    def _level_choices(self, _widget=None) -> list[tuple[str, int]]:
        layer = self.image.value if hasattr(self, "image") else None
        if layer is None or not layer.multiscale:
            return [("0 (full resolution)", 0)]
        return [
            (f"{i}: {' x '.join(str(n) for n in level.shape)}", i)
            for i, level in enumerate(layer.data)
        ]

    def _channel_choices(self, _widget=None) -> list[tuple[str, Any]]:
        layer = self.image.value if hasattr(self, "image") else None
        if layer is not None and layer.rgb:
            return [("max of colours", None), ("red (0)", 0), ("green (1)", 1), ("blue (2)", 2)]
        n = _ambiguous_length(layer)
        if not n:
            return [("(no channels)", None)]
        return [
            ("ask when run", ASK),
            ("planes (Z, T...)", PLANES),
            *((f"channel {c}", c) for c in range(n)),
        ]

    def refresh_models(self) -> None:
        """Re-read the registry and session models into the model list (keeps the selection)."""
        self.model.reset_choices()

    def add_model(self, path: str | Path, select: bool = True, family: str = "") -> str:
        """Add a model file (``.pt``, ``.onnx``, OpenVINO folder) to the model list of every
        Detect widget, shown with its ``family``; optionally select it.

        Raises
        ------
        FileNotFoundError
            If the file does not exist.
        """
        key = session.register_session_model(path, family)
        if select:
            self.model.value = key
        return key

    def _on_image_changed(self, _value=None) -> None:
        layer = self.image.value
        self.level.reset_choices()
        self.channel.reset_choices()
        self.channel.enabled = bool(layer is not None and (layer.rgb or _ambiguous_length(layer)))
        if _ambiguous_length(layer):  # this layer's answer, asked once
            self.channel.value = layer.metadata.get(AXIS_KEY, ASK)
        self.current_plane.enabled = bool(layer is not None and layer.ndim > 2)
        if layer is not None and layer.name in self._results:
            self._active = layer.name
            self._refresh_counts()

    def _on_model_changed(self, _value=None) -> None:
        name = self.model.value
        self._show_model_file()
        if name is None:
            return
        if name in self._calibrated:
            self.conf.value = self._calibrated[name]
            return
        try:
            self.conf.value = float(resolve_model(name).default_conf)
        except (FileNotFoundError, ValueError):
            pass  # reported when the user runs it

    def _on_model_typed(self, _text: str = "") -> None:
        self._model_typed = True

    def _on_model_entered(self) -> None:
        """Enter or focus-out after typing: check the typed path once."""
        if self._model_typed:
            self._model_typed = False
            self._check_model_file(self.model_file.line_edit.value)

    def _on_add_model(self, _value=None) -> None:
        self._model_typed = False
        self._check_model_file(self.model_file.line_edit.value)

    def _on_model_file(self, value) -> None:
        """The field changed: a file picked (or set by code) is checked now; a keystroke is no
        path yet, checked on Enter / focus-out / Add (one check, one message per entry)."""
        if self._model_typed or self.model_file.line_edit.native.hasFocus():
            self._model_typed = True
            return
        self._check_model_file(value)

    def _check_model_file(self, value) -> None:
        if not value or str(value).strip() in ("", "."):
            return
        path = Path(value).expanduser()
        if path.name == "model.xml":  # an OpenVINO export is its folder
            path = path.parent
        elif path.is_dir():  # an emptied field reads as the working folder
            return
        try:
            if not (path.is_file() or (path / "model.xml").is_file()):
                raise FileNotFoundError(f"model file not found: {path}")
            # reads the pickle's names only (a corrupt or foreign file fails here, briefly)
            self.add_model(path, family=describe_model(path))
        except (OSError, ValueError) as exc:
            _qt.show_error(f"Cannot add model: {_qt.error_text(exc)}")
            return  # the typed text stays, to be corrected
        self._show_model_file()

    def _show_model_file(self) -> None:
        """The file field shows the selected model's file, or nothing: never a model that
        will not run."""
        if not hasattr(self, "model_file"):
            return
        model = self.model.value
        shown = str(model) if model is not None and Path(str(model)).is_file() else ""
        with self.model_file.changed.blocked():
            self.model_file.line_edit.value = shown  # "" stays empty (value would be cwd)

    def _on_rename(self, _value=None) -> None:
        roi = self.roi.value
        if roi is None or not roi.selected_data:
            _qt.show_error("Select the ROI(s) to rename in the ROI layer first.")
            return
        try:
            rename_selected(roi, self.roi_name.value)
        except ValueError as exc:
            _qt.show_error(f"Cannot rename: {exc}")

    # ------------------------------------------------------------------ parameters

    def detect_params(self) -> DetectParams:
        """Detection settings from the controls; the run threshold is at most :data:`LOW_CONF`."""
        choice = self.channel.value if self.channel.enabled else None
        return DetectParams(
            tile=int(self.tile.value),
            overlap=int(self.overlap.value) or None,
            conf=min(float(self.conf.value), LOW_CONF),
            iou=float(self.iou.value),
            channel=choice if isinstance(choice, int) else None,
            planes=choice == PLANES,
            normalize=self.normalize.value,
            diameter=float(self.diameter.value) or None,
            diameter_pixels=str(self.diameter_pixels.value),
            auto_diameter=not float(self.diameter.value),
            level=int(self.level.value or 0),
            min_relative_area=float(self.min_relative_area.value),
        )

    def batch_settings(self) -> DetectSettings:
        """Model and settings for the Batch tab: the shown confidence, full resolution.

        The CSVs are final (nothing re-filters them), so they use the slider's confidence, not
        the low run threshold of the Image tab; the pyramid level of the open image says
        nothing about other files, so level 0.
        """
        params = self.detect_params()
        params = dataclasses.replace(
            params,
            conf=float(self.conf.value),
            level=0,
            diameter=self._full_resolution_diameter(params),
            diameter_pixels="full",
            channel=None,  # the Batch tab says its own (files differ from this layer)
            planes=False,
        )
        model = self.model.value
        return DetectSettings(
            model=None if model is None else str(model),
            backend=str(self.backend.value),
            params=params,
            quantize=bool(self.quantize.value),
        )

    def _full_resolution_diameter(self, params: DetectParams) -> float | None:
        """The diameter in full-resolution pixels (the Batch tab runs level 0)."""
        layer = self.image.value
        if params.diameter is None or params.diameter_pixels == "full" or layer is None:
            return params.diameter
        if not layer.multiscale:
            return params.diameter
        levels = list(layer.data)
        return params.diameter * levels[0].shape[-1] / levels[params.level].shape[-1]

    def _resolve_axis(self) -> bool:
        """Ask once per layer what an unlabelled first axis of 2-4 holds; False: cancelled."""
        layer = self.image.value
        n = _ambiguous_length(layer)
        if n and self.channel.value == ASK:
            answer = _qt.ask_axis_meaning(layer.name, n, self.native)
            if answer is None:
                return False
            layer.metadata[AXIS_KEY] = answer
            self.channel.value = answer
        elif n:
            layer.metadata[AXIS_KEY] = self.channel.value
        return True

    def _make_job(self) -> _Job:
        layer = self.image.value
        if layer is None:
            raise ValueError("no image layer: open an image first")
        if self.model.value is None:
            raise ValueError("no model selected")
        full = layer.data[0] if layer.multiscale else layer.data
        params = self.detect_params()
        # the chosen channel of an unlabelled axis is no plane: results are 2-D
        lead = 1 if _ambiguous_length(layer) and params.channel is not None else 0
        plane_shape = tuple(int(n) for n in full.shape[lead : layer.ndim - 2])
        planes = None
        if plane_shape and self.current_plane.value:
            # the plane shown: the viewer's world point in the layer's data coordinates
            point = np.asarray(self.viewer.dims.point, dtype=float)[-layer.ndim :]
            planes = [int(to_table_coords([layer.world_to_data(point)], plane_shape)[0][0])]
        return _Job(
            source=layer.name,
            image=list(layer.data) if layer.multiscale else layer.data,
            model=self.model.value,
            backend=self.backend.value,
            params=params,
            rgb=bool(layer.rgb),
            planes=planes,
            axes=_layer_axes(layer),
            scale=[float(s) for s in layer.scale[lead:]],
            translate=[float(t) for t in layer.translate[lead:]],
            plane_shape=plane_shape,
            quantize=bool(self.quantize.value),
        )

    # ------------------------------------------------------------------ running

    def run(self, _value=None) -> Task | None:
        """Start detection on the chosen image in a worker thread.

        Returns
        -------
        Task or None
            The started task (None when the settings are invalid or a run is going on).
        """
        if self.running:
            return None
        if not self._resolve_axis():
            self.count_label.value = "not run: say what the image's first axis holds (channel)"
            return None
        try:
            job = self._make_job()
        except ValueError as exc:
            _qt.show_error(f"Cannot run detection: {exc}")
            return None
        self.task = start(
            partial(run_detection, job),
            partial(self._on_done, job),
            on_progress=self.progress.update,
            on_finished=self._on_finished,
            desc=f"Detecting nuclei in {job.source}",
        )
        self._set_running(True)
        self.count_label.value = f"detecting with {Path(job.model).name}..."
        self.progress.begin(f"loading {Path(job.model).name}...")
        return self.task

    def status_label(self):
        return self.count_label

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.calibrate_button.enabled = not running
        self.cancel_button.enabled = running

    def _on_done(self, job: _Job, outcome: Outcome) -> None:
        self.progress.end(self._progress_summary(outcome))
        if outcome.cancelled:
            self._calibrate_after_run = False
            self.count_label.value = "detection cancelled"
            _qt.show_info("Detection cancelled; no layers were changed.")
            return
        if outcome.error is not None:
            if _qt.trusted_after_asking(outcome.error, self.native):
                self.count_label.value = f"trusted {Path(job.model).name}: running again..."
                self._rerun_when_finished()
                return
            self._calibrate_after_run = False
            self.count_label.value = "detection failed"
            _qt.show_error(
                f"Detection failed on {job.source!r} with model "
                f"{Path(job.model).name!r}: {_qt.error_text(outcome.error)}"
            )
            return
        df = outcome.value.reset_index(drop=True)  # row ids: the edits map back through them
        self._keep_edited_layers(job.source)
        self._results[job.source] = _Result(
            source=job.source,
            df=df,
            model=job.model,
            run_conf=float(job.params.conf),
            scale=job.scale,
            translate=job.translate,
            plane_shape=job.plane_shape,
            n_planes=int(df.attrs.get("n_planes", max(1, int(np.prod(job.plane_shape))))),
        )
        self._active = job.source
        self._replace_layers(job.source, self.results_to_layers(job.source))
        self._refresh_counts()
        if self._calibrate_after_run:
            self._calibrate_after_run = False
            self._calibrate_and_report()

    def _progress_summary(self, outcome: Outcome) -> str:
        last: Progress | None = self.progress.last
        if outcome.cancelled and last is not None and last.data == INT8_STEP:
            return "cancelled while making the INT8 version (nothing kept)"
        done = f"{last.done:,} of {last.total:,} tiles" if last is not None else "no tiles"
        if outcome.cancelled:
            return f"cancelled after {done}"
        if outcome.error is not None:
            return ""
        return f"{done} in {self.progress.elapsed()}"

    def _on_finished(self) -> None:
        self._set_running(False)
        if self._run_again:
            self._run_again = False
            self.run()

    def _rerun_when_finished(self) -> None:
        """Run once more after this task: the dialog's event loop may have let the task's
        ``finished`` pass already (then nothing else would start it)."""
        self._run_again = True
        if not self.running:
            self._on_finished()

    # ------------------------------------------------------------------ layers

    def result(self, source: str | None = None) -> _Result | None:
        """The stored run of ``source`` (default: the image shown in the widget / last run)."""
        if source is None:
            layer = self.image.value
            source = (
                layer.name if layer is not None and layer.name in self._results else self._active
            )
        return self._results.get(source) if source is not None else None

    def filtered(self, source: str | None = None) -> pd.DataFrame:
        """Detections of ``source`` at the slider's confidence (empty table if none)."""
        res = self.result(source)
        if res is None:
            return pd.DataFrame(columns=DETECTION_COLUMNS)
        return filter_detections(res.df, float(self.conf.value))

    def results_to_layers(self, source: str | None = None) -> list[LayerDataTuple]:
        """LayerDataTuples (boxes, nuclei) of a stored run at the current confidence."""
        res = self.result(source)
        if res is None:
            return []
        return detections_to_layers(
            res.df,
            res.source,
            scale=res.scale,
            translate=res.translate,
            conf=float(self.conf.value),
            plane_shape=res.plane_shape,
            view=self.view_region(res),
        )

    def view_region(self, res: _Result | None = None) -> tuple[float, float, float, float] | None:
        """Visible (y0, x0, y1, x1) of ``res``'s image in table coordinates, or None.

        From the public camera (centre, zoom) and canvas (viewbox size) models, so it is right
        before the canvas has drawn; None in a 3-D view or when Y/X are not the displayed axes.
        """
        res = res if res is not None else self.result()
        return None if res is None else _qt.visible_region(self.viewer, res.scale, res.translate)

    def show_boxes_in_view(self, _value=None) -> int:
        """Redraw the boxes of a large result for the visible region; returns how many.

        Results up to :data:`~napari_yolocell.shell.layers.LARGE_RESULT` nuclei always have every
        box drawn, so this only matters above it (see docs/widgets.md, "Large results").
        """
        return self._redraw(points=False)

    def _follow_view(self) -> None:
        """The camera stopped: redraw a large result's boxes if the view changed.

        Called by :class:`~napari_yolocell.shell.view_follow.ViewFollower` once panning or
        zooming has paused, so boxes appear as soon as few enough are in view.
        """
        res = self.result()
        if res is None or self.boxes_button.native.isHidden():
            return
        view = self.view_region(res)
        if view is not None and view != self._boxes_view:
            self.show_boxes_in_view()

    def _apply_conf(self, _value=None) -> None:
        """Re-filter the shown result in place (no re-run) and update the counts."""
        self._redraw(points=True)

    def _redraw(self, points: bool) -> int:
        res = self.result()
        if res is None:
            return 0
        layers = self.result_layers(res.source)
        if set(layers) != {"boxes", "nuclei"}:
            self._replace_layers(res.source, self.results_to_layers(res.source))
            layers = self.result_layers(res.source)
        else:
            self._update_layers(res, layers, points=points)
        self._boxes_view = self.view_region(res)
        self._refresh_counts()
        return len(layers["boxes"].data)

    def _update_layers(self, res: _Result, layers: dict[str, Any], **kwargs: Any) -> None:
        """Show ``res`` at the slider's confidence in its layers (not heard as a user edit)."""
        self._updating = True
        try:
            update_result_layers(
                layers["boxes"],
                layers["nuclei"],
                self.filtered(res.source),
                res.source,
                res.plane_shape,
                float(self.conf.value),
                view=self.view_region(res),
                **kwargs,
            )
        finally:
            self._updating = False

    def _on_result_edit(self, source: str, kind: str, event: Any) -> None:
        """The user deleted, added or moved boxes or points: fold that into the stored table.

        The slider then filters the edited set (deleted nuclei never come back, added ones
        have confidence 1), and the count, layer names and exports follow.
        """
        if self._updating or str(getattr(event, "action", "changed")) not in EDIT_DONE:
            return
        res, layer = self._results.get(source), event.source
        if res is None or layer.metadata.get(SOURCE_KEY) != source or ID not in layer.features:
            return
        table, ids = apply_layer_edits(
            res.df,
            kind,
            layer.data,
            layer.features[ID].to_numpy(),
            layer.metadata.get(DRAWN_KEY, []),
            res.plane_shape,
        )
        if table is res.df:
            return
        res.df = table
        self._updating = True
        try:  # the edited layer learns its new rows; the other one is redrawn
            features = layer.features.copy()
            features[ID] = ids
            features["confidence"] = table.loc[ids, "confidence"].to_numpy(float)
            set_layer_features(layer, features)
            layer.refresh_colors()
        finally:
            self._updating = False
        layers = self.result_layers(source)
        if set(layers) == {"boxes", "nuclei"}:
            other = {"points": kind == "boxes", "redraw_boxes": kind == "nuclei"}
            self._update_layers(res, layers, **other)
        self._refresh_counts()

    def _keep_edited_layers(self, source: str) -> None:
        """Before a re-run replaces an edited result, its layers become the user's own."""
        old = self._results.get(source)
        summary = edits_summary(old.df) if old is not None else ""
        if not summary:
            return
        for layer in self.result_layers(source).values():
            for key in (SOURCE_KEY, KIND_KEY, DRAWN_KEY):
                layer.metadata.pop(key, None)
            layer.name = f"{layer.name} edited"
        _qt.show_info(
            f"The re-run replaced the result of {source!r}; your edited boxes and nuclei "
            f"({summary.removeprefix('your edits: ')}) are kept as layers ending in 'edited'."
        )

    def result_layers(self, source: str | None = None) -> dict[str, Any]:
        """``{"boxes": layer, "nuclei": layer}`` currently in the viewer for ``source``."""
        res = self.result(source)
        name = res.source if res is not None else source
        return {
            layer.metadata[KIND_KEY]: layer
            for layer in self.viewer.layers
            if _qt.is_result(layer) and layer.metadata[SOURCE_KEY] == name
        }

    def _replace_layers(self, source: str, tuples: list[LayerDataTuple]) -> None:
        from napari.layers import Layer

        # Build first, then swap: a failure leaves the previous result in place.
        new = [Layer.create(data, meta, kind) for data, meta, kind in tuples]
        for layer in list(self.viewer.layers):
            if _qt.is_result(layer) and layer.metadata[SOURCE_KEY] == source:
                self.viewer.layers.remove(layer)
        for layer in new:
            self.viewer.add_layer(layer)
            on_edit = partial(self._on_result_edit, source, layer.metadata[KIND_KEY])
            layer.events.data.connect(on_edit)
        self._boxes_view = self.view_region(self.result(source))
        if self.image.value is not None:  # keep the analysed image selected for the next run
            self.viewer.layers.selection.active = self.image.value

    # ------------------------------------------------------------------ counting

    def _roi_polygons(self, res: _Result) -> tuple[list[np.ndarray], list[str]]:
        """ROI polygons in table coordinates of ``res``'s image, and their names."""
        roi = self.roi.value
        if roi is None or len(roi.data) == 0:
            return [], []
        names = roi.features["name"].tolist() if "name" in roi.features else None
        return roi_polygons(
            roi.data,
            roi.shape_type,
            names,
            (roi.scale, roi.translate),
            (res.scale, res.translate),
        )

    def counts(self, source: str | None = None) -> pd.DataFrame:
        """Counts table (``image, plane, roi, count``) at the current confidence."""
        res = self.result(source)
        if res is None:
            return pd.DataFrame(columns=COUNT_COLUMNS)
        polys, names = self._roi_polygons(res)
        shown = self.filtered(res.source)
        return counts_table(shown, res.source, polys or None, names or None, res.n_planes)

    def _refresh_counts(self, _value=None) -> None:
        res = self.result()
        if res is None:
            return
        shown = counted(self.filtered(res.source))
        text = f"{res.source}: {len(shown)} nuclei at confidence >= {self.conf.value:.2f}"
        text += _level_text(res.df.attrs)
        small = len(self.filtered(res.source)) - len(shown)
        if small:
            text += f" ({small} small not counted)"
        if res.n_planes > 1:
            text += f" ({shown['plane'].nunique()} of {res.n_planes} planes with nuclei)"
        if self.conf.value < res.run_conf - 1e-9:
            text += f"; run used {res.run_conf:.2f}, re-run to see lower ones"
        edits = edits_summary(res.df)
        if edits:
            text += f"; {edits} (kept whatever the confidence; added nuclei count as 1.00)"
        measured, used = res.df.attrs.get("measured_diameter"), res.df.attrs.get("diameter")
        if res.df.attrs.get("lab_scale"):
            text += f"; at the fine-tune's lab scale (~{used:.0f} px nuclei)"
        elif measured is not None and used is not None:
            text += f"; nuclei measured ~{used:.0f} px across: tiles resized to the model's scale"
        large = len(shown) > LARGE_RESULT
        self.boxes_button.visible = large
        boxes = self.result_layers(res.source).get("boxes") if large else None
        if boxes is not None and boxes.metadata.get(BOXES_KEY) == "view":
            if len(boxes.data):
                text += f"; boxes drawn for the {len(boxes.data):,} in view"
            else:
                text += (
                    f"; boxes drawn only when at most {MAX_BOXES_IN_VIEW:,} are in view: "
                    "zoom in and press 'Show boxes in view'"
                )
        self.count_label.value = text
        table = self.counts(res.source)
        table = table[table["roi"] != WHOLE_IMAGE_ROI]
        self.roi_table.visible = bool(len(table))
        if len(table):
            self.roi_table.value = {c: table[c].tolist() for c in ROI_COLUMNS}
        self.marker_panel.refresh()

    # ------------------------------------------------------------------ export

    def export_detections(self, path: str | Path, source: str | None = None) -> Path:
        """Write the shown detections as CSV (:data:`~napari_yolocell.io.tables.CSV_COLUMNS`).

        Coordinates are full-resolution pixels of the image (y0/x0 inclusive edges, y1/x1
        exclusive), like the command line's output. Written atomically.
        """
        res = self._require_result(source)
        return write_csv_atomic(detections_csv_table(self.filtered(res.source), res.source), path)

    def export_counts(self, path: str | Path, source: str | None = None) -> Path:
        """Write counts per plane (``roi = all``) and per ROI as CSV, atomically.

        Columns :data:`~napari_yolocell.io.tables.COUNT_COLUMNS`.
        """
        res = self._require_result(source)
        return write_csv_atomic(self.counts(res.source), path)

    def export_geojson(self, path: str | Path, source: str | None = None) -> Path:
        """Write the shown nuclei and the ROIs as a QuPath GeoJSON FeatureCollection.

        Nuclei are ``detection`` objects (their boxes, with the confidence and any measurements),
        ROIs ``annotation`` objects named like the counts table; coordinates are full-resolution
        pixels (:func:`~napari_yolocell.io.geojson.detections_to_geojson`). Written atomically.
        """
        res = self._require_result(source)
        polys, names = self._roi_polygons(res)
        fc = detections_to_geojson(
            self.filtered(res.source),
            rois=polys,
            roi_names=names or None,
            plane_shape=res.plane_shape,
        )
        return write_geojson(path, fc)

    def _require_result(self, source: str | None) -> _Result:
        res = self.result(source)
        if res is None:
            raise ValueError("nothing to export: run the detection first")
        return res

    def _export_dialog(self, export, what: str, kind: str = "csv", _value=None) -> None:
        res = self.result()
        if res is None:
            _qt.show_error("Nothing to export: run the detection first.")
            return
        title, default = f"Export {what}", f"{res.source}_{what}.{kind}"
        path = _qt.save_file_dialog(self.native, title, default, f"{kind.upper()} (*.{kind})")
        if not path:
            return
        try:
            written = export(path)
        except (OSError, ValueError) as exc:
            _qt.show_error(f"Export failed: {exc}")
            return
        _qt.show_info(f"Wrote {written}")

    # ------------------------------------------------------------------ calibrate

    def calibrate(self, source: str | None = None) -> Calibration:
        """Pick the confidence from a known count or clicked nuclei; sets the slider.

        Uses the stored low-threshold run (no re-run). With an ROI layer, only detections (and
        clicked points) inside the ROIs are used; the known count is then the ROI's.
        The calibrated value is remembered for this model for the rest of the session.

        Raises
        ------
        ValueError
            No run yet, or no known count / clicked nuclei given.
        """
        res = self.result(source)
        if res is None:
            raise ValueError("run the detection first")
        polys, _ = self._roi_polygons(res)
        clicked, points = self.clicked.value, None
        if clicked is not None:
            layer, image = (clicked.scale, clicked.translate), (res.scale, res.translate)
            points = points_to_table(clicked.data, layer, image, res.plane_shape)
            if not polys:
                _qt.show_info(
                    "No ROI set: calibrating as if every nucleus of the image was clicked."
                )
        cal = calibrate_in_rois(
            res.df, known_count=int(self.known_count.value), points=points, polygons=polys
        )
        before = float(self.conf.value)
        self._calibrated[res.model] = cal.conf
        self.last_calibration = cal
        where = "in the ROI" if polys else "in the image"
        self.calibration_label.value = f"{where}: {cal.summary(before=before)}"
        self.conf.value = cal.conf
        return cal

    def _on_calibrate_clicked(self, _value=None) -> None:
        if self.result() is None or (
            self.image.value is not None and self.image.value.name not in self._results
        ):
            self._calibrate_after_run = True  # runs once, then calibrates on its table
            if self.run() is None:
                self._calibrate_after_run = False
            return
        self._calibrate_and_report()

    def _calibrate_and_report(self) -> None:
        try:
            self.calibrate()
        except ValueError as exc:
            _qt.show_error(f"Cannot calibrate: {exc}")
