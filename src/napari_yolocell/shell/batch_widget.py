"""Batch tab of the Detect widget: detect and count nuclei in every image of a folder.

:class:`BatchPanel` gathers a folder, a file pattern and an output folder, takes the model and
detection settings from the Detect widget's Image tab, and runs
:func:`~napari_yolocell.engine.batch.run_batch` in a napari worker thread. Results reach the GUI
thread through a Qt signal (``run_batch`` reports them through a callback in the worker
thread), fill a per-image table as they arrive and advance a napari progress bar.

``run_batch`` keeps every finished image in part files next to the output CSVs, so a cancelled
(or crashed) run resumes where it stopped when it is started again with the same settings.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from magicgui.widgets import Container, FileEdit, Label, LineEdit, PushButton, SpinBox, Table

from napari_yolocell.engine.batch import ERROR_COLUMNS, BatchCancelled, ImageResult, run_batch
from napari_yolocell.engine.detect import DetectParams
from napari_yolocell.io.images import IMAGE_SUFFIXES, expand_inputs
from napari_yolocell.shell.layers import write_csv_atomic

if TYPE_CHECKING:
    from qtpy.QtWidgets import QTabWidget

__all__ = [
    "COUNTS_CSV",
    "DETECTIONS_CSV",
    "ERRORS_CSV",
    "BatchJob",
    "BatchOutcome",
    "BatchPanel",
    "add_tabs",
    "batch_paths",
    "run_batch_job",
]

log = logging.getLogger(__name__)

DETECTIONS_CSV = "detections.csv"
COUNTS_CSV = "counts.csv"
ERRORS_CSV = "errors.csv"
TABLE_COLUMNS = ("image", "count", "error")


def add_tabs(container: Container, pages: Sequence[tuple[str, Container]]) -> QTabWidget:
    """Show ``pages`` as tabs of ``container`` (which must have ``labels=False``).

    The pages stay magicgui children of ``container`` (so ``reset_choices`` and attribute
    access reach them); only their Qt widgets move into a ``QTabWidget``, each in its own
    vertical scroll area (a long tab scrolls under a tab bar that stays in sight).
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea, QTabWidget

    container.extend([page for _, page in pages])
    tabs = QTabWidget()
    for title, page in pages:
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        page.native.layout().addStretch()  # rows stay together at the top of a tall tab
        scroll.setWidget(page.native)  # re-parenting takes it out of the container's layout
        # as wide as the page needs: no horizontal scrolling, nothing cut off on the right
        scroll.setMinimumWidth(
            page.native.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width()
        )
        tabs.addTab(scroll, title)
    container.native.layout().addWidget(tabs)
    container.native.layout().setContentsMargins(0, 0, 0, 0)
    return tabs


