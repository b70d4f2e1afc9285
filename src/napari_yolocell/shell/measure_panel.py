"""The Detect widget's marker panel: per-nucleus intensity of a marker image, its histogram,
a threshold (typed or automatic), and positive / negative counts per ROI.

The core does the work (:func:`~napari_yolocell.engine.measure.measure_nuclei` in a worker,
:func:`~napari_yolocell.analysis.measure.marker_threshold`,
:func:`~napari_yolocell.analysis.measure.classify_marker`,
:func:`~napari_yolocell.analysis.measure.marker_counts`); the measurements are stored in the
Detect widget's table, so the Points layer gets them as features and the GeoJSON export as
QuPath measurements and classes (``Nucleus: Positive``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, PushButton, Table

from napari_yolocell.analysis.measure import (
    check_marker_plane,
    classify_marker,
    marker_counts,
    marker_threshold,
)
from napari_yolocell.engine.measure import measure_nuclei
from napari_yolocell.io.tables import DETECTION_COLUMNS, MARKER_COUNT_COLUMNS, write_csv_atomic
from napari_yolocell.shell import _qt
from napari_yolocell.shell._worker import Outcome, Task, start

__all__ = ["MarkerPanel"]

#: The measured column of a single-channel marker image.
MEAN = "mean_c0"
TABLE_COLUMNS = [c for c in MARKER_COUNT_COLUMNS if c != "image"]


class MarkerPanel(Container):
    """Measure a marker image at the nuclei of the Detect widget ``owner`` and classify them.

    Parameters
    ----------
    owner : DetectWidget
        Provides ``viewer``, ``result()``, ``filtered()``, ``_roi_polygons(res)`` and
        ``_redraw(points=True)``.
    """

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.task: Task | None = None
        self.marker = ComboBox(
            label="marker image",
            choices=lambda _w: _qt.layers_of(owner.viewer, "image"),
            nullable=True,
            tooltip="single-channel image of the marker (e.g. the Ki67 or EdU channel), same "
            "size as the analysed image; its mean inside each nucleus is measured",
        )
        self.measure_button = PushButton(text="Measure marker")
        self.threshold = FloatSpinBox(
            label="threshold",
            value=0.0,
            min=0.0,
            max=1e12,
            step=1.0,
            tooltip="nuclei whose mean marker intensity is above this are positive",
        )
        self.auto_button = PushButton(
            text="Auto threshold (Otsu)",
            tooltip="splits the nuclei into a dim and a bright group (Otsu, on log intensities)",
        )
        self.summary = Label(value="")
        self.table = Table(value={c: [] for c in TABLE_COLUMNS}, visible=False)
        self.export_button = PushButton(text="Export marker counts CSV...")
        super().__init__(
            widgets=[
                _qt.heading("Measure a marker"),
                self.marker,
                self.measure_button,
                self.threshold,
                self.auto_button,
                self.summary,
                self.table,
                self.export_button,
            ]
        )
        self.figure, self.canvas = _qt.figure_canvas(min_height=160)
        self.native.layout().insertWidget(6, self.canvas)
        self.canvas.setVisible(False)
        self.table.native.setMaximumHeight(140)
        _qt.fit_table(self.table)
        _qt.wrap_labels(self.summary)
        self.measure_button.changed.connect(self.measure)
        self.auto_button.changed.connect(self.auto_threshold)
        self.threshold.changed.connect(self.classify)
        self.export_button.changed.connect(self._export_dialog)

    # ------------------------------------------------------------------ measuring

    @property
    def running(self) -> bool:
        """Whether a measurement is running."""
        return self.task is not None and self.task.running

    def measure(self, _value=None) -> Task | None:
        """Measure the marker at every nucleus of the shown run, in a worker."""
        res, layer = self.owner.result(), self.marker.value
        if res is None or layer is None:
            _qt.show_error("Cannot measure: run the detection and choose the marker image")
            return None
        data = list(layer.data) if layer.multiscale else layer.data
        full = data[0] if layer.multiscale else data
        if layer.rgb:
            _qt.show_error("Cannot measure an RGB marker: split it into channels first")
            return None
        table = res.df[[c for c in res.df.columns if c in DETECTION_COLUMNS or c == "small"]]
        planes = table["plane"].nunique()
        try:
            check_marker_plane(full.shape, _image_yx(self.owner, res), layer.name, planes)
        except ValueError as exc:
            self.summary.value = f"Cannot measure: {exc}"
            _qt.show_error(f"Cannot measure: {exc}")
            return None
        self.summary.value = f"measuring {layer.name} in {len(table):,} nuclei..."
        self.measure_button.enabled = False
        self.task = start(
            lambda _report, _cancel: _measure_one_plane(data, table),
            self._measured,
            on_finished=lambda: setattr(self.measure_button, "enabled", True),
            desc=f"Measuring {layer.name}",
        )
        return self.task

    def _measured(self, outcome: Outcome) -> None:
        res = self.owner.result()
        if outcome.error is not None or res is None:
            text = _qt.error_text(outcome.error) if outcome.error else "the run is gone"
            self.summary.value = f"measuring failed: {text}"
            _qt.show_error(f"Measuring failed: {text}")
            return
        measured = outcome.value
        measured.attrs = dict(res.df.attrs)
        res.df = measured
        self.auto_threshold()

    def values(self) -> np.ndarray:
        """Mean marker intensity of the nuclei shown (at the slider's confidence)."""
        shown = self.owner.filtered()
        return shown[MEAN].to_numpy(float) if MEAN in shown.columns else np.zeros(0)

    def auto_threshold(self, _value=None) -> float | None:
        """Set the threshold by Otsu's method on the shown nuclei (classifies them)."""
        values = self.values()
        if not len(values):
            _qt.show_error("Measure the marker first")
            return None
        t = marker_threshold(values, "otsu")
        if self.threshold.value == t:
            self.classify()
        self.threshold.value = t
        return t

    # ------------------------------------------------------------------ classifying

    def classify(self, _value=None) -> None:
        """Classify the measured nuclei at the threshold; update layers, table and plot."""
        res = self.owner.result()
        if res is None or MEAN not in res.df.columns:
            return
        res.df = classify_marker(res.df, 0, float(self.threshold.value))
        self.owner._redraw(points=True)  # the points get the measurements as features

    def counts(self) -> pd.DataFrame:
        """Positive / negative nuclei per plane and ROI (``MARKER_COUNT_COLUMNS``)."""
        res = self.owner.result()
        if res is None or "marker" not in res.df.columns:
            return pd.DataFrame(columns=MARKER_COUNT_COLUMNS)
        polys, names = self.owner._roi_polygons(res)
        shown = self.owner.filtered()
        return marker_counts(shown, res.source, polys or None, names or None, res.n_planes)

    def refresh(self) -> None:
        """Show the counts and the histogram (the owner calls this when its counts change)."""
        table = self.counts()
        self.table.visible = bool(len(table))
        if not len(table):
            return
        self.table.value = {c: table[c].tolist() for c in TABLE_COLUMNS}
        whole = table[(table["roi"] == "all")].groupby("class")["count"].sum()
        pos, neg = int(whole.get("positive", 0)), int(whole.get("negative", 0))
        share = pos / max(1, pos + neg)
        self.summary.value = (
            f"{pos:,} positive, {neg:,} negative ({share:.0%} positive) "
            f"at threshold {self.threshold.value:.4g}"
        )
        self._draw(self.values(), float(self.threshold.value))

    def _draw(self, values: np.ndarray, threshold: float) -> None:
        self.figure.clear()
        ax = self.figure.add_subplot()
        finite = values[np.isfinite(values) & (values > 0)]
        if len(finite):
            bins = np.geomspace(finite.min(), finite.max() * 1.0001, 40)
            ax.hist(finite, bins=bins, color="0.6")
            ax.set_xscale("log")
            _sparse_log_ticks(ax)
        ax.axvline(threshold, color="tab:red", label="threshold")
        ax.set_xlabel("mean marker intensity per nucleus")
        ax.set_ylabel("nuclei")
        ax.legend(loc="upper right", fontsize="small")
        self.canvas.setVisible(True)
        self.canvas.draw_idle()

    # ------------------------------------------------------------------ export

    def export_counts(self, path) -> Any:
        """Write the marker counts CSV (``MARKER_COUNT_COLUMNS``), atomically."""
        table = self.counts()
        if not len(table):
            raise ValueError("nothing to export: measure the marker first")
        return write_csv_atomic(table, path)

    def _export_dialog(self, _value=None) -> None:
        res = self.owner.result()
        name = f"{res.source}_marker_counts.csv" if res is not None else "marker_counts.csv"
        path = _qt.save_file_dialog(self.native, "Export marker counts", name, "CSV (*.csv)")
        if not path:
            return
        try:
            _qt.show_info(f"Wrote {self.export_counts(path)}")
        except (OSError, ValueError) as exc:
            _qt.show_error(f"Export failed: {exc}")


def _sparse_log_ticks(ax: Any) -> None:
    """At most ~4 labelled ticks on a log x axis, none on minor ticks (they overlapped)."""
    from matplotlib.ticker import LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(numticks=4))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(labelsize="small")


def _measure_one_plane(marker: Any, table: pd.DataFrame) -> pd.DataFrame:
    """Measure a 2-D ``marker`` at nuclei found in one plane (of any number)."""
    out = measure_nuclei(marker, table.assign(plane=0), rgb=False)
    out["plane"] = table["plane"].to_numpy()
    return out


def _image_yx(owner: Any, res: Any) -> tuple[int, int]:
    """Full-resolution (height, width) of the analysed image of ``res``."""
    layer = owner.viewer.layers[res.source] if res.source in owner.viewer.layers else None
    if layer is None:
        return (-1, -1)
    full = layer.data[0] if layer.multiscale else layer.data
    return tuple(full.shape[-3:-1] if layer.rgb else full.shape[-2:])
