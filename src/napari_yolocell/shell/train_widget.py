"""napari dock widget: make a YOLO dataset from annotations, review one, train and evaluate.

Four tabs, each a thin shell over the core:

- **Export**: image layer + annotation layer (Shapes, Points with a diameter, or Labels) ->
  :func:`~napari_yolocell.training.dataset.export_dataset` (:func:`layers_to_samples` does the
  napari-free conversion and the checks);
- **Import**: a YOLO dataset -> Image + Shapes layers for review
  (:func:`import_dataset_layers`);
- **Train**: :func:`~napari_yolocell.training.train.train` with a live loss / mAP50 plot, Cancel (keeps a
  resumable ``last.pt``) and Resume; the new ``best.pt`` is added to every Detect widget's
  model list through :func:`~napari_yolocell.shell.detect_widget.register_session_model`;
- **Evaluate**: :func:`~napari_yolocell.analysis.evaluate.compare_models` table and plots.

Long steps run in napari ``thread_worker``\\ s. The core reports progress through callbacks in
its own thread; :func:`pump` runs such a function in a helper thread and turns the callbacks
into the worker's ``yielded`` values, which napari delivers in the GUI thread.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
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

from napari_yolocell.shell.detect_widget import _wrap
from napari_yolocell.shell.layers import LayerDataTuple, to_table_coords, transform_coords
from napari_yolocell.training.annotations import (
    boxes_from_labels,
    boxes_from_points,
    boxes_from_shapes,
)
from napari_yolocell.training.dataset import Sample
from napari_yolocell.training.train import ARCHITECTURES

if TYPE_CHECKING:
    import napari

__all__ = [
    "Outcome",
    "TrainWidget",
    "import_dataset_layers",
    "layers_to_samples",
    "pump",
]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint (.pt below)"
LOSS_KEYS = ("box_loss", "cls_loss", "dfl_loss")

# --------------------------------------------------------------------------- helpers


@dataclass
class Outcome:
    """Return value of :func:`pump`: the function's result, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None


def _post(messages: queue.Queue, name: str, *args: Any) -> None:
    messages.put((name, args[0] if len(args) == 1 else args))


def pump(
    fn: Callable[..., Any], callbacks: Sequence[str] = (), **kwargs: Any
) -> Generator[tuple[str, Any], None, Outcome]:
    """Run ``fn(**kwargs)`` in a helper thread; yield its callback calls, return its outcome.

    Each name in ``callbacks`` is passed to ``fn`` as a keyword argument whose value is a
    callable; every call of it is yielded as ``(name, argument)``. Used as a napari
    ``thread_worker`` generator, this brings progress reported from deep inside the core (an
    ultralytics epoch, an export step) to the GUI thread without the core knowing about Qt.
    Exceptions are returned in :class:`Outcome`, never raised (superqt would turn a
    ``RuntimeError`` into a bare warning).
    """
    messages: queue.Queue = queue.Queue()
    finished = object()
    outcome = Outcome()
    for name in callbacks:
        kwargs[name] = partial(_post, messages, name)

    def target() -> None:
        try:
            outcome.value = fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread
            log.debug("%s failed", getattr(fn, "__name__", fn), exc_info=True)
            outcome.error = exc
        finally:
            messages.put(finished)

    thread = threading.Thread(target=target, name="yolocell-pump", daemon=True)
    thread.start()
    while (item := messages.get()) is not finished:
        yield item
    thread.join()
    return outcome


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "image"


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return (
        text
        if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError))
        else f"{type(exc).__name__}: {text}"
    )


def _show_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def _show_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def _show_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


# --------------------------------------------------------------------------- export (core side)


