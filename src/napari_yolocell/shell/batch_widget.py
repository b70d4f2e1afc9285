"""Batch tab of the Detect widget: detect and count nuclei in every image of a folder.

:class:`BatchPanel` gathers a folder, a file pattern and an output folder, takes the model and
detection settings from a callable its owner gives it (the Detect widget's Image tab), and runs
:func:`~napari_yolocell.engine.batch.run_batch` through the shared
:mod:`~napari_yolocell.shell._worker`: each finished image arrives as a progress report, fills
its row of the table and advances the images row (the Detect tab's
:class:`~napari_yolocell.shell.progress_row.ProgressRow`: "images 2 / 12, about 1 min left");
with one worker the core also reports the tiles of the image being analysed, in a second row.

``run_batch`` keeps every finished image in part files next to the output CSVs, so a cancelled
(or crashed) run resumes where it stopped when it is started again with the same settings.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
    Table,
)

from napari_yolocell.engine.batch import (
    FOLDER_CSVS,
    SUMMARY_COLUMNS,
    ImageResult,
    folder_outputs,
    run_batch,
    summary_table,
)
from napari_yolocell.engine.detect import AMBIGUOUS_LENGTHS, DetectParams, param_help
from napari_yolocell.io.images import glob_images
from napari_yolocell.shell import _qt
from napari_yolocell.shell._worker import OneTaskAtATime, Outcome, Progress, Task, start
from napari_yolocell.shell.first_use_int8 import INT8_STEP, quantize_first
from napari_yolocell.shell.progress_row import ProgressRow
from napari_yolocell.training.quantize import read_calibration_images

__all__ = ["BatchJob", "BatchPanel", "DetectSettings", "TileProgress", "run_batch_job"]

DETECTIONS_CSV, COUNTS_CSV, ERRORS_CSV = (FOLDER_CSVS[k] for k in ("out", "counts", "errors"))
#: The Batch tab's channel choices: the CLI's --channel C / --planes for every file.
CHANNEL_CHOICES = [
    ("as each file says", None),
    ("planes (unlabelled first axis)", "planes"),
    *((f"channel {c}", c) for c in range(max(AMBIGUOUS_LENGTHS))),
]


@dataclass
class DetectSettings:
    """What a batch takes from its owner: the model, its runtime and the detection settings."""

    model: str | None
    backend: str
    params: DetectParams
    quantize: bool = True


class TileProgress(NamedTuple):
    """A tile report of the image being analysed (``Progress.data`` of a batch's reports)."""

    path: str
    done: int
    total: int


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
    quantize: bool = True


def run_batch_job(
    job: BatchJob, report: Callable[..., None], cancel: threading.Event
) -> list[ImageResult]:
    """Run ``job`` (the worker thread's part); each finished image is reported as it ends.

    Reports are ``(images done, images, "", (index, ImageResult))`` per finished image and,
    with one worker, ``(images done, images, "", TileProgress)`` per tile of the image being
    analysed (the core reports tiles only in-process). ``errors.csv`` is always written
    (header only when every image was read), so scripts can rely on it. With
    ``job.quantize``, a model without an INT8 version first gets one, calibrated on the
    batch's images (:func:`~napari_yolocell.shell.first_use_int8.quantize_first`; its steps
    are reported with ``data=INT8_STEP``).
    """
    done = [0]
    if job.quantize:
        images = lambda: read_calibration_images(job.paths, channel=job.params.channel)  # noqa: E731
        quantize_first(job.model, job.backend, images, report, cancel)

    def on_result(index: int, res: ImageResult) -> None:
        done[0] += 1
        report(done[0], len(job.paths), "", (index, res))

    def on_tile(path: str, tiles_done: int, tiles_total: int) -> None:
        report(done[0], len(job.paths), "", TileProgress(path, tiles_done, tiles_total))

    return run_batch(
        [str(p) for p in job.paths],
        job.model,
        job.params,
        **folder_outputs(job.output),
        workers=job.workers,
        backend=job.backend,
        on_result=on_result,
        tile_progress=on_tile,
        cancel=cancel,
        empty_errors=True,
    )


class BatchPanel(OneTaskAtATime, Container):
    """The Batch tab: a folder of images -> detections, counts and errors CSVs.

    Parameters
    ----------
    settings : callable
        Returns the :class:`DetectSettings` to run with, when Run is pressed.
    """

    def __init__(self, settings: Callable[[], DetectSettings]) -> None:
        super().__init__(labels=False)  # the settings sub-container has the labels
        self.settings = settings
        self.job: BatchJob | None = None
        self.results: list[ImageResult | None] = []
        self.task: Task | None = None
        self._run_again = False  # the user trusted a model file: run again once finished

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
        self.channel = ComboBox(
            label="channel",
            choices=CHANNEL_CHOICES,
            tooltip="the nuclear stain's channel in every file (--channel); 'planes': an "
            f"unlabelled first axis holds planes (--planes). {param_help('planes')}",
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
        self.progress = ProgressRow("images")
        self.tiles = ProgressRow("tiles")  # of the image being analysed (one worker only)
        self._tiles_of: str | None = None
        self.table = Table(value={c: [] for c in SUMMARY_COLUMNS})
        self.total_label = Label(value="")
        self.extend(
            [
                Container(
                    widgets=[self.folder, self.pattern, self.output, self.channel, self.workers]
                ),
                self.settings_label,
                Container(
                    widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False
                ),
                self.progress,
                self.tiles,
                self.status,
                self.table,
                self.total_label,
            ]
        )
        self.table.native.setMinimumHeight(160)
        _qt.fit_table(self.table, stretch=(0, 2))  # names and errors share the width
        _qt.wrap_labels(self.settings_label, self.status, self.total_label)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)

    # ------------------------------------------------------------------ settings

    def params(self) -> DetectParams:
        """The detection settings a run would use now (this tab's channel / planes)."""
        return self._with_channel(self.settings().params)

    def _with_channel(self, params: DetectParams) -> DetectParams:
        choice = self.channel.value
        return dataclasses.replace(
            params, channel=choice if isinstance(choice, int) else None, planes=choice == "planes"
        )

    def make_job(self) -> BatchJob:
        """Capture the current settings.

        Raises
        ------
        ValueError, FileNotFoundError
            A missing folder, output folder or model, or no file matches.
        """
        paths = glob_images(self.folder.value, self.pattern.value)
        output = folder_outputs(self.output.value)["out"].parent
        settings = self.settings()
        if settings.model is None:
            raise ValueError("no model selected (Image tab)")
        return BatchJob(
            paths=paths,
            model=settings.model,
            params=self._with_channel(settings.params),
            output=output,
            backend=settings.backend,
            quantize=settings.quantize,
            workers=int(self.workers.value),
            root=Path(self.folder.value).expanduser(),
        )

    # ------------------------------------------------------------------ running

    def run(self, _value=None) -> Task | None:
        """Start the batch in a worker thread (resumes a stopped run with the same settings).

        Returns
        -------
        Task or None
            The started task (None when the settings are invalid or a batch is running).
        """
        if self.running:
            return None
        try:
            job = self.make_job()
        except (ValueError, FileNotFoundError) as exc:
            self.status.value = f"Cannot run: {exc}"
            _qt.show_error(f"Cannot run batch: {exc}")
            return None
        self.job = job
        self.results = [None] * len(job.paths)
        names, blank = [self._display_name(p) for p in job.paths], [""] * len(job.paths)
        self.table.value = dict(zip(SUMMARY_COLUMNS, (names, blank, blank), strict=True))
        _qt.fit_table(self.table, stretch=(0, 2))
        _qt.cell_tooltips(self.table)
        self.task = start(
            partial(run_batch_job, job),
            partial(self._on_done, job),
            on_progress=self._on_progress,
            on_finished=self._on_finished,
            desc="Batch detection (images)",
            total=len(job.paths),
        )
        self._set_running(True)
        p = job.params
        self.settings_label.value = (
            f"model {Path(job.model).name}, confidence {p.conf:.2f}, tile {p.tile}, "
            f"IoU {p.iou:.2f}"
            + (f", diameter {p.diameter:g} px" if p.diameter else "")
            + (f", min relative area {p.min_relative_area:g}" if p.min_relative_area else "")
            + (f", channel {p.channel}" if p.channel is not None else "")
            + (", planes" if p.planes else "")
        )
        self.status.value = f"running on {len(job.paths)} images..."
        self.progress.begin(f"images 0 / {len(job.paths)}, loading {Path(job.model).name}...")
        self.tiles.end()
        self._tiles_of = None
        self._update_total()
        return self.task

    def status_label(self):
        return self.status

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

    def _on_progress(self, item: Progress) -> None:
        if isinstance(item.data, TileProgress):
            self._on_tiles(item.data)
            return
        self.progress.update(item)
        if item.data == INT8_STEP:
            return
        self._on_result(item)

    def _on_tiles(self, tiles: TileProgress) -> None:
        if tiles.path != self._tiles_of:  # a new image: its own clock for the time left
            self._tiles_of = tiles.path
            self.tiles.unit = f"{self._display_name(Path(tiles.path))}: tiles"
            self.tiles.begin()
        self.tiles.update(Progress(tiles.done, tiles.total))

    def _on_result(self, item: Progress) -> None:
        index, res = item.data
        if not 0 <= index < len(self.results):
            return
        self.results[index] = res
        self.table.data[index, 1] = "" if res.error is not None else res.count
        self.table.data[index, 2] = res.error or ""
        _qt.cell_tooltips(self.table)
        self._update_total()

    def _update_total(self) -> None:
        done = [r for r in self.results if r is not None]
        ok = [r for r in done if r.error is None]
        failed = len(done) - len(ok)
        text = f"{len(done)} of {len(self.results)} images: {sum(r.count for r in ok):,} nuclei"
        if failed:
            text += f", {failed} unreadable (see {ERRORS_CSV})"
        self.total_label.value = text

    def _on_done(self, job: BatchJob, outcome: Outcome) -> None:
        self.tiles.end()
        n_done = sum(r is not None for r in self.results)
        last = self.progress.last
        if outcome.cancelled and last is not None and last.data == INT8_STEP:
            self.progress.end("cancelled while making the INT8 version (nothing kept)")
        elif outcome.cancelled:
            self.progress.end(f"cancelled after {n_done} of {len(job.paths)} images")
        elif outcome.error is not None:
            self.progress.end("")
        else:
            self.progress.end(self._done_summary(len(job.paths)))
        if outcome.cancelled:
            self.status.value = (
                f"Cancelled with {n_done} of {len(job.paths)} images done; they are kept. "
                "Press Run batch again with the same folder, pattern, output folder, model and "
                "settings to resume where it stopped."
            )
        elif outcome.error is not None:
            if _qt.trusted_after_asking(outcome.error, self.native):
                self.status.value = f"trusted {Path(job.model).name}: running again..."
                self._run_again = True
                if not self.running:  # finished while the dialog was open
                    self._on_finished()
            else:
                self.status.value = f"Batch failed: {_qt.error_text(outcome.error)}"
                _qt.show_error(f"Batch detection failed: {_qt.error_text(outcome.error)}")
        else:
            failed = sum(r.error is not None for r in outcome.value)
            self.status.value = (
                f"Done: wrote {DETECTIONS_CSV}, {COUNTS_CSV} and {ERRORS_CSV} "
                f"to {job.output}" + (f" ({failed} image(s) could not be read)" if failed else "")
            )

    def _done_summary(self, total: int) -> str:
        """``"9 of 9 images in 1 s"``, saying how many came from the stopped run's parts."""
        done = [r for r in self.results if r is not None]
        resumed = sum(r.resumed for r in done)
        if not resumed:
            return f"{len(done)} of {total} images in {self.progress.elapsed()}"
        return (
            f"{len(done) - resumed} of {total} images analysed in {self.progress.elapsed()}, "
            f"{resumed} resumed from the stopped run"
        )

    def _on_finished(self) -> None:
        self._set_running(False)
        if self._run_again:
            self._run_again = False
            self.run()

    # ------------------------------------------------------------------ results

    def results_table(self) -> pd.DataFrame:
        """Finished images so far: ``image`` (path), ``count`` (None on error), ``error``."""
        return summary_table(self.results)
