"""napari dock widget: detect and count nuclei in an image layer (the thin shell).

The widget only gathers parameters, starts a worker and turns results into layers:

- :func:`run_detection` is the plain generator the worker runs (load the model, drive
  :func:`~napari_yolocell.engine.detect.iter_detect`); it never raises, it returns a
  :class:`DetectOutcome` so cancellation and errors reach the GUI thread as values;
- :meth:`DetectWidget.results_to_layers` returns LayerDataTuples built by
  :func:`~napari_yolocell.shell.layers.detections_to_layers` (testable without a viewer);
- counting, ROI counts, CSV export and calibration reuse the table kept from the last run, so
  moving the confidence slider or calibrating never re-runs the model;
- results above :data:`~napari_yolocell.shell.layers.LARGE_RESULT` nuclei draw boxes only for the
  visible region (:meth:`DetectWidget.show_boxes_in_view`); the points always hold all;
- the widget has two tabs: *Image* (this module) and *Batch*
  (:class:`~napari_yolocell.shell.batch_widget.BatchPanel`, a folder of files -> CSVs).

Models trained in this session are shared through a module-level registry
(:func:`register_session_model`): the Train widget pushes ``best.pt`` there and every open
Detect widget refreshes its model list.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
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
    PushButton,
    SpinBox,
    Table,
)

from napari_yolocell.analysis.calibrate import Calibration, calibrate_by_count, calibrate_by_points
from napari_yolocell.analysis.roi import in_roi
from napari_yolocell.engine.detect import DetectionCancelled, DetectParams, iter_detect
from napari_yolocell.models.loading import load_detector
from napari_yolocell.models.registry import list_models, resolve_model
from napari_yolocell.shell.batch_widget import BatchPanel, add_tabs
from napari_yolocell.shell.layers import (
    BOXES_KEY,
    KIND_KEY,
    LARGE_RESULT,
    MAX_BOXES_IN_VIEW,
    PIXEL_CENTER,
    SOURCE_KEY,
    LayerDataTuple,
    boxes_in_view,
    boxes_name,
    counts_table,
    detections_csv_table,
    detections_to_layers,
    filter_detections,
    result_names,
    shapes_to_polygons,
    to_layer_coords,
    to_table_coords,
    transform_coords,
    write_csv_atomic,
)

if TYPE_CHECKING:
    import napari

__all__ = [
    "LOW_CONF",
    "DetectOutcome",
    "DetectWidget",
    "register_session_model",
    "run_detection",
    "session_models",
]

log = logging.getLogger(__name__)

#: Runs use at most this confidence, so the slider and calibration can go down to it later
#: without re-running (the calibration grid starts at 0.05 too).
LOW_CONF = 0.05
UNTRAINED = ("yolov5n.yaml", "yolov6n.yaml")

# --------------------------------------------------------------------------- session models

_SESSION_MODELS: list[str] = []
# Open widgets that list models (anything with ``refresh_models()``), told about new ones.
_WIDGETS: weakref.WeakSet[Any] = weakref.WeakSet()


def session_models() -> list[str]:
    """Weights files added in this session (trained or picked), oldest first."""
    return list(_SESSION_MODELS)


def register_session_model(path: str | Path) -> str:
    """Add a weights file to the session's model list and refresh every open widget listing it.

    Call from the GUI thread (the Train widget does, when a run ends).

    Returns
    -------
    str
        The absolute path as it appears in the model choices.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model weights file not found: {str(path)!r}")
    key = str(path.resolve())
    if key not in _SESSION_MODELS:
        _SESSION_MODELS.append(key)
    for widget in list(_WIDGETS):
        try:
            widget.refresh_models()
        except RuntimeError:  # its Qt side was deleted (dock closed): forget it
            _WIDGETS.discard(widget)
    return key


# --------------------------------------------------------------------------- computation


@dataclass
class DetectOutcome:
    """What a detection run ended with: a table, a cancellation or an error."""

    df: pd.DataFrame | None = None
    cancelled: bool = False
    error: BaseException | None = None