def batch_paths(folder: str | os.PathLike, pattern: str = "*.tif") -> list[Path]:
    """Image files of ``folder`` matching ``pattern`` (``**`` recurses), sorted.

    Files without an image suffix (:data:`~napari_yolocell.io.images.IMAGE_SUFFIXES`) are
    skipped, so a broad pattern never picks up the CSVs or part files of a previous run.

    Raises
    ------
    ValueError
        No folder given, or it is not a folder.
    FileNotFoundError
        Nothing matches.
    """
    if not str(folder).strip() or str(folder) == ".":
        raise ValueError("choose an input folder")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"input folder {str(root)!r} is not a folder")
    pattern = pattern.strip() or "*.tif"
    # escape the folder: brackets in a folder name are not a pattern
    try:
        found = [Path(p) for p in expand_inputs([os.path.join(glob.escape(str(root)), pattern)])]
    except FileNotFoundError:
        found = []
    images = [p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise FileNotFoundError(f"no image file matches {pattern!r} in {str(root)!r}")
    return images


@dataclass
class BatchJob:
    """Everything a batch run needs; plain values, captured when Run is pressed."""

    paths: list[Path]
    model: str
    params: DetectParams
    output: Path
    workers: int = 1
    root: Path | None = None
    backend: str = "auto"

    @property
    def csvs(self) -> dict[str, Path]:
        """``out`` / ``counts`` / ``errors`` paths for :func:`~napari_yolocell.engine.batch.run_batch`."""
        return {
            "out": self.output / DETECTIONS_CSV,
            "counts": self.output / COUNTS_CSV,
            "errors": self.output / ERRORS_CSV,
        }


@dataclass
class BatchOutcome:
    """What a batch run ended with: the results (input order), a cancellation or an error."""

    results: list[ImageResult] | None = None
    cancelled: bool = False
    error: BaseException | None = None


def run_batch_job(
    job: BatchJob,
    cancel: threading.Event | None = None,
    on_result: Callable[[int, ImageResult], None] | None = None,
) -> BatchOutcome:
    """Run ``job`` with :func:`~napari_yolocell.engine.batch.run_batch`; never raises.

    Errors come back as values: superqt's worker reduces a ``RuntimeError`` (which
    :class:`~napari_yolocell.engine.batch.BatchCancelled` is) to a warning. ``errors.csv`` is always
    written (header only when every image was read), so scripts can rely on it.
    """
    try:
        csvs = job.csvs
        results = run_batch(
            [str(p) for p in job.paths],
            job.model,
            job.params,
            **csvs,
            workers=job.workers,
            backend=job.backend,
            on_result=on_result,
            cancel=cancel,
        )
        if not csvs["errors"].exists():
            write_csv_atomic(pd.DataFrame(columns=ERROR_COLUMNS), csvs["errors"])
    except BatchCancelled:
        return BatchOutcome(cancelled=True)
    except Exception as exc:  # noqa: BLE001 - every failure is shown to the user
        log.debug("batch failed", exc_info=True)
        return BatchOutcome(error=exc)
    return BatchOutcome(results=results)


def _relay():
    """A QObject whose signal carries ``(index, ImageResult)`` from the worker thread.

    Created in the GUI thread, so connected slots run there (queued connection).
    """
    from qtpy.QtCore import QObject, Signal

    class _Relay(QObject):
        result = Signal(int, object)

    return _Relay()


class BatchPanel(Container):
    """The Batch tab: a folder of images -> detections, counts and errors CSVs.

    Parameters
    ----------
    detect : DetectWidget
        The Detect widget whose model and settings (Image tab) are used.
    """

    def __init__(self, detect: Any) -> None:
        super().__init__(labels=False)  # the settings sub-container has the labels
        self.detect = detect
        self.job: BatchJob | None = None
        self.results: list[ImageResult | None] = []
        self._worker = None
        self._cancel: threading.Event | None = None
        self._pbar = None
        self._relay = _relay()
        self._relay.result.connect(self._on_result)

        self.folder = FileEdit(label="input folder", mode="d")
        self.pattern = LineEdit(
            label="file pattern",
            value="*.tif",
            tooltip="glob inside the folder; ** recurses into subfolders, e.g. **/*.tif",
        )
        self.output = FileEdit(
            label="output folder",
            mode="d",
            tooltip=f"receives {DETECTIONS_CSV}, {COUNTS_CSV} and {ERRORS_CSV}",
        )
        self.workers = SpinBox(
            label="workers",
            value=1,
            min=1,
            max=os.cpu_count() or 1,
            tooltip="images analysed in parallel (one process each)",
        )
        self.settings_label = Label(value="model and detection settings: those of the Image tab")
        self.run_button = PushButton(text="Run batch")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.table = Table(value={c: [] for c in TABLE_COLUMNS})
        self.total_label = Label(value="")
        self.extend(
            [
                Container(widgets=[self.folder, self.pattern, self.output, self.workers]),
                self.settings_label,
                Container(
                    widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False
                ),
                self.status,
                self.table,
                self.total_label,
            ]
        )
        self.table.native.setMinimumHeight(160)
        self.table.native.horizontalHeader().setStretchLastSection(True)  # room for errors
        for label in (self.settings_label, self.status, self.total_label):
            label.native.setWordWrap(True)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)

    # ------------------------------------------------------------------ settings

    def params(self) -> DetectParams:
        """The Image tab's settings, for files: the shown confidence, full resolution.

        The CSVs are final (nothing re-filters them), so they use the slider's confidence, not
        the low run threshold of the Image tab; the pyramid level of the open image says
        nothing about other files, so level 0.
        """
        return dataclasses.replace(
            self.detect.detect_params(), conf=float(self.detect.conf.value), level=0
        )

    def make_job(self) -> BatchJob:
        """Capture the current settings.

        Raises
        ------
        ValueError, FileNotFoundError
            A missing folder, output folder or model, or no file matches.
        """
        paths = batch_paths(self.folder.value, self.pattern.value)
        out = str(self.output.value).strip()
        if not out or out == ".":
            raise ValueError("choose an output folder")
        output = Path(out).expanduser()
        if output.exists() and not output.is_dir():
            raise ValueError(f"output {str(output)!r} is a file, not a folder")
        model = self.detect.model.value
        if model is None:
            raise ValueError("no model selected (Image tab)")
        return BatchJob(
            paths=paths,
            model=str(model),
            params=self.params(),
            output=output,
            backend=str(self.detect.backend.value),
            workers=int(self.workers.value),
            root=Path(self.folder.value).expanduser(),
        )

    # ------------------------------------------------------------------ running

    @property
    def running(self) -> bool:
        """Whether a batch worker is running."""
        return self._worker is not None

    def run(self, _value=None):
        """Start the batch in a worker thread (resumes a stopped run with the same settings).

        Returns
        -------
        FunctionWorker or None
            The started worker (None when the settings are invalid or a batch is running).
        """
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self.running:
            return None
        try:
            job = self.make_job()
        except (ValueError, FileNotFoundError) as exc:
            self.status.value = f"Cannot run: {exc}"
            _show_error(f"Cannot run batch: {exc}")
            return None
        self.job = job
        self.results = [None] * len(job.paths)
        self.table.value = {
            "image": [self._display_name(p) for p in job.paths],
            "count": [""] * len(job.paths),
            "error": [""] * len(job.paths),
        }
        self._cancel = threading.Event()
        worker = create_worker(
            run_batch_job, job, self._cancel, self._relay.result.emit, _start_thread=False
        )
        worker.returned.connect(partial(self._on_returned, job))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._pbar = progress(total=len(job.paths), desc="Batch detection (images)")
        self._set_running(True)
        p = job.params
        self.settings_label.value = (
            f"model {Path(job.model).name}, confidence {p.conf:.2f}, tile {p.tile}, "
            f"IoU {p.iou:.2f}" + (f", diameter {p.diameter:g} px" if p.diameter else "")
        )
        self.status.value = f"running on {len(job.paths)} images..."
        self._update_total()
        worker.start()
        return worker

    def cancel(self, _value=None) -> None:
        """Ask the batch to stop (after the current tiles; with workers, the current images)."""
        if self._cancel is not None:
            self._cancel.set()
        if self.running:
            self.status.value = "cancelling..."

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        for widget in (self.folder, self.pattern, self.output, self.workers):
            widget.enabled = not running

    def _display_name(self, path: Path) -> str:
        root = self.job.root if self.job is not None else None
        try:
            return str(path.relative_to(root)) if root is not None else path.name
        except ValueError:
            return str(path)

    def _on_result(self, index: int, res: ImageResult) -> None:
        if not 0 <= index < len(self.results):
            return
        self.results[index] = res
        self.table.data[index, 1] = "" if res.error is not None else res.count
        self.table.data[index, 2] = res.error or ""
        if self._pbar is not None:
            self._pbar.update(1)
        self._update_total()

    def _update_total(self) -> None:
        done = [r for r in self.results if r is not None]
        ok = [r for r in done if r.error is None]
        failed = len(done) - len(ok)
        text = f"{len(done)} of {len(self.results)} images: {sum(r.count for r in ok):,} nuclei"
        if failed:
            text += f", {failed} unreadable (see {ERRORS_CSV})"
        self.total_label.value = text

    def _on_returned(self, job: BatchJob, outcome: BatchOutcome) -> None:
        n_done = sum(r is not None for r in self.results)
        if outcome.cancelled:
            self.status.value = (
                f"Cancelled with {n_done} of {len(job.paths)} images done; they are kept. "
                "Press Run batch again with the same folder, pattern, output folder, model and "
                "settings to resume where it stopped."
            )
            return
        if outcome.error is not None:
            self.status.value = f"Batch failed: {_error_text(outcome.error)}"
            _show_error(f"Batch detection failed: {_error_text(outcome.error)}")
            return
        failed = sum(r.error is not None for r in outcome.results or [])
        self.status.value = (
            f"Done: wrote {DETECTIONS_CSV}, {COUNTS_CSV} and {ERRORS_CSV} "
            f"to {job.output}" + (f" ({failed} image(s) could not be read)" if failed else "")
        )

    def _on_finished(self) -> None:
        self._worker = None
        self._cancel = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._set_running(False)

    # ------------------------------------------------------------------ results

    def results_table(self) -> pd.DataFrame:
        """Finished images so far: ``image`` (path), ``count`` (None on error), ``error``."""
        rows = [
            {"image": r.image, "count": None if r.error else r.count, "error": r.error}
            for r in self.results
            if r is not None
        ]
        return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return (
        text
        if isinstance(exc, (ValueError, FileNotFoundError, OSError))
        else f"{type(exc).__name__}: {text}"
    )


def _show_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)
