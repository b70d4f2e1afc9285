"""napari dock widget: make a YOLO dataset from annotations, review one, train and evaluate.

Five tabs, each a thin shell over the core:

- **Export**: image layer + annotation layer (Shapes, Points with a diameter, or Labels), plus
  optionally a Points layer of clicked nuclei (box deletions in one layer, added nuclei in
  another: both go into one export) and an "annotated region" Shapes layer (every region is
  exported, each a source of its own) ->
  :func:`~napari_yolocell.training.dataset.samples_from_annotations` (conversion and checks)
  -> :func:`~napari_yolocell.training.dataset.export_dataset`. A folder that already holds a
  dataset is added to (one image after another into one fine-tune); ticking "replace" starts
  it again;
- **Import**: a YOLO dataset -> Image + Shapes layers for review
  (:func:`~napari_yolocell.shell.layers.import_dataset_layers`);
- **Fine-tune**: a few minutes of few-shot training from a bundled model, kept only if it
  beats its start on the held-out corrections (:mod:`~napari_yolocell.shell.finetune_panel`);
- **Train**: :func:`~napari_yolocell.training.train.train` with a live loss / mAP50 plot, Cancel
  (keeps a resumable ``last.pt``) and Resume; the new ``best.pt`` is added to every Detect
  widget's model list through :func:`~napari_yolocell.shell.session.register_session_model`;
- **Evaluate**: :func:`~napari_yolocell.analysis.evaluate.compare_models` table and plots.

Long steps run through the shared :mod:`~napari_yolocell.shell._worker` (progress, Cancel, one
outcome), one task per tab at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    Select,
    SpinBox,
    Table,
)
from qtpy.QtWidgets import QTabWidget, QVBoxLayout, QWidget

from napari_yolocell.analysis.plots import PLOTS, plot_training_history
from napari_yolocell.io.geojson import read_geojson_annotations
from napari_yolocell.shell import _qt, session
from napari_yolocell.shell._worker import Outcome, Progress, Task, start
from napari_yolocell.shell.finetune_panel import FinetunePanel
from napari_yolocell.shell.help import apply_tooltips
from napari_yolocell.shell.layers import geojson_to_layers, import_dataset_layers
from napari_yolocell.shell.settings import persist
from napari_yolocell.training.dataset import (
    Sample,
    check_out_folder,
    export_dataset,
    is_dataset,
    merge_samples,
    samples_from_annotations,
)
from napari_yolocell.training.train import ARCHITECTURES, TrainResult, train

if TYPE_CHECKING:
    import napari

__all__ = ["TrainWidget", "run_training"]

CHECKPOINT = "checkpoint (.pt below)"
#: A trained model scoring below this mAP50 found (almost) nothing: it is not added to the
#: Detect widget on its own (the user can still add its best.pt there).
MIN_MAP50 = 0.01


def run_training(
    kwargs: dict[str, Any], report: Callable[..., None], cancel: threading.Event
) -> TrainResult:
    """Train with ``kwargs`` (the worker thread's part): epochs and batches become reports.

    An epoch is reported as ``(epoch, epochs, "", info)`` with the ``on_epoch`` dict, a batch
    as ``(epoch - 1, epochs, "epoch e/E, batch b/B")``; Cancel is polled after each batch.
    """

    def on_epoch(info: dict[str, Any]) -> None:
        if not info.get("final"):  # the re-validation of best.pt is not a new epoch
            report(int(info["epoch"]), int(info["epochs"]), "", info)

    def on_batch(info: dict[str, Any]) -> None:
        text = f"epoch {info['epoch']}/{info['epochs']}, batch {info['batch']}/{info['batches']}"
        report(int(info["epoch"]) - 1, int(info["epochs"]), text)

    return train(**kwargs, on_epoch=on_epoch, on_batch=on_batch, should_stop=cancel.is_set)


class TrainWidget(QWidget):
    """Export, import, train and evaluate YOLO nucleus detectors from napari.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.tasks: dict[str, Task] = {}
        self.history: list[dict[str, Any]] = []
        self.last_result: Any = None
        self.last_report: Any = None
        self.last_evaluation: tuple[Any, list[dict[str, Any]]] | None = None

        self.tabs = QTabWidget()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        self._containers: list[Container] = []
        self._build_export()
        self._build_import()
        self.finetune = FinetunePanel(self)
        self._build_train()
        self._build_evaluate()
        _qt.wrap_labels(self.ex_label, self.im_label, self.tr_label, self.ev_label)
        apply_tooltips(self)
        self._on_annotations_changed()
        persist(
            "train",
            {
                name: getattr(self, name)
                for name in (
                    "ex_diameter ex_tile ex_overlap ex_train ex_val ex_test tr_epochs "
                    "tr_imgsz tr_batch tr_patience tr_device tr_out"
                ).split()
            },
        )
        for event in ("inserted", "removed", "reordered"):
            getattr(self.viewer.layers.events, event).connect(self.reset_choices)
        session.watch_models(self)  # hear about models trained or added in this session

    def _add_tab(self, widgets: list[Any], title: str) -> Container:
        container = Container(widgets=widgets)
        self._containers.append(container)
        self.tabs.addTab(container.native, title)
        return container

    def reset_choices(self, _event=None) -> None:
        """Refresh the layer and model lists (napari calls this when layers change)."""
        for container in self._containers:
            container.reset_choices()

    def refresh_models(self) -> None:
        """Re-read the model lists (called when a model is added in this session)."""
        self.tr_model.reset_choices()
        self.ev_models.reset_choices()
        self.finetune.base.reset_choices()

    # ------------------------------------------------------------------ tasks

    def _start(self, key: str, fn, on_done, desc: str, total: int = 0, on_progress=None):
        """Run ``fn(report, cancel)`` as the ``key`` task (one per tab at a time)."""
        if self._busy(key):
            _qt.show_error(f"{key} is already running")
            return None
        self.tasks[key] = start(
            fn,
            on_done,
            on_progress=on_progress,
            on_finished=self._update_buttons,
            desc=desc,
            total=total,
        )
        self._update_buttons()
        return self.tasks[key]

    def _busy(self, key: str) -> bool:
        return key in self.tasks and self.tasks[key].running

    @property
    def running(self) -> bool:
        """Whether any export / import / training / evaluation task is running."""
        return any(task.running for task in self.tasks.values())

    def _update_buttons(self) -> None:
        # one training at a time, of either kind: each takes the whole CPU / GPU
        training = self._busy("train") or self._busy(FinetunePanel.KEY)
        self.train_button.enabled = not training
        self.resume_button.enabled = not training
        self.cancel_button.enabled = self._busy("train")
        self.finetune.update_buttons(training, self._busy(FinetunePanel.KEY))
        self.export_button.enabled = not self._busy("export")
        self.import_button.enabled = not self._busy("import")
        self.evaluate_button.enabled = not self._busy("evaluate")

    def _failed(self, label: Label, what: str, outcome: Outcome) -> bool:
        """Report a failed task on ``label`` and in napari; True when it failed."""
        if outcome.error is None:
            return False
        text = _qt.error_text(outcome.error)
        label.value = f"{what.lower()} failed: {text}"
        _qt.show_error(f"{what} failed: {text}")
        return True

    # ================================================================== export

    def _build_export(self) -> None:
        self.ex_image = ComboBox(label="image", choices=lambda _w: self._layers("image"))
        self.ex_annotations = ComboBox(
            label="annotations",
            choices=lambda _w: self._layers("shapes", "points", "labels"),
            tooltip="Shapes (boxes / polygons), Points (clicked centres) or Labels",
        )
        self.ex_points = ComboBox(
            label="and clicked nuclei",
            choices=lambda _w: [("none", None), *self._layers("points")],
            tooltip="a Points layer of nuclei you added (boxes of 'point diameter px'); "
            "a point inside a box of the annotations is the same nucleus",
        )
        self.ex_diameter = FloatSpinBox(
            label="point diameter px", value=20.0, min=1.0, max=1000.0, visible=False
        )
        self.ex_region = ComboBox(
            label="annotated region",
            choices=lambda _w: [("none: the whole image", None), *self._layers("shapes")],
        )
        self.ex_out = FileEdit(label="output folder", mode="d")
        self.ex_tile = SpinBox(label="tile", value=640, min=32, max=4096, step=32)
        self.ex_overlap = SpinBox(label="overlap", value=64, min=0, max=2048)
        self.ex_train = FloatSpinBox(label="train fraction", value=0.7, min=0.0, max=1.0, step=0.05)
        self.ex_val = FloatSpinBox(label="val fraction", value=0.2, min=0.0, max=1.0, step=0.05)
        self.ex_test = FloatSpinBox(label="test fraction", value=0.1, min=0.0, max=1.0, step=0.05)
        self.ex_overwrite = CheckBox(
            text="replace the folder's dataset",
            value=False,
            tooltip="unticked, an export into a folder holding a dataset adds to it",
        )
        self.export_button = PushButton(text="Export dataset")
        self.ex_label = Label(value="")
        self.ex_geojson = FileEdit(
            label="QuPath GeoJSON",
            mode="r",
            filter="*.geojson *.json",
            tooltip="objects exported from QuPath (File > Export objects as GeoJSON): points "
            "and polygons become annotation layers",
        )
        self.geojson_button = PushButton(text="Import QuPath GeoJSON")
        self.export_button.changed.connect(self.export)
        self.geojson_button.changed.connect(self.import_geojson)
        self.ex_annotations.changed.connect(self._on_annotations_changed)
        self.ex_points.changed.connect(self._on_annotations_changed)
        self._add_tab(
            [
                self.ex_geojson,
                self.geojson_button,
                self.ex_image,
                self.ex_annotations,
                self.ex_points,
                self.ex_diameter,
                self.ex_region,
                self.ex_out,
                self.ex_tile,
                self.ex_overlap,
                self.ex_train,
                self.ex_val,
                self.ex_test,
                self.ex_overwrite,
                self.export_button,
                self.ex_label,
            ],
            "Export",
        )

    def _on_annotations_changed(self, _value=None) -> None:
        # the box side around clicked centres: meaningless for Shapes and Labels
        ann = self.ex_annotations.value
        points = ann is not None and _qt.layer_kind(ann) == "points"
        self.ex_diameter.visible = points or self.ex_points.value is not None

    def import_geojson(self, _value=None, path: str | Path | None = None) -> list[Any]:
        """Add the points / polygons of a QuPath GeoJSON file as annotation layers."""
        from napari.layers import Layer

        path = path if path is not None else self.ex_geojson.value
        if path is None or str(path) in ("", "."):
            _qt.show_error("Cannot import: choose a GeoJSON file")
            return []
        try:
            ann = read_geojson_annotations(path)
        except (OSError, ValueError) as exc:
            self.ex_label.value = f"not imported: {_qt.error_text(exc)}"
            _qt.show_error(f"Cannot import GeoJSON: {_qt.error_text(exc)}")
            return []
        added = []
        for data, meta, kind in geojson_to_layers(ann, Path(path).stem):
            image = self.ex_image.value  # overlay the image it was drawn on
            if image is not None and image.ndim == len(image.scale):
                meta = {**meta, "scale": image.scale[-2:], "translate": image.translate[-2:]}
            added.append(self.viewer.add_layer(Layer.create(data, meta, kind)))
        if added:
            self.ex_annotations.value = added[-1]  # polygons when there are any
        self.ex_label.value = (
            f"imported {len(ann.points)} points and {len(ann.polygons)} polygons from "
            f"{Path(path).name}"
        )
        return added

    def _layers(self, *kinds: str) -> list[tuple[str, Any]]:
        return _qt.layers_of(self.viewer, *kinds)

    def export_samples(self) -> list[Sample]:
        """Samples from the chosen image and annotation layers (checks included).

        Raises
        ------
        ValueError
            See :func:`~napari_yolocell.training.dataset.samples_from_annotations`; also when a
            layer is missing.
        """
        image, ann = self.ex_image.value, self.ex_annotations.value
        if image is None:
            raise ValueError("choose an image layer")
        if ann is None:
            raise ValueError("choose an annotation layer (Shapes, Points or Labels)")
        region = self.ex_region.value
        for layer in (ann, self.ex_points.value):
            if layer is not None and region is layer:
                raise ValueError(
                    f"{layer.name!r} cannot be both the annotations and the annotated region: "
                    "draw the region's rectangles on a Shapes layer of their own"
                )
        samples = self._layer_samples(image, ann, region)
        points = self.ex_points.value
        if points is not None and points is not ann:
            samples = merge_samples(samples, self._layer_samples(image, points, region))
        return samples

    def _layer_samples(self, image: Any, ann: Any, region: Any) -> list[Sample]:
        """Samples of one annotation layer (inside the regions, if any)."""
        kind = _qt.layer_kind(ann)
        regions = None
        if region is not None:
            regions = {
                "regions": region.data,
                "region_options": {
                    "name": region.name,
                    "shape_types": region.shape_type,
                    "ann_scale": region.scale,
                    "ann_translate": region.translate,
                },
            }
        return samples_from_annotations(
            image.data[0] if image.multiscale else image.data,
            image.name,
            kind,
            ann.data[0] if kind == "labels" and ann.multiscale else ann.data,
            rgb=bool(image.rgb),
            ann_name=ann.name,
            diameter=float(self.ex_diameter.value),
            shape_types=ann.shape_type if kind == "shapes" else None,
            image_scale=image.scale,
            image_translate=image.translate,
            ann_scale=ann.scale,
            ann_translate=ann.translate,
            **(regions or {}),
        )

    def export(self, _value=None) -> Task | None:
        """Export the annotations as a YOLO dataset in a worker; returns the task or None."""
        overwrite = bool(self.ex_overwrite.value)
        try:
            hint = "tick 'replace the folder's dataset'"
            out = self.ex_out.value
            chosen = out is not None and str(out) not in ("", ".")
            if overwrite or not chosen or not is_dataset(out):  # a dataset there: add to it
                out = check_out_folder(out, overwrite, overwrite_hint=hint)
            samples = self.export_samples()
        except (ValueError, FileExistsError) as exc:
            self.ex_label.value = f"not exported: {exc}"
            _qt.show_error(f"Cannot export: {exc}")
            return None
        self.ex_label.value = "exporting..."
        kwargs = {
            "samples": samples,
            "out": out,
            "tile": int(self.ex_tile.value),
            "overlap": int(self.ex_overlap.value),
            "fractions": (self.ex_train.value, self.ex_val.value, self.ex_test.value),
            "overwrite": overwrite,
            "append": True,
        }
        return self._start(
            "export",
            lambda report, _cancel: export_dataset(**kwargs, progress=report),
            self._export_done,
            "Exporting YOLO dataset",
        )

    def _export_done(self, outcome: Outcome) -> None:
        if self._failed(self.ex_label, "Export", outcome):
            return
        report = self.last_report = outcome.value
        verb = "" if report.totals is not None else "wrote "  # appended: "added ..." follows
        text = f"{verb}{report.path}: {report.summary()}"
        if report.warnings:  # each on its own line: they say what to fix before training
            text += "\n" + "\n".join(f"\N{WARNING SIGN} {w}" for w in report.warnings)
            _qt.show_warning("; ".join(report.warnings))
        self.ex_label.value = text
        for widget in (self.im_path, self.tr_data, self.ev_data, self.finetune.data):
            widget.value = report.path
        _qt.show_info(f"YOLO dataset written to {report.path}")

    # ================================================================== import

    def _build_import(self) -> None:
        self.im_path = FileEdit(
            label="dataset folder",
            mode="d",
            tooltip="YOLO dataset folder (ultralytics or Roboflow layout) "
            "or type the path of its data.yaml",
        )
        self.im_split = ComboBox(
            label="split",
            choices=[("all", None), ("train", "train"), ("val", "val"), ("test", "test")],
        )
        self.im_max = SpinBox(label="max images", value=20, min=1, max=10_000)
        self.import_button = PushButton(text="Add to viewer")
        self.im_label = Label(value="")
        self.import_button.changed.connect(self.import_dataset)
        widgets = [self.im_path, self.im_split, self.im_max, self.import_button, self.im_label]
        self._add_tab(widgets, "Import")

    def import_dataset(self, _value=None) -> Task | None:
        """Read the dataset in a worker and add its images and boxes as layers."""
        path = self.im_path.value
        if path is None or str(path) in ("", "."):
            _qt.show_error("Cannot import: choose a dataset folder")
            return None
        self.im_label.value = "reading..."
        read = partial(
            import_dataset_layers, Path(path), self.im_split.value, int(self.im_max.value)
        )
        return self._start(
            "import", lambda _report, _cancel: read(), self._import_done, "Reading YOLO dataset"
        )

    def _import_done(self, outcome: Outcome) -> None:
        from napari.layers import Layer

        if self._failed(self.im_label, "Import", outcome):
            return
        tuples, dataset = outcome.value
        for data, meta, kind in tuples:
            self.viewer.add_layer(Layer.create(data, meta, kind))
        n_boxes = sum(len(d) for d, _, k in tuples if k == "shapes")
        shown = sum(1 for *_, k in tuples if k == "image")
        text = f"{shown} of {len(dataset.unique_images())} images added, {n_boxes} boxes"
        problems = dataset.problem_summary()
        if problems:
            text += f"; {problems}"
            _qt.show_warning(f"Dataset {dataset.root}: {problems}")
        self.im_label.value = text
        for widget in (self.tr_data, self.ev_data, self.finetune.data):
            widget.value = dataset.root

    # ================================================================== train

    def _build_train(self) -> None:
        self.tr_data = FileEdit(label="dataset", mode="d")
        self.tr_model = ComboBox(
            label="model",
            choices=lambda _w: [*ARCHITECTURES, CHECKPOINT, *session.session_models()],
            tooltip="architecture trained from scratch, or a checkpoint to fine-tune",
        )
        self.tr_weights = FileEdit(label="checkpoint .pt", mode="r", filter="*.pt")
        self.tr_epochs = SpinBox(label="epochs", value=50, min=1, max=10_000)
        self.tr_imgsz = SpinBox(label="image size", value=640, min=32, max=4096, step=32)
        self.tr_batch = SpinBox(label="batch", value=16, min=1, max=1024)
        self.tr_patience = SpinBox(label="patience", value=50, min=0, max=10_000)
        self.tr_device = ComboBox(
            label="device",
            choices=[("auto", None), ("cpu", "cpu"), ("GPU 0", "0"), ("Apple MPS", "mps")],
        )
        self.tr_out = FileEdit(label="runs folder", mode="d", value=Path.home() / "yolocell-runs")
        self.tr_name = LineEdit(
            label="run name", value="", tooltip="folder of this run (default: the model name)"
        )
        self.train_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.resume_button = PushButton(text="Resume")
        self.tr_label = Label(value="")
        self.train_button.changed.connect(self.start_training)
        self.cancel_button.changed.connect(self.cancel_training)
        self.resume_button.changed.connect(partial(self.start_training, resume=True))
        buttons = [self.train_button, self.cancel_button, self.resume_button]
        container = self._add_tab(
            [
                self.tr_data,
                self.tr_model,
                self.tr_weights,
                self.tr_epochs,
                self.tr_imgsz,
                self.tr_batch,
                self.tr_patience,
                self.tr_device,
                self.tr_out,
                self.tr_name,
                Container(widgets=buttons, layout="horizontal", labels=False),
                self.tr_label,
            ],
            "Train",
        )
        self.figure, self.canvas = _qt.figure_canvas()
        container.native.layout().addWidget(self.canvas)
        self._draw_history()

    def training_kwargs(self, resume: bool = False) -> dict[str, Any]:
        """Arguments of :func:`napari_yolocell.training.train.train` from the controls.

        Resume continues the last run of this widget (its ``last.pt``) when there is one;
        otherwise :func:`~napari_yolocell.training.train.train` finds the run under the runs
        folder (by run name, or the newest).

        Raises
        ------
        ValueError
            No dataset, or a checkpoint choice without a file.
        """
        model = self.tr_model.value
        if model == CHECKPOINT:
            weights = self.tr_weights.value
            if weights is None or not Path(weights).is_file():
                raise ValueError("choose the checkpoint (.pt) to fine-tune")
            model = str(weights)
        common = {
            "out": Path(self.tr_out.value).expanduser(),
            "name": self.tr_name.value.strip() or None,
            "device": self.tr_device.value,
        }
        if resume:
            last = getattr(self.last_result, "last", None)
            if last is not None and Path(last).is_file():
                model = str(last)
            data = self._dataset_path(required=False)
            return {"data": data, "model": model, "resume": True, **common}
        return {
            "data": self._dataset_path(),
            "model": model,
            "epochs": int(self.tr_epochs.value),
            "imgsz": int(self.tr_imgsz.value),
            "batch": int(self.tr_batch.value),
            "patience": int(self.tr_patience.value),
            **common,
        }

    def _dataset_path(self, required: bool = True) -> Path | None:
        data = self.tr_data.value
        if data is None or str(data) in ("", "."):
            if required:
                raise ValueError("choose a dataset folder (export one in the Export tab)")
            return None
        path = Path(data).expanduser()
        if required and not path.exists():
            raise ValueError(f"dataset not found: {path}")
        return path

    def start_training(self, _value=None, resume: bool = False, **overrides: Any) -> Task | None:
        """Start (or resume) training in a worker; ``overrides`` go to ``train``."""
        try:
            kwargs = {**self.training_kwargs(resume=resume), **overrides}
        except ValueError as exc:
            self.tr_label.value = f"not started: {exc}"
            _qt.show_error(f"Cannot train: {exc}")
            return None
        if not resume:
            self.history = []
            self._draw_history()
        self.tr_label.value = "resuming..." if resume else "starting..."
        return self._start(
            "train",
            partial(run_training, kwargs),
            self._train_done,
            "Training",
            total=int(kwargs.get("epochs") or self.tr_epochs.value),
            on_progress=self._on_train_progress,
        )

    def cancel_training(self, _value=None) -> None:
        """Stop after the current batch; ``last.pt`` is kept so Resume can continue."""
        if self._busy("train"):
            self.tasks["train"].cancel()
            self.tr_label.value = "stopping after this batch..."

    def _on_train_progress(self, item: Progress) -> None:
        if item.data is not None:  # a validated epoch
            self.history.append(item.data)
            self._draw_history()
        elif item.text and not self.tasks["train"].cancelled:
            self.tr_label.value = item.text

    def _draw_history(self) -> None:
        plot_training_history(self.history, self.figure)
        self.canvas.draw_idle()

    def _train_done(self, outcome: Outcome) -> None:
        if self._failed(self.tr_label, "Training", outcome):
            return
        result = self.last_result = outcome.value
        done = "cancelled" if result.cancelled else "finished"
        resume = f"; {result.last} kept: press Resume to continue" if result.cancelled else ""
        metrics = ", ".join(
            f"{k} {v:.3f}"
            for k, v in result.metrics.items()
            if k in ("precision", "recall", "mAP50", "mAP50-95")
        )
        text = f"{done}: {metrics or 'no metrics'}"
        score = result.metrics.get("mAP50")
        if result.best is None:
            text = f"{done}{resume}"
        elif score is not None and float(score) < MIN_MAP50:
            # a model that finds nothing would silently count zero nuclei in Detect
            text += (
                f"; the model found (almost) no nuclei on the validation images, so it was "
                f"not added to Detect (train longer or check the annotations; add "
                f"{result.best} there by hand to try it){resume}"
            )
            _qt.show_warning(f"Training {done} with mAP50 {float(score):.3f}: model not added")
        else:
            key = session.register_session_model(result.best)
            text += f"; {key} added to the Detect widget's models{resume}"
            _qt.show_info(f"Training {done}; model added: {key}")
        self.tr_label.value = text

    # ================================================================== evaluate

    def _build_evaluate(self) -> None:
        self.ev_data = FileEdit(label="dataset", mode="d")
        self.ev_models = Select(
            label="models",
            choices=lambda _w: session.model_choices(),
            tooltip="select one or more (Ctrl/Shift-click)",
        )
        self.ev_weights = FileEdit(label="also a .pt", mode="r", filter="*.pt")
        self.ev_split = ComboBox(
            label="split",
            choices=[("test", "test"), ("val", "val"), ("train", "train"), ("all", None)],
        )
        self.evaluate_button = PushButton(text="Evaluate")
        self.ev_label = Label(value="")
        self.ev_table = Table(value={"model": []})
        self.ev_plot = ComboBox(
            label="plot",
            choices=[
                ("precision-recall", "pr_curve"),
                ("F1 vs confidence", "f1_curve"),
                ("count error vs confidence", "count_error_curve"),
                ("predicted vs true count", "count_scatter"),
            ],
        )
        self.evaluate_button.changed.connect(self.evaluate)
        self.ev_plot.changed.connect(self._draw_evaluation)
        container = self._add_tab(
            [
                self.ev_data,
                self.ev_models,
                self.ev_weights,
                self.ev_split,
                self.evaluate_button,
                self.ev_label,
                self.ev_table,
                self.ev_plot,
            ],
            "Evaluate",
        )
        self.ev_figure, self.ev_canvas = _qt.figure_canvas()
        self._ev_layout = container.native.layout()
        self._ev_layout.addWidget(self.ev_canvas)

    def evaluate(self, _value=None, **kwargs: Any) -> Task | None:
        """Compare the selected models on the dataset in a worker; returns it or None."""
        # imported here: evaluation loads the detection engine and its runtimes (slow)
        from napari_yolocell.analysis.evaluate import compare_models

        models = list(self.ev_models.value or [])
        weights = self.ev_weights.value
        if weights is not None and Path(weights).is_file():
            models.append(str(weights))
        data = self.ev_data.value
        if not models or data is None or str(data) in ("", "."):
            _qt.show_error("Cannot evaluate: choose a dataset and at least one model")
            return None
        self.ev_label.value = f"evaluating {len(models)} model(s)..."
        args = {"models": models, "dataset": Path(data), "split": self.ev_split.value, **kwargs}
        return self._start(
            "evaluate",
            lambda report, _cancel: compare_models(**args, return_results=True, progress=report),
            self._evaluate_done,
            "Evaluating models",
        )

    def _evaluate_done(self, outcome: Outcome) -> None:
        if self._failed(self.ev_label, "Evaluation", outcome):
            return
        table, results = self.last_evaluation = outcome.value
        shown = table.round(3)
        self.ev_table.value = {c: shown[c].tolist() for c in shown.columns}
        self.ev_label.value = f"{len(table)} model(s) evaluated"
        self._draw_evaluation()

    def _draw_evaluation(self, _value=None) -> None:
        if self.last_evaluation is None:
            return
        # plots.py makes stand-alone figures: give each a fresh canvas in place of the old one
        fig, canvas = _qt.figure_canvas(PLOTS[self.ev_plot.value](self.last_evaluation[1]), 260)
        self._ev_layout.replaceWidget(self.ev_canvas, canvas)
        self.ev_canvas.setParent(None)
        self.ev_canvas.deleteLater()
        self.ev_figure, self.ev_canvas = fig, canvas
        canvas.draw_idle()