def run_detection(
    image: Any,
    model: str,
    params: DetectParams,
    *,
    rgb: bool | None = None,
    planes: Sequence[int] | None = None,
    cancel: threading.Event | None = None,
    backend: str = "auto",
) -> Generator[tuple[int, int], None, DetectOutcome]:
    """Load ``model`` and detect; yields ``(done_tiles, total_tiles)``, returns the outcome.

    Exceptions are returned, not raised: superqt's worker turns a ``RuntimeError`` (which
    :class:`~napari_yolocell.engine.detect.DetectionCancelled` is) into a bare warning, and napari
    would report any other error a second time.
    """
    try:
        detector = load_detector(model, backend=backend)
        if cancel is not None and cancel.is_set():
            return DetectOutcome(cancelled=True)
        df = yield from iter_detect(image, detector, params, rgb=rgb, planes=planes, cancel=cancel)
    except DetectionCancelled:
        return DetectOutcome(cancelled=True)
    except Exception as exc:  # noqa: BLE001 - every failure is shown to the user
        log.debug("detection failed", exc_info=True)
        return DetectOutcome(error=exc)
    return DetectOutcome(df=df)


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
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Job:
    source: str
    image: Any
    model: str
    backend: str
    params: DetectParams
    rgb: bool
    planes: list[int] | None
    scale: list[float]
    translate: list[float]
    plane_shape: tuple[int, ...]


def _is_result(layer) -> bool:
    return SOURCE_KEY in getattr(layer, "metadata", {})


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return (
        text
        if isinstance(exc, (ValueError, FileNotFoundError))
        else f"{type(exc).__name__}: {text}"
    )