def layers_to_samples(
    image: Any,
    image_name: str,
    kind: str,
    annotations: Any,
    *,
    rgb: bool = False,
    diameter: float = 20.0,
    shape_types: Sequence[str] | None = None,
    image_scale: Sequence[float] | None = None,
    image_translate: Sequence[float] | None = None,
    ann_scale: Sequence[float] | None = None,
    ann_translate: Sequence[float] | None = None,
    ann_name: str = "annotations",
) -> list[Sample]:
    """One :class:`~napari_yolocell.training.dataset.Sample` per annotated plane of an image.

    Parameters
    ----------
    image : array-like
        Full-resolution image data: ``(..., Y, X)`` or ``(..., Y, X, 3|4)`` when ``rgb``.
    image_name : str
        File-name stem of the written tiles (``_p<k>`` is appended per plane of a stack).
    kind : {"shapes", "points", "labels"}
        Annotation layer type.
    annotations : list of arrays, array
        ``Shapes.data``, ``Points.data`` or ``Labels.data``, in napari data coordinates.
    diameter : float
        Nucleus diameter (image pixels) for the square box around each clicked point.
    shape_types : sequence of str, optional
        ``Shapes.shape_type`` (lines and paths are rejected).
    image_scale, image_translate, ann_scale, ann_translate : sequence of float, optional
        Layer transforms; annotations are mapped into image pixels through world coordinates.

    Raises
    ------
    ValueError
        Empty annotation layer, dimensionality / shape not matching the image, no annotation
        inside the image, or lines/paths in a Shapes layer.
    """
    shape = tuple(int(n) for n in (image.shape[:-1] if rgb else image.shape))
    ndim = len(shape)
    plane_shape = shape[:-2]
    if kind == "labels":
        labels = annotations
        if tuple(labels.shape) != shape:
            raise ValueError(
                f"annotation layer {ann_name!r} has shape {tuple(labels.shape)} "
                f"but the image has {shape}: paint the labels on this image"
            )
        per_plane = {}
        for index in np.ndindex(*plane_shape):
            boxes = boxes_from_labels(np.asarray(labels[index]))
            if len(boxes):
                per_plane[np.ravel_multi_index(index, plane_shape) if plane_shape else 0] = boxes
        if not per_plane:
            raise ValueError(f"annotation layer {ann_name!r} is empty: paint nuclei first")
    else:
        items = list(annotations) if kind == "shapes" else np.asarray(annotations)
        if len(items) == 0:
            what = "draw boxes around nuclei" if kind == "shapes" else "click nuclei"
            raise ValueError(f"annotation layer {ann_name!r} is empty: {what} first")
        ann_ndim = np.asarray(items[0]).shape[-1]
        if ann_ndim != ndim:
            raise ValueError(
                f"annotation layer {ann_name!r} is {ann_ndim}-D but the image is "
                f"{ndim}-D {shape}: annotate on a layer matching the image"
            )
        if kind == "shapes":
            types = list(shape_types) if shape_types is not None else ["rectangle"] * len(items)
            if any(t in ("line", "path") for t in types):
                raise ValueError(
                    f"annotation layer {ann_name!r} holds lines or paths: use "
                    "rectangles, ellipses or polygons around nuclei"
                )
            verts = [
                transform_coords(v, ann_scale, ann_translate, image_scale, image_translate)
                for v in items
            ]
            planes = np.array([to_table_coords(v[:1], plane_shape)[0][0] for v in verts])
            # napari vertices sit on pixel centres; boxes are by pixel edges (+0.5)
            boxes = boxes_from_shapes([v[:, -2:] for v in verts]) + 0.5
        else:
            coords = transform_coords(items, ann_scale, ann_translate, image_scale, image_translate)
            planes, yx = to_table_coords(coords, plane_shape)
            boxes = boxes_from_points(yx, diameter)  # to_table_coords added the +0.5
        per_plane = {int(p): boxes[planes == p] for p in np.unique(planes)}
    h, w = shape[-2:]
    inside = sum(
        int(np.sum((b[:, 2] > 0) & (b[:, 3] > 0) & (b[:, 0] < h) & (b[:, 1] < w)))
        for b in per_plane.values()
    )
    if inside == 0:
        raise ValueError(
            f"none of the annotations of {ann_name!r} lies inside the {h} x {w} "
            "image: check the layers' scale and translate"
        )
    samples = []
    base = _safe_name(image_name)
    for plane, boxes in sorted(per_plane.items()):
        index = np.unravel_index(plane, plane_shape) if plane_shape else ()
        pixels = np.asarray(image[index])
        name = f"{base}_p{plane}" if plane_shape else base
        samples.append(Sample(image=pixels, boxes=boxes, name=name))
    return samples


