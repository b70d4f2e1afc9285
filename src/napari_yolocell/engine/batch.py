"""Detection over many images: resumable, loss-free, in parallel or on a dask cluster.

Each finished image is written at once as a small part file under ``<out>.parts/`` (atomic
rename), keyed by the image and the settings. A run that is killed and started again with the
same arguments skips the images already done; at the end the parts are merged, in input order,
into one detections CSV and one counts CSV (each written atomically), so an interrupted and
resumed run ends with the same CSVs as an uninterrupted one. An image that fails is recorded
in an errors CSV with its message and does not stop the run.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from napari_yolocell.engine.detect import Cancelled, count_per_plane, detect_image, is_cancelled
from napari_yolocell.engine.measure import measure_nuclei
from napari_yolocell.io.images import open_image
from napari_yolocell.io.tables import (
    COUNT_COLUMNS,
    CSV_COLUMNS,
    DETECTION_COLUMNS,
    ERROR_COLUMNS,
    WHOLE_IMAGE_ROI,
    detections_csv_table,
    write_csv_atomic,
    write_text_atomic,
)
from napari_yolocell.models.loading import load_detector

__all__ = [
    "FOLDER_CSVS",
    "BatchCancelled",
    "ImageResult",
    "detect_file",
    "folder_outputs",
    "run_batch",
    "summary_table",
]

#: CSV file names of a run that writes into one output folder (the Batch tab of the widget).
FOLDER_CSVS = {"out": "detections.csv", "counts": "counts.csv", "errors": "errors.csv"}
#: One row per finished image: its path, its count (None when it failed) and the error.
SUMMARY_COLUMNS = ["image", "count", "error"]


@dataclass
class ImageResult:
    """Outcome for one image: its detections and per-plane counts, or an error message.

    ``resumed``: read back from the part files of an earlier, stopped run (not analysed now).
    """

    image: str
    detections: pd.DataFrame | None = None
    counts: list[int] = field(default_factory=list)
    error: str | None = None
    resumed: bool = False

    @property
    def count(self) -> int:
        return int(sum(self.counts))


def detect_file(
    path: str,
    model: str,
    params: Any,
    device: str | None = None,
    backend: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    cancel: Any = None,
    measure: bool = False,
) -> ImageResult:
    """Open one image, detect, return an :class:`ImageResult` (never raises for bad images).

    Runs in worker processes and on dask workers, so it takes plain, picklable arguments and
    reads the pixels itself. With ``measure``, the detections get the columns of
    :func:`~napari_yolocell.engine.measure.measure_nuclei` (``mean_c0``..., ``area_px``,
    ``area_um2`` when the file states a pixel size) after the CSV columns.
    """

    detector = load_detector(model, device=device, backend=backend)
    try:
        img = open_image(path)
        try:
            data = img.levels if len(img.levels) > 1 else img.data
            df = detect_image(
                data,
                detector,
                params,
                channel_axis=img.channel_axis,
                rgb=img.rgb,
                progress=progress,
                cancel=cancel,
                axes=img.axes,
            )
            if measure:  # while the file is open: reads one window per block of nuclei
                # the channel axis detection used (an unlabelled one --channel named)
                channel_axis = df.attrs.get("channel_axis", img.channel_axis)
                df = measure_nuclei(
                    data, df, channel_axis, rgb=img.rgb, pixel_size_um=img.pixel_size_um
                )
        finally:
            img.close()
    except Cancelled:  # a RuntimeError, but it stops the batch: not an error of this image
        raise
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        msg = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        return ImageResult(image=str(path), error=msg.splitlines()[0] if msg else repr(exc))
    counts = [int(c) for c in count_per_plane(df).to_numpy()]
    table = detections_csv_table(df, str(path))
    for col in df.columns.difference(DETECTION_COLUMNS, sort=False):  # measurements, if any
        table[col] = df[col].to_numpy()
    return ImageResult(image=str(path), detections=table, counts=counts)


def summary_table(results: Sequence[ImageResult | None]) -> pd.DataFrame:
    """One row per finished image (``None`` entries, images not done yet, are left out).

    Parameters
    ----------
    results : sequence of ImageResult or None
        As :func:`run_batch` returns them or ``on_result`` delivers them.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`SUMMARY_COLUMNS`; ``count`` is None for an image that failed.
    """
    rows = [
        {"image": r.image, "count": None if r.error else r.count, "error": r.error}
        for r in results
        if r is not None
    ]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _key(path: str, model: str, params: Any, measure: bool = False) -> str:
    """Part-file key: the image (path, size, mtime) and every setting that changes results."""
    p = Path(path)
    st = p.stat() if p.exists() else None
    ident = {
        "path": str(p.resolve()),
        "size": st.st_size if st else None,
        "mtime": st.st_mtime_ns if st else None,
        "model": model,
        "params": asdict(params) if params is not None else None,
    }
    if measure:  # only when set: parts of runs without measurements keep their keys
        ident["measure"] = True
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _Parts:
    """One ``<key>.json`` (+ ``<key>.csv`` of detections) per finished image."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def load(self, key: str) -> ImageResult | None:
        meta = self.folder / f"{key}.json"
        if not meta.exists():
            return None
        info = json.loads(meta.read_text())
        det = None
        if info.get("error") is None:
            csv = self.folder / f"{key}.csv"
            # round_trip: floats read back bit-identical, so resumed runs give the same CSVs
            det = pd.read_csv(csv, float_precision="round_trip")
            det["image"] = info["image"]  # keep the path exactly as given
        return ImageResult(
            image=info["image"], detections=det, counts=info["counts"], error=info.get("error")
        )

    def save(self, key: str, res: ImageResult) -> None:
        if res.error is None:
            write_text_atomic(self.folder / f"{key}.csv", res.detections.to_csv(index=False))
        # the json is written last: its presence marks the image as done
        write_text_atomic(
            self.folder / f"{key}.json",
            json.dumps({"image": res.image, "counts": res.counts, "error": res.error}),
        )