class DetectWidget(Container):
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
        self._worker = None
        self._cancel: threading.Event | None = None
        self._pbar = None
        self._calibrate_after_run = False
        self.last_calibration: Calibration | None = None

        # --- input
        self.image = ComboBox(label="image", choices=self._image_choices)
        self.level = ComboBox(
            label="level",
            choices=self._level_choices,
            tooltip="pyramid level to analyse (0 = full resolution)",
        )
        self.current_plane = CheckBox(
            text="current plane only",
            value=False,
            tooltip="nD images: analyse only the plane shown",
        )
        self.channel = ComboBox(
            label="channel",
            choices=[("max of colours", None), ("red (0)", 0), ("green (1)", 1), ("blue (2)", 2)],
            tooltip="RGB images: colour channel holding the nuclei",
        )
        # --- model
        self.model = ComboBox(label="model", choices=self._model_choices)
        self.model_file = FileEdit(
            label="add .pt",
            mode="r",
            filter="*.pt",
            tooltip="add a trained ultralytics checkpoint to the list",
        )
        self.backend = ComboBox(
            label="runtime",
            value="auto",
            choices=["auto", "openvino-int8", "openvino", "onnxruntime", "torch"],
            tooltip="forward-pass runtime; auto = the fastest installed (OpenVINO on CPU, "
            "INT8 for the bundled models; PyTorch on a CUDA GPU)",
        )
        # --- parameters
        self.conf = FloatSlider(
            label="confidence",
            value=0.25,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="filters the detections shown; moving it after a run does not re-run",
        )
        self.iou = FloatSpinBox(label="IoU (NMS)", value=0.5, min=0.05, max=0.95, step=0.05)
        self.tile = SpinBox(label="tile", value=640, min=64, max=8192, step=32)
        self.overlap = SpinBox(label="overlap (0 = auto)", value=0, min=0, max=4096)
        self.diameter = FloatSpinBox(
            label="diameter px (0 = auto)",
            value=0.0,
            min=0.0,
            max=2000.0,
            step=1.0,
            tooltip="typical nucleus diameter in full-resolution pixels; tiles are resized to "
            "the model's scale. 0: measured on the image, and tiles resized only when nuclei "
            "are far larger than the model's",
        )
        self.normalize = ComboBox(
            label="normalisation",
            choices=[("model default", None), ("percentile", "percentile"), ("none", "none")],
        )
        self.roi = ComboBox(label="ROI (Shapes)", choices=self._roi_choices, nullable=True)
        # --- run
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.count_label = Label(value="no detections yet")
        self.boxes_button = PushButton(
            text="Show boxes in view",
            visible=False,
            tooltip=f"results above {LARGE_RESULT:,} nuclei draw boxes only for the visible "
            f"region (at most {MAX_BOXES_IN_VIEW:,}); press after panning or zooming",
        )
        self.roi_table = Table(value={"plane": [], "roi": [], "count": []}, visible=False)
        self.export_detections_button = PushButton(text="Export detections CSV...")
        self.export_counts_button = PushButton(text="Export counts CSV...")
        # --- calibrate
        self.known_count = SpinBox(
            label="known count",
            value=0,
            min=0,
            max=10_000_000,
            tooltip="nuclei in the image (or in the ROI when one is set)",
        )
        self.clicked = ComboBox(
            label="or clicked nuclei",
            choices=self._points_choices,
            nullable=True,
            tooltip="Points layer with every nucleus of the ROI clicked",
        )
        self.calibrate_button = PushButton(text="Calibrate confidence")
        self.calibration_label = Label(value="")

        self.single = Container(
            widgets=[
                self.image,
                self.level,
                self.current_plane,
                self.channel,
                self.model,
                self.model_file,
                self.backend,
                self.conf,
                self.iou,
                self.tile,
                self.overlap,
                self.diameter,
                self.normalize,
                self.roi,
                # results span the full width (no label column)
                Container(
                    labels=False,
                    widgets=[
                        Container(
                            widgets=[self.run_button, self.cancel_button],
                            layout="horizontal",
                            labels=False,
                        ),
                        self.count_label,
                        self.boxes_button,
                        self.roi_table,
                        Container(
                            widgets=[self.export_detections_button, self.export_counts_button],
                            layout="horizontal",
                            labels=False,
                        ),
                    ],
                ),
                self.known_count,
                self.clicked,
                Container(labels=False, widgets=[self.calibrate_button, self.calibration_label]),
            ]
        )
        self.batch = BatchPanel(self)
        self.tabs = add_tabs(self, [("Image", self.single), ("Batch", self.batch)])
        self.roi_table.native.setMaximumHeight(140)

        _wrap(self.count_label, self.calibration_label)
        self.image.changed.connect(self._on_image_changed)
        self.model.changed.connect(self._on_model_changed)
        self.model_file.changed.connect(self._on_model_file)
        self.conf.changed.connect(self._apply_conf)
        self.roi.changed.connect(self._refresh_counts)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.boxes_button.changed.connect(self.show_boxes_in_view)
        self.export_detections_button.changed.connect(
            partial(self._export_dialog, self.export_detections, "detections")
        )
        self.export_counts_button.changed.connect(
            partial(self._export_dialog, self.export_counts, "counts")
        )
        self.calibrate_button.changed.connect(self._on_calibrate_clicked)
        for event in ("inserted", "removed", "reordered"):
            getattr(self.viewer.layers.events, event).connect(self._on_layers_changed)
        _WIDGETS.add(self)
        self._on_image_changed()
        self._on_model_changed()

    # ------------------------------------------------------------------ choices

    def _image_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _roi_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Shapes

        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Shapes) and not _is_result(layer)
        ]

    def _points_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Points

        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Points) and not _is_result(layer)
        ]

    def _level_choices(self, _widget=None) -> list[tuple[str, int]]:
        layer = self.image.value if hasattr(self, "image") else None
        if layer is None or not layer.multiscale:
            return [("0 (full resolution)", 0)]
        return [
            (f"{i}: {' x '.join(str(n) for n in level.shape)}", i)
            for i, level in enumerate(layer.data)
        ]

    def _model_choices(self, _widget=None) -> list[tuple[str, str]]:
        try:
            specs = list_models()
        except Exception as exc:  # noqa: BLE001 - a broken registry must not break the widget
            log.warning("cannot read the model registry: %s", exc)
            specs = [resolve_model("classical")]
        specs = sorted(specs, key=lambda s: not s.default)  # the default model first
        choices = [
            (s.name if s.family == "classical" else f"{s.name} ({s.family})", s.name) for s in specs
        ]
        choices += [(f"{name} (untrained)", name) for name in UNTRAINED]
        for path in _SESSION_MODELS:
            p = Path(path)
            choices.append((f"{p.parent.parent.name}/{p.name}", path))
        return choices

    def refresh_models(self) -> None:
        """Re-read the registry and session models into the model list (keeps the selection)."""
        self.model.reset_choices()

    def add_model(self, path: str | Path, select: bool = True) -> str:
        """Add a ``.pt`` checkpoint to the model list (all Detect widgets), optionally select it.

        Raises
        ------
        FileNotFoundError
            If the file does not exist.
        """
        key = register_session_model(path)
        if select:
            self.model.value = key
        return key

    def _on_layers_changed(self, _event=None) -> None:
        self.reset_choices()

    def _on_image_changed(self, _value=None) -> None:
        layer = self.image.value
        self.level.reset_choices()
        self.channel.enabled = bool(layer is not None and layer.rgb)
        self.current_plane.enabled = bool(layer is not None and layer.ndim > 2)
        if layer is not None and layer.name in self._results:
            self._active = layer.name
            self._refresh_counts()

    def _on_model_changed(self, _value=None) -> None:
        name = self.model.value
        if name is None:
            return
        if name in self._calibrated:
            self.conf.value = self._calibrated[name]
            return
        try:
            self.conf.value = float(resolve_model(name).default_conf)
        except (FileNotFoundError, ValueError):
            pass  # reported when the user runs it

    def _on_model_file(self, value) -> None:
        if not value or not Path(value).is_file():
            return
        try:
            self.add_model(value)
        except (FileNotFoundError, ValueError) as exc:
            _show_error(f"Cannot add model: {_error_text(exc)}")

    # ------------------------------------------------------------------ parameters

    def detect_params(self) -> DetectParams:
        """Detection settings from the controls; the run threshold is at most :data:`LOW_CONF`."""
        layer = self.image.value
        return DetectParams(
            tile=int(self.tile.value),
            overlap=int(self.overlap.value) or None,
            conf=min(float(self.conf.value), LOW_CONF),
            iou=float(self.iou.value),
            channel=self.channel.value if layer is not None and layer.rgb else None,
            normalize=self.normalize.value,
            diameter=float(self.diameter.value) or None,
            auto_diameter=not float(self.diameter.value),
            level=int(self.level.value or 0),
        )

    def _plane_shape(self, layer) -> tuple[int, ...]:
        full = layer.data[0] if layer.multiscale else layer.data
        return tuple(int(n) for n in full.shape[: layer.ndim - 2])

    def _current_plane(self, layer, plane_shape: tuple[int, ...]) -> int:
        point = np.asarray(self.viewer.dims.point, dtype=float)[-layer.ndim :]
        data = np.asarray(layer.world_to_data(point), dtype=float)[: len(plane_shape)]
        index = np.clip(np.rint(data).astype(int), 0, np.asarray(plane_shape) - 1)
        return int(np.ravel_multi_index(tuple(index), plane_shape))

    def _make_job(self) -> _Job:
        layer = self.image.value
        if layer is None:
            raise ValueError("no image layer: open an image first")
        if self.model.value is None:
            raise ValueError("no model selected")
        plane_shape = self._plane_shape(layer)
        planes = None
        if plane_shape and self.current_plane.value:
            planes = [self._current_plane(layer, plane_shape)]
        return _Job(
            source=layer.name,
            image=list(layer.data) if layer.multiscale else layer.data,
            model=self.model.value,
            backend=self.backend.value,
            params=self.detect_params(),
            rgb=bool(layer.rgb),
            planes=planes,
            scale=[float(s) for s in layer.scale],
            translate=[float(t) for t in layer.translate],
            plane_shape=plane_shape,
        )

    # ------------------------------------------------------------------ running

    @property
    def running(self) -> bool:
        """Whether a detection worker is running."""
        return self._worker is not None

    def run(self, _value=None):
        """Start detection on the chosen image in a worker thread.

        Returns
        -------
        GeneratorWorker or None
            The started worker (None when the settings are invalid or a run is going on).
        """
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self.running:
            return None
        try:
            job = self._make_job()
        except ValueError as exc:
            _show_error(f"Cannot run detection: {exc}")
            return None
        self._cancel = threading.Event()
        worker = create_worker(
            run_detection,
            job.image,
            job.model,
            job.params,
            rgb=job.rgb,
            planes=job.planes,
            cancel=self._cancel,
            backend=job.backend,
            _start_thread=False,
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(partial(self._on_returned, job))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._pbar = progress(total=0, desc=f"Detecting nuclei in {job.source}")
        self._set_running(True)
        self.count_label.value = f"detecting with {Path(job.model).name}..."
        worker.start()
        return worker

    def cancel(self, _value=None) -> None:
        """Ask the running detection to stop after the current batch of tiles."""
        if self._cancel is not None:
            self._cancel.set()
        if self.running:
            self.count_label.value = "cancelling..."

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.calibrate_button.enabled = not running
        self.cancel_button.enabled = running

    def _on_progress(self, value: tuple[int, int]) -> None:
        done, total = value
        if self._pbar is None:
            return
        if self._pbar.total != total:
            self._pbar.total = total
        self._pbar.update(done - self._pbar.n)

    def _on_returned(self, job: _Job, outcome: DetectOutcome) -> None:
        if outcome.cancelled:
            self._calibrate_after_run = False
            self.count_label.value = "detection cancelled"
            _show_info("Detection cancelled; no layers were changed.")
            return
        if outcome.error is not None:
            self._calibrate_after_run = False
            self.count_label.value = "detection failed"
            _show_error(
                f"Detection failed on {job.source!r} with model "
                f"{Path(job.model).name!r}: {_error_text(outcome.error)}"
            )
            return
        df = outcome.df
        n_planes = int(df.attrs.get("n_planes", max(1, int(np.prod(job.plane_shape)))))
        self._results[job.source] = _Result(
            source=job.source,
            df=df,
            model=job.model,
            run_conf=float(job.params.conf),
            scale=job.scale,
            translate=job.translate,
            plane_shape=job.plane_shape,
            n_planes=n_planes,
        )
        self._active = job.source
        self._replace_layers(job.source, self.results_to_layers(job.source))
        self._refresh_counts()
        if self._calibrate_after_run:
            self._calibrate_after_run = False
            self._calibrate_and_report()

    def _on_finished(self) -> None:
        self._worker = None
        self._cancel = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._set_running(False)

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
            return pd.DataFrame(
                columns=["plane", "y", "x", "y0", "x0", "y1", "x1", "confidence", "class"]
            )
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
        dims = self.viewer.dims
        if res is None or dims.ndisplay != 2:
            return None
        ndim = dims.ndim
        displayed = list(dims.displayed)
        if sorted(displayed) != [ndim - 2, ndim - 1]:
            return None
        centre = np.asarray(self.viewer.camera.center, float)[-2:]
        size = np.asarray(self.viewer.canvas.viewbox_size(self.viewer.layers), float)
        half = size / max(float(self.viewer.camera.zoom), 1e-12) / 2
        if displayed != [ndim - 2, ndim - 1]:  # transposed view: put (y, x) back in order
            centre, half = centre[::-1], half[::-1]
        scale = np.asarray(res.scale if res.scale is not None else [1.0, 1.0], float)[-2:]
        shift = np.asarray(res.translate if res.translate is not None else [0.0, 0.0], float)[-2:]
        a = (centre - half - shift) / scale + PIXEL_CENTER
        b = (centre + half - shift) / scale + PIXEL_CENTER
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

    def show_boxes_in_view(self, _value=None) -> int:
        """Redraw the boxes of a large result for the visible region; returns how many.

        Results up to :data:`~napari_yolocell.shell.layers.LARGE_RESULT` nuclei always have every
        box drawn, so this only matters above it (see docs/widgets.md, "Large results").
        """
        res = self.result()
        if res is None:
            return 0
        layers = self.result_layers(res.source)
        if set(layers) != {"boxes", "nuclei"}:
            self._replace_layers(res.source, self.results_to_layers(res.source))
            layers = self.result_layers(res.source)
        else:
            _update_result_layers(
                layers["boxes"],
                layers["nuclei"],
                self.filtered(res.source),
                res,
                float(self.conf.value),
                view=self.view_region(res),
                points=False,
            )
        self._refresh_counts()
        return len(layers["boxes"].data)

    def result_layers(self, source: str | None = None) -> dict[str, Any]:
        """``{"boxes": layer, "nuclei": layer}`` currently in the viewer for ``source``."""
        res = self.result(source)
        name = res.source if res is not None else source
        return {
            layer.metadata[KIND_KEY]: layer
            for layer in self.viewer.layers
            if _is_result(layer) and layer.metadata[SOURCE_KEY] == name
        }

    def _replace_layers(self, source: str, tuples: list[LayerDataTuple]) -> None:
        from napari.layers import Layer

        # Build first, then swap: a failure leaves the previous result in place.
        new = [Layer.create(data, meta, kind) for data, meta, kind in tuples]
        for layer in list(self.viewer.layers):
            if _is_result(layer) and layer.metadata[SOURCE_KEY] == source:
                self.viewer.layers.remove(layer)
        for layer in new:
            self.viewer.add_layer(layer)
        if self.image.value is not None:  # keep the analysed image selected for the next run
            self.viewer.layers.selection.active = self.image.value

    def _apply_conf(self, _value=None) -> None:
        """Re-filter the shown result in place (no re-run) and update the counts."""
        res = self.result()
        if res is None:
            return
        layers = self.result_layers(res.source)
        if set(layers) != {"boxes", "nuclei"}:
            self._replace_layers(res.source, self.results_to_layers(res.source))
        else:
            shown = filter_detections(res.df, float(self.conf.value))
            _update_result_layers(
                layers["boxes"],
                layers["nuclei"],
                shown,
                res,
                float(self.conf.value),
                view=self.view_region(res),
            )
        self._refresh_counts()

    # ------------------------------------------------------------------ counting

    def _roi_polygons(self, res: _Result) -> tuple[list[np.ndarray], list[str]]:
        """ROI polygons in table coordinates of ``res``'s image, and their names."""
        roi = self.roi.value
        if roi is None or len(roi.data) == 0:
            return [], []
        names_col = roi.features["name"] if "name" in roi.features else None
        polys, names = [], []
        kept = shapes_to_polygons(roi.data, roi.shape_type)
        index = [i for i, k in enumerate(roi.shape_type) if k not in ("line", "path")]
        for i, poly in zip(index, kept, strict=True):
            verts = transform_coords(poly, roi.scale, roi.translate, res.scale, res.translate)
            _, yx = to_table_coords(verts[:, -2:])
            polys.append(yx)
            names.append(str(names_col.iloc[i]) if names_col is not None else f"roi_{i}")
        return polys, names

    def counts(self, source: str | None = None) -> pd.DataFrame:
        """Counts table (``image, plane, roi, count``) at the current confidence."""
        res = self.result(source)
        if res is None:
            return pd.DataFrame(columns=["image", "plane", "roi", "count"])
        polys, names = self._roi_polygons(res)
        return counts_table(
            self.filtered(res.source),
            res.source,
            polys or None,
            names or None,
            n_planes=res.n_planes,
        )

    def _refresh_counts(self, _value=None) -> None:
        res = self.result()
        if res is None:
            return
        shown = self.filtered(res.source)
        text = f"{res.source}: {len(shown)} nuclei at confidence >= {self.conf.value:.2f}"
        planes = shown["plane"].nunique()
        if res.n_planes > 1:
            text += f" ({planes} of {res.n_planes} planes with nuclei)"
        if self.conf.value < res.run_conf - 1e-9:
            text += f"; run used {res.run_conf:.2f}, re-run to see lower ones"
        measured, used = res.df.attrs.get("measured_diameter"), res.df.attrs.get("diameter")
        if measured is not None and used is not None:
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
        polys, _ = self._roi_polygons(res)
        if polys:
            table = self.counts(res.source)
            table = table[table["roi"] != "image"][["plane", "roi", "count"]]
            self.roi_table.value = {c: table[c].tolist() for c in ("plane", "roi", "count")}
            self.roi_table.visible = True
        else:
            self.roi_table.visible = False

    # ------------------------------------------------------------------ export

    def export_detections(self, path: str | Path, source: str | None = None) -> Path:
        """Write the shown detections as CSV (``image,plane,y,x,y0,x0,y1,x1,confidence,class``).

        Coordinates are full-resolution pixels of the image (y0/x0 inclusive edges, y1/x1
        exclusive), like the command line's output. Written atomically.
        """
        res = self._require_result(source)
        return write_csv_atomic(detections_csv_table(self.filtered(res.source), res.source), path)

    def export_counts(self, path: str | Path, source: str | None = None) -> Path:
        """Write counts per plane (``roi = image``) and per ROI as CSV.

        Columns ``image,plane,roi,count``; written atomically.
        """
        res = self._require_result(source)
        return write_csv_atomic(self.counts(res.source), path)

    def _require_result(self, source: str | None) -> _Result:
        res = self.result(source)
        if res is None:
            raise ValueError("nothing to export: run the detection first")
        return res

    def _export_dialog(self, export, what: str, _value=None) -> None:
        from qtpy.QtWidgets import QFileDialog

        res = self.result()
        if res is None:
            _show_error("Nothing to export: run the detection first.")
            return
        default = f"{res.source}_{what}.csv"
        path, _ = QFileDialog.getSaveFileName(self.native, f"Export {what}", default, "CSV (*.csv)")
        if not path:
            return
        try:
            written = export(path)
        except (OSError, ValueError) as exc:
            _show_error(f"Export failed: {exc}")
            return
        _show_info(f"Wrote {written}")

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
        df = res.df
        polys, _ = self._roi_polygons(res)
        inside = np.ones(len(df), bool)
        if polys:
            yx = df[["y", "x"]].to_numpy(float)
            inside = np.any([in_roi(yx, p) for p in polys], axis=0)
        points_layer = self.clicked.value
        if points_layer is not None:
            coords = transform_coords(
                points_layer.data,
                points_layer.scale,
                points_layer.translate,
                res.scale,
                res.translate,
            )
            planes, yx = to_table_coords(coords, res.plane_shape)
            keep = np.ones(len(yx), bool)
            if polys:
                keep = np.any([in_roi(yx, p) for p in polys], axis=0)
            else:
                _show_info("No ROI set: calibrating as if every nucleus of the image was clicked.")
            if not keep.any():
                raise ValueError(f"no clicked nucleus of {points_layer.name!r} lies inside the ROI")
            cal = calibrate_by_points(*_separate_planes(df[inside], planes[keep], yx[keep]))
        else:
            if self.known_count.value <= 0:
                raise ValueError(
                    "give the known number of nuclei, or choose a Points layer of clicked nuclei"
                )
            cal = calibrate_by_count(
                df.loc[inside, "confidence"].to_numpy(float), int(self.known_count.value)
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
            _show_error(f"Cannot calibrate: {exc}")


def _separate_planes(df: pd.DataFrame, planes: np.ndarray, yx: np.ndarray):
    """Shift each plane far apart in y so nuclei of different planes can never match."""
    span = float(max(df["y1"].max() if len(df) else 0.0, yx[:, 0].max(initial=0.0))) + 1e3
    shifted = df.copy()
    for col in ("y", "y0", "y1"):
        shifted[col] = df[col] + df["plane"].to_numpy() * span
    pts = yx.copy()
    pts[:, 0] += planes * span
    return shifted, pts


def _update_result_layers(
    boxes,
    nuclei,
    shown: pd.DataFrame,
    res: _Result,
    conf: float,
    view: tuple[float, float, float, float] | None = None,
    points: bool = True,
) -> None:
    """Show ``shown`` in the existing result layers (keeps user styling and layer order).

    Above :data:`LARGE_RESULT` rows only the boxes in ``view`` are drawn; ``points=False``
    leaves the points layer alone (only the visible region changed).
    """
    from napari_yolocell.shell.layers import COLORMAP

    drawn, mode = boxes_in_view(shown, view)
    boxes.data = list(to_layer_coords(drawn, res.plane_shape)[1])
    boxes.features = pd.DataFrame(
        {
            "confidence": drawn["confidence"].to_numpy(float),
            "class": drawn["class"].to_numpy(np.int64),
        }
    )
    boxes.metadata[BOXES_KEY] = mode
    # A layer created empty has a constant colour; switch it to the confidence colormap.
    if len(drawn):
        if boxes.edge_color_mode != "colormap":
            boxes.edge_color = "confidence"
            boxes.edge_colormap = COLORMAP
            boxes.edge_contrast_limits = (0.0, 1.0)
        boxes.refresh_colors()
    boxes.name = boxes_name(res.source, len(drawn), len(shown), mode)
    boxes.metadata["conf"] = conf
    if not points:
        return
    nuclei.data = to_layer_coords(shown, res.plane_shape)[0]
    nuclei.features = pd.DataFrame(
        {
            "confidence": shown["confidence"].to_numpy(float),
            "class": shown["class"].to_numpy(np.int64),
        }
    )
    if len(shown):
        if nuclei.face_color_mode != "colormap":
            nuclei.face_color = "confidence"
            nuclei.face_colormap = COLORMAP
            nuclei.face_contrast_limits = (0.0, 1.0)
        nuclei.refresh_colors()
    nuclei.metadata["conf"] = conf
    nuclei.name = result_names(res.source, len(shown))[1]


def _wrap(*labels: Label) -> None:
    """Let long messages wrap at the dock's width instead of widening it."""
    from qtpy.QtWidgets import QSizePolicy

    for label in labels:
        label.native.setWordWrap(True)
        label.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)


def _show_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def _show_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)