def import_dataset_layers(
    path: str | Path, split: str | None = None, max_images: int = 20
) -> tuple[list[LayerDataTuple], Any]:
    """Image + Shapes LayerDataTuples for the first images of a YOLO dataset.

    Parameters
    ----------
    path : str or Path
        Dataset folder or its ``data.yaml``.
    split : str, optional
        ``train``, ``val`` or ``test``; None = all.
    max_images : int
        At most this many images are loaded (review, not bulk loading).

    Returns
    -------
    layers : list of LayerDataTuple
    dataset : YoloDataset
        With ``problems`` (orphan labels, bad lines...) to report.
    """
    from napari_yolocell.io.yolo import SPLITS, read_yolo_dataset, to_napari_layers

    dataset = read_yolo_dataset(path, splits=(split,) if split else SPLITS, warn=False)
    layers: list[LayerDataTuple] = []
    seen: set[Path] = set()
    for sample in dataset:
        # A split may reuse another's folder (our exports point val at train when val is
        # empty): show each image once.
        key = Path(sample.image_path).resolve()
        if key in seen:
            continue
        seen.add(key)
        layers += to_napari_layers(sample)
        if len(seen) >= max_images:
            break
    return layers, dataset


def _problem_text(dataset) -> str:
    if not dataset.problems:
        return ""
    kinds: dict[str, int] = {}
    for p in dataset.problems:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    first = dataset.problems[0].message
    listing = ", ".join(f"{n} {k}" for k, n in kinds.items())
    return f"{len(dataset.problems)} problem(s) ({listing}); first: {first}"