def _local_results(
    todo: list[tuple[int, str]],
    model: str,
    params: Any,
    workers: int,
    device: str | None,
    backend: str,
    tile_progress: Callable[[str, int, int], None] | None = None,
    cancel: Any = None,
    measure: bool = False,
) -> Iterator[tuple[int, ImageResult]]:
    if workers <= 1:
        for i, path in todo:
            if is_cancelled(cancel):
                raise BatchCancelled("batch cancelled")
            prog = None
            if tile_progress is not None:

                def prog(done, total, _p=path):
                    tile_progress(_p, done, total)

            yield i, detect_file(path, model, params, device, backend, prog, cancel, measure)
        return
    # Each process gets an equal share of the cores; torch would otherwise oversubscribe.
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: forking a process that already runs torch/OpenMP threads can deadlock
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=workers, initializer=_init_worker, initargs=(threads,), mp_context=ctx
    ) as pool:
        pending = {
            pool.submit(detect_file, p, model, params, device, backend, measure=measure): i
            for i, p in todo
        }
        while pending:
            if is_cancelled(cancel):
                for fut in pending:
                    fut.cancel()
                raise BatchCancelled("batch cancelled")
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                yield pending.pop(fut), fut.result()


#: Raised when ``cancel`` asks a batch to stop; finished images stay in the part files. The
#: core's one cancellation type (:class:`~napari_yolocell.engine.detect.Cancelled`).
BatchCancelled = Cancelled


def folder_outputs(folder: str | os.PathLike) -> dict[str, Path]:
    """The ``out`` / ``counts`` / ``errors`` CSVs of a run writing into ``folder``.

    Parameters
    ----------
    folder : path
        Output folder (created by :func:`run_batch` when missing).

    Returns
    -------
    dict of str to Path
        Keyword arguments for :func:`run_batch`, file names :data:`FOLDER_CSVS`.

    Raises
    ------
    ValueError
        No folder given (empty or ``.``), or ``folder`` is a file.
    """
    text = str(folder).strip()
    if not text or text == ".":
        raise ValueError("choose an output folder")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {str(path)!r} is a file, not a folder")
    return {key: path / name for key, name in FOLDER_CSVS.items()}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _dask_results(
    todo: list[tuple[int, str]],
    model: str,
    params: Any,
    scheduler: Any,
    device: str | None,
    backend: str,
    measure: bool = False,
) -> Iterator[tuple[int, ImageResult]]:
    from distributed import Client, as_completed

    client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
    try:
        futures = {
            client.submit(
                detect_file, p, model, params, device, backend, measure=measure, pure=False
            ): i
            for i, p in todo
        }
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
    finally:
        if client is not scheduler:
            client.close()