# --------------------------------------------------------------------------- widget


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
        self._workers: dict[str, Any] = {}
        self._pbars: dict[str, Any] = {}
        self._stop: threading.Event | None = None
        self._last_run: Path | None = None
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
        self._build_train()
        self._build_evaluate()
        _wrap(self.ex_label, self.im_label, self.tr_label, self.ev_label)
        for event in ("inserted", "removed", "reordered"):
            getattr(self.viewer.layers.events, event).connect(self.reset_choices)
        from napari_yolocell.shell.detect_widget import _WIDGETS

        _WIDGETS.add(self)  # hear about models trained or added in this session

    def _add_tab(self, container: Container, title: str) -> None:
        self._containers.append(container)
        self.tabs.addTab(container.native, title)

    def reset_choices(self, _event=None) -> None:
        """Refresh the layer and model lists (napari calls this when layers change)."""
        for container in self._containers:
            container.reset_choices()

    def refresh_models(self) -> None:
        """Re-read the model lists (called when a model is added in this session)."""
        self.tr_model.reset_choices()
        self.ev_models.reset_choices()

    # ------------------------------------------------------------------ layer choices

    def _layers_of(self, *types: str) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers if _layer_kind(layer) in types]

    # ------------------------------------------------------------------ workers

    def _start(
        self,
        key: str,
        fn,
        callbacks: Sequence[str],
        on_message,
        on_done,
        desc: str,
        total: int = 0,
        **kwargs,
    ):
        """Run ``fn`` through :func:`pump` in a napari worker; one worker per ``key``."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if key in self._workers:
            _show_error(f"{key} is already running")
            return None
        worker = create_worker(pump, fn, tuple(callbacks), _start_thread=False, **kwargs)
        worker.yielded.connect(on_message)
        worker.returned.connect(on_done)
        worker.finished.connect(partial(self._finished, key))
        self._workers[key] = worker
        self._pbars[key] = progress(total=total, desc=desc)
        worker.start()
        return worker

    def _finished(self, key: str) -> None:
        self._workers.pop(key, None)
        pbar = self._pbars.pop(key, None)
        if pbar is not None:
            pbar.close()
        self._update_buttons()

    def _progress(self, key: str, done: int, total: int) -> None:
        pbar = self._pbars.get(key)
        if pbar is None:
            return
        if pbar.total != total:
            pbar.total = total
        pbar.update(done - pbar.n)

    @property
    def running(self) -> bool:
        """Whether any export / import / training / evaluation worker is running."""
        return bool(self._workers)

    def _update_buttons(self) -> None:
        training = "train" in self._workers
        self.train_button.enabled = not training
        self.resume_button.enabled = not training
        self.cancel_button.enabled = training
        self.export_button.enabled = "export" not in self._workers
        self.import_button.enabled = "import" not in self._workers
        self.evaluate_button.enabled = "evaluate" not in self._workers

    # ================================================================== export

    def _build_export(self) -> None:
        self.ex_image = ComboBox(label="image", choices=lambda _w: self._layers_of("image"))
        self.ex_annotations = ComboBox(
            label="annotations",
            choices=lambda _w: self._layers_of("shapes", "points", "labels"),
            tooltip="Shapes (boxes / polygons), Points (clicked centres) or Labels",
        )
        self.ex_diameter = FloatSpinBox(
            label="point diameter px",
            value=20.0,
            min=1.0,
            max=1000.0,
            tooltip="box side around each point",
        )
        self.ex_out = FileEdit(label="output folder", mode="d")
        self.ex_tile = SpinBox(label="tile", value=640, min=32, max=4096, step=32)
        self.ex_overlap = SpinBox(label="overlap", value=64, min=0, max=2048)
        self.ex_train = FloatSpinBox(label="train fraction", value=0.7, min=0.0, max=1.0, step=0.05)
        self.ex_val = FloatSpinBox(label="val fraction", value=0.2, min=0.0, max=1.0, step=0.05)
        self.ex_test = FloatSpinBox(label="test fraction", value=0.1, min=0.0, max=1.0, step=0.05)
        self.ex_overwrite = CheckBox(text="overwrite a non-empty folder", value=False)
        self.export_button = PushButton(text="Export dataset")
        self.ex_label = Label(value="")
        self.export_button.changed.connect(self.export)
        self._add_tab(
            Container(
                widgets=[
                    self.ex_image,
                    self.ex_annotations,
                    self.ex_diameter,
                    self.ex_out,
                    self.ex_tile,
                    self.ex_overlap,
                    self.ex_train,
                    self.ex_val,
                    self.ex_test,
                    self.ex_overwrite,
                    self.export_button,
                    self.ex_label,
                ]
            ),
            "Export",
        )

    def export_samples(self) -> list[Sample]:
        """Samples from the chosen image and annotation layers (checks included).

        Raises
        ------
        ValueError
            See :func:`layers_to_samples`; also when a layer is missing.
        """
        image, ann = self.ex_image.value, self.ex_annotations.value
        if image is None:
            raise ValueError("choose an image layer")
        if ann is None:
            raise ValueError("choose an annotation layer (Shapes, Points or Labels)")
        data = image.data[0] if image.multiscale else image.data
        kind = _layer_kind(ann)
        ann_data = ann.data[0] if kind == "labels" and ann.multiscale else ann.data
        return layers_to_samples(
            data,
            image.name,
            kind,
            ann_data,
            rgb=bool(image.rgb),
            diameter=float(self.ex_diameter.value),
            shape_types=ann.shape_type if kind == "shapes" else None,
            image_scale=image.scale,
            image_translate=image.translate,
            ann_scale=ann.scale,
            ann_translate=ann.translate,
            ann_name=ann.name,
        )

    def _export_target(self) -> Path:
        out = self.ex_out.value
        if out is None or str(out) in ("", "."):
            raise ValueError("choose an output folder")
        out = Path(out).expanduser()
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not self.ex_overwrite.value:
            raise ValueError(
                f"{out} is not empty: choose an empty folder or tick 'overwrite a non-empty folder'"
            )
        return out

    def export(self, _value=None):
        """Export the annotations as a YOLO dataset in a worker; returns the worker or None."""
        from napari_yolocell.training.dataset import export_dataset

        try:
            out = self._export_target()
            samples = self.export_samples()
        except ValueError as exc:
            self.ex_label.value = f"not exported: {exc}"
            _show_error(f"Cannot export: {exc}")
            return None
        fractions = (self.ex_train.value, self.ex_val.value, self.ex_test.value)
        self.ex_label.value = "exporting..."
        worker = self._start(
            "export",
            export_dataset,
            ["progress"],
            on_message=lambda msg: self._progress("export", *msg[1]),
            on_done=partial(self._export_done, out),
            desc="Exporting YOLO dataset",
            samples=samples,
            out=out,
            tile=int(self.ex_tile.value),
            overlap=int(self.ex_overlap.value),
            fractions=fractions,
            overwrite=bool(self.ex_overwrite.value),
        )
        self._update_buttons()
        return worker

    def _export_done(self, out: Path, outcome: Outcome) -> None:
        if outcome.error is not None:
            self.ex_label.value = f"export failed: {_error_text(outcome.error)}"
            _show_error(f"Export failed: {_error_text(outcome.error)}")
            return
        report = outcome.value
        self.last_report = report
        text = f"wrote {report.path}: {report.summary()}"
        if report.warnings:
            text += f" ({len(report.warnings)} warning(s): {report.warnings[0]})"
            _show_warning("; ".join(report.warnings))
        self.ex_label.value = text
        for widget in (self.im_path, self.tr_data, self.ev_data):
            widget.value = report.path
        _show_info(f"YOLO dataset written to {report.path}")

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
        self._add_tab(
            Container(
                widgets=[
                    self.im_path,
                    self.im_split,
                    self.im_max,
                    self.import_button,
                    self.im_label,
                ]
            ),
            "Import",
        )

    def import_dataset(self, _value=None):
        """Read the dataset in a worker and add its images and boxes as layers."""
        path = self.im_path.value
        if path is None or str(path) in ("", "."):
            _show_error("Cannot import: choose a dataset folder")
            return None
        self.im_label.value = "reading..."
        worker = self._start(
            "import",
            import_dataset_layers,
            [],
            on_message=lambda _m: None,
            on_done=self._import_done,
            desc="Reading YOLO dataset",
            path=Path(path),
            split=self.im_split.value,
            max_images=int(self.im_max.value),
        )
        self._update_buttons()
        return worker

    def _import_done(self, outcome: Outcome) -> None:
        from napari.layers import Layer

        if outcome.error is not None:
            self.im_label.value = f"import failed: {_error_text(outcome.error)}"
            _show_error(f"Import failed: {_error_text(outcome.error)}")
            return
        tuples, dataset = outcome.value
        for data, meta, kind in tuples:
            self.viewer.add_layer(Layer.create(data, meta, kind))
        n_boxes = sum(len(d) for d, _, k in tuples if k == "shapes")
        shown = sum(1 for *_, k in tuples if k == "image")
        total = len({Path(s.image_path).resolve() for s in dataset})
        text = f"{shown} of {total} images added, {n_boxes} boxes"
        problems = _problem_text(dataset)
        if problems:
            text += f"; {problems}"
            _show_warning(f"Dataset {dataset.root}: {problems}")
        self.im_label.value = text
        self.tr_data.value = dataset.root
        self.ev_data.value = dataset.root

    # ================================================================== train

    def _build_train(self) -> None:
        from napari_yolocell.shell.detect_widget import session_models

        self.tr_data = FileEdit(label="dataset", mode="d")
        self.tr_model = ComboBox(
            label="model",
            choices=lambda _w: [*ARCHITECTURES, CHECKPOINT, *session_models()],
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
        container = Container(
            widgets=[
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
                Container(
                    widgets=[self.train_button, self.cancel_button, self.resume_button],
                    layout="horizontal",
                    labels=False,
                ),
                self.tr_label,
            ]
        )
        self.figure, self.canvas = _figure_canvas()
        self._loss_ax, self._map_ax = self.figure.subplots(1, 2)
        container.native.layout().addWidget(self.canvas)
        self._add_tab(container, "Train")
        self._draw_history()

    def training_kwargs(self, resume: bool = False) -> dict[str, Any]:
        """Arguments of :func:`napari_yolocell.training.train.train` from the controls.

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
        out = Path(self.tr_out.value).expanduser()
        name = self.tr_name.value.strip() or None
        if resume:
            last = self._last_run / "weights" / "last.pt" if self._last_run else None
            if last is not None and last.is_file():
                model = str(last)
            return {
                "data": self._dataset_path(required=False),
                "model": model,
                "resume": True,
                "out": out,
                "name": name,
                "device": self.tr_device.value,
            }
        return {
            "data": self._dataset_path(),
            "model": model,
            "epochs": int(self.tr_epochs.value),
            "imgsz": int(self.tr_imgsz.value),
            "batch": int(self.tr_batch.value),
            "patience": int(self.tr_patience.value),
            "device": self.tr_device.value,
            "out": out,
            "name": name,
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

    def start_training(self, _value=None, resume: bool = False, **overrides: Any):
        """Start (or resume) training in a worker; ``overrides`` go to ``train``."""
        from napari_yolocell.training.train import train

        try:
            kwargs = {**self.training_kwargs(resume=resume), **overrides}
        except ValueError as exc:
            self.tr_label.value = f"not started: {exc}"
            _show_error(f"Cannot train: {exc}")
            return None
        self._stop = threading.Event()
        if not resume:
            self.history = []
            self._draw_history()
        self.tr_label.value = "resuming..." if resume else "starting..."
        epochs = int(kwargs.get("epochs") or self.tr_epochs.value)
        worker = self._start(
            "train",
            train,
            ["on_epoch", "on_batch"],
            on_message=self._on_train_message,
            on_done=self._train_done,
            desc="Training",
            total=epochs,
            should_stop=self._stop.is_set,
            **kwargs,
        )
        self._update_buttons()
        return worker

    def cancel_training(self, _value=None) -> None:
        """Stop after the current batch; ``last.pt`` is kept so Resume can continue."""
        if self._stop is not None:
            self._stop.set()
            self.tr_label.value = "stopping after this batch..."

    def _on_train_message(self, message: tuple[str, dict[str, Any]]) -> None:
        name, info = message
        if name == "on_batch":
            if not self._stop or not self._stop.is_set():
                self.tr_label.value = (
                    f"epoch {info['epoch']}/{info['epochs']}, batch "
                    f"{info['batch']}/{info['batches']}"
                )
            return
        if info.get("final"):
            return  # the re-validation of best.pt, not a new epoch
        self.history.append(info)
        self._progress("train", int(info["epoch"]), int(info["epochs"]))
        self._draw_history()

    def _draw_history(self) -> None:
        ax, bx = self._loss_ax, self._map_ax
        ax.clear()
        bx.clear()
        epochs = [h["epoch"] for h in self.history]
        for key in LOSS_KEYS:
            values = [h.get(key, np.nan) for h in self.history]
            if any(np.isfinite(values)):
                ax.plot(epochs, values, marker=".", label=key.replace("_loss", ""))
        bx.plot(
            epochs, [h.get("mAP50", np.nan) for h in self.history], marker=".", color="tab:green"
        )
        ax.set_title("training loss", fontsize=9)
        bx.set_title("val mAP50", fontsize=9)
        bx.set_ylim(0, 1)
        for axis in (ax, bx):
            axis.set_xlabel("epoch", fontsize=8)
            axis.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=7)
        self.canvas.draw_idle()

    def _train_done(self, outcome: Outcome) -> None:
        from napari_yolocell.shell.detect_widget import register_session_model

        if outcome.error is not None:
            self.tr_label.value = f"training failed: {_error_text(outcome.error)}"
            _show_error(f"Training failed: {_error_text(outcome.error)}")
            return
        result = outcome.value
        self.last_result = result
        self._last_run = Path(result.run_dir)
        if result.cancelled:
            self.tr_label.value = f"cancelled; {result.last} kept: press Resume to continue"
        metrics = ", ".join(
            f"{k} {v:.3f}"
            for k, v in result.metrics.items()
            if k in ("precision", "recall", "mAP50", "mAP50-95")
        )
        if result.best is not None:
            key = register_session_model(result.best)
            done = "cancelled" if result.cancelled else "finished"
            self.tr_label.value = (
                f"{done}: {metrics or 'no metrics'}; {key} added to the Detect widget's models"
            )
            _show_info(f"Training {done}; model added: {key}")

    # ================================================================== evaluate

    def _build_evaluate(self) -> None:
        self.ev_data = FileEdit(label="dataset", mode="d")
        self.ev_models = Select(
            label="models",
            choices=self._eval_model_choices,
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
        container = Container(
            widgets=[
                self.ev_data,
                self.ev_models,
                self.ev_weights,
                self.ev_split,
                self.evaluate_button,
                self.ev_label,
                self.ev_table,
                self.ev_plot,
            ]
        )
        self.ev_figure, self.ev_canvas = _figure_canvas()
        self._ev_layout = container.native.layout()
        self._ev_layout.addWidget(self.ev_canvas)
        self._add_tab(container, "Evaluate")

    def _eval_model_choices(self, _widget=None) -> list[tuple[str, str]]:
        from napari_yolocell.models.registry import list_models
        from napari_yolocell.shell.detect_widget import session_models

        try:
            names = [s.name for s in list_models()]
        except Exception:  # noqa: BLE001 - a broken registry still allows .pt files
            names = ["classical"]
        return [(n, n) for n in names] + [
            (f"{Path(p).parent.parent.name}/{Path(p).name}", p) for p in session_models()
        ]

    def evaluate(self, _value=None, **kwargs: Any):
        """Compare the selected models on the dataset in a worker; returns it or None."""
        from napari_yolocell.analysis.evaluate import compare_models

        models = list(self.ev_models.value or [])
        weights = self.ev_weights.value
        if weights is not None and Path(weights).is_file():
            models.append(str(weights))
        data = self.ev_data.value
        if not models or data is None or str(data) in ("", "."):
            _show_error("Cannot evaluate: choose a dataset and at least one model")
            return None
        self.ev_label.value = f"evaluating {len(models)} model(s)..."
        worker = self._start(
            "evaluate",
            compare_models,
            ["progress"],
            on_message=lambda msg: self._progress("evaluate", *msg[1]),
            on_done=self._evaluate_done,
            desc="Evaluating models",
            models=models,
            dataset=Path(data),
            split=self.ev_split.value,
            return_results=True,
            **kwargs,
        )
        self._update_buttons()
        return worker

    def _evaluate_done(self, outcome: Outcome) -> None:
        if outcome.error is not None:
            self.ev_label.value = f"evaluation failed: {_error_text(outcome.error)}"
            _show_error(f"Evaluation failed: {_error_text(outcome.error)}")
            return
        table, results = outcome.value
        self.last_evaluation = (table, results)
        shown = table.copy()
        for col in shown.columns:
            if shown[col].dtype.kind == "f":
                shown[col] = shown[col].round(3)
        self.ev_table.value = {c: shown[c].tolist() for c in shown.columns}
        self.ev_label.value = f"{len(table)} model(s) evaluated"
        self._draw_evaluation()

    def _draw_evaluation(self, _value=None) -> None:
        from napari_yolocell.analysis.plots import PLOTS

        if self.last_evaluation is None:
            return
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg

        _, results = self.last_evaluation
        # plots.py makes stand-alone figures: give each a fresh canvas in place of the old one
        fig = PLOTS[self.ev_plot.value](results)
        canvas = FigureCanvasQTAgg(fig)
        canvas.setMinimumHeight(260)
        self._ev_layout.replaceWidget(self.ev_canvas, canvas)
        self.ev_canvas.setParent(None)
        self.ev_canvas.deleteLater()
        self.ev_figure, self.ev_canvas = fig, canvas
        canvas.draw_idle()


def _layer_kind(layer) -> str:
    """``"image"``, ``"shapes"``, ``"points"``, ``"labels"`` or ``""`` for other layers."""
    from napari.layers import Image, Labels, Points, Shapes

    for cls, kind in ((Image, "image"), (Shapes, "shapes"), (Points, "points"), (Labels, "labels")):
        if isinstance(layer, cls):
            return kind
    return ""


def _figure_canvas():
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3), layout="constrained")
    canvas = FigureCanvasQTAgg(figure)
    canvas.setMinimumHeight(220)
    return figure, canvas