def run_batch(
    paths: Sequence[str | os.PathLike],
    model: str,
    params: Any = None,
    *,
    out: str | os.PathLike | None = None,
    counts: str | os.PathLike | None = None,
    errors: str | os.PathLike | None = None,
    workers: int = 1,
    scheduler: Any = None,
    device: str | None = None,
    backend: str = "auto",
    on_result: Callable[[int, ImageResult], None] | None = None,
    tile_progress: Callable[[str, int, int], None] | None = None,
    cancel: Any = None,
    keep_parts: bool = False,
    empty_errors: bool = False,
    measure: bool = False,
) -> list[ImageResult]:
    """Detect nuclei in many images; resumable when ``out`` or ``counts`` is given.

    Parameters
    ----------
    paths : sequence of path
        Image files.
    model : str
        Model name or path (workers load it themselves).
    params : DetectParams, optional
    out, counts, errors : path, optional
        Detections CSV, counts CSV, errors CSV. The part files live in ``<out>.parts/`` (or
        ``<counts>.parts/``) and are removed after a complete merge.
    workers : int
        Local worker processes (1 = in this process).
    scheduler : str or distributed.Client, optional
        A dask.distributed scheduler address (or client): images become tasks on its workers,
        which read the pixels from the (shared) path themselves.
    on_result : callable, optional
        Called as ``on_result(index, result)`` as each image finishes (any order).
    tile_progress : callable, optional
        ``tile_progress(path, done_tiles, total_tiles)``, for in-process runs (workers=1).
    cancel : threading.Event or callable, optional
        Stops the run (:class:`BatchCancelled`); images already finished stay in the part
        files, so the same call later resumes where it stopped.
    empty_errors : bool
        Write ``errors`` (header only) even when every image was read, so scripts reading
        an output folder can rely on it; by default it is written only when an image failed
        (or to replace one of an earlier run).
    measure : bool
        Measure every nucleus (:func:`~napari_yolocell.engine.measure.measure_nuclei`): the
        detections get ``mean_c0``..., ``area_px`` (``area_um2``) after :data:`CSV_COLUMNS`.

    Returns
    -------
    list of ImageResult, in input order.
    """
    paths = [str(p) for p in paths]
    anchor = out or counts
    parts = _Parts(Path(f"{anchor}.parts")) if anchor else None
    keys = [_key(p, model, params, measure) for p in paths]
    results: list[ImageResult | None] = [None] * len(paths)
    todo = []
    for i, (p, k) in enumerate(zip(paths, keys, strict=True)):
        done = parts.load(k) if parts else None
        if done is not None and done.image == p:
            done.resumed = True
            results[i] = done
            if on_result:
                on_result(i, done)
        else:
            todo.append((i, p))
    if scheduler is not None:
        stream = _dask_results(todo, model, params, scheduler, device, backend, measure)
    else:
        stream = _local_results(
            todo, model, params, workers, device, backend, tile_progress, cancel, measure
        )
    for i, res in stream:
        if is_cancelled(cancel):
            raise BatchCancelled("batch cancelled")
        if parts:
            parts.save(keys[i], res)
            res = parts.load(keys[i])  # what a resumed run would read: identical CSVs
        results[i] = res
        if on_result:
            on_result(i, res)
    final = [r for r in results if r is not None]
    _merge(final, out, counts, errors, empty_errors)
    if parts and not keep_parts:
        shutil.rmtree(parts.folder, ignore_errors=True)
    return final


def _merge(results: list[ImageResult], out, counts, errors, empty_errors: bool = False) -> None:
    ok = [r for r in results if r.error is None]
    if out:
        frames = [r.detections for r in ok if r.detections is not None and len(r.detections)]
        det = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        # the contract columns first, exactly; measurement columns (if any) after them
        extra = [c for c in det.columns if c not in CSV_COLUMNS]
        write_csv_atomic(det.reindex(columns=[*CSV_COLUMNS, *extra]), Path(out))
    if counts:
        rows = [
            {"image": r.image, "plane": plane, "roi": WHOLE_IMAGE_ROI, "count": c}
            for r in ok
            for plane, c in enumerate(r.counts)
        ]
        write_csv_atomic(pd.DataFrame(rows, columns=COUNT_COLUMNS), Path(counts))
    failed = [{"image": r.image, "error": r.error} for r in results if r.error is not None]
    if errors and (failed or empty_errors or Path(errors).exists()):
        write_csv_atomic(pd.DataFrame(failed, columns=ERROR_COLUMNS), Path(errors))
