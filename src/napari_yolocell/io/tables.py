"""The result tables' columns and how they are written: one place for both.

Detections are y-first (``y, x, y0, x0, y1, x1``) in full-resolution pixels, boxes by pixel
edges (pixel ``i`` spans ``[i, i + 1)``); the networks' x-first boxes are turned around once, in
the engine. Every CSV is written to a temporary file beside its target and renamed into place,
so a crash or a full disk never leaves a truncated file (an existing one is replaced only once
the new one is complete).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pandas as pd

#: The engine's detection table (one row per nucleus).
DETECTION_COLUMNS = ["plane", "y", "x", "y0", "x0", "y1", "x1", "confidence", "class"]
#: The detections CSV of the CLI, the batch runner and the widget's Export CSV.
CSV_COLUMNS = ["image", *DETECTION_COLUMNS]
#: The counts CSV: one row per plane for the whole image, and per plane and ROI.
COUNT_COLUMNS = ["image", "plane", "roi", "count"]
#: ``NAME.marker_counts.csv``: marker-positive / negative nuclei per plane and ROI
#: (``class`` = ``positive`` / ``negative``); the plain counts CSV stays as it is.
MARKER_COUNT_COLUMNS = ["image", "plane", "roi", "class", "count"]
#: The ``roi`` value of whole-image count rows.
WHOLE_IMAGE_ROI = "all"
#: ``NAME.errors.csv`` of a batch run: images that failed, with the one-line reason.
ERROR_COLUMNS = ["image", "error"]


def roi_name(index: int) -> str:
    """Default name of the ``index``-th ROI (``roi_0``, ``roi_1``...)."""
    return f"roi_{index}"


def unique_roi_names(names: list[object]) -> list[str]:
    """ROI names with every missing, blank or repeated one replaced by an unused ``roi_<i>``.

    The first occurrence of a name keeps it; a ROI without a usable name gets ``roi_<its
    index>`` when that is free, else the next free ``roi_<k>``, so names already shown (in a
    table or a CSV) never change when ROIs are added or deleted.

    Examples
    --------
    >>> unique_roi_names(["left", None, "left", ""])
    ['left', 'roi_1', 'roi_2', 'roi_3']
    """
    given = [str(n).strip() if n is not None and not pd.isna(n) else "" for n in names]
    out: list[str] = []
    taken = set(given) - {""}
    seen: set[str] = set()
    for i, name in enumerate(given):
        if name and name not in seen:
            seen.add(name)
            out.append(name)
            continue
        k = i
        while roi_name(k) in taken or roi_name(k) in seen:
            k += 1
        seen.add(roi_name(k))
        out.append(roi_name(k))
    return out


def detections_csv_table(df: pd.DataFrame, image: str) -> pd.DataFrame:
    """The detections CSV of one image: columns exactly :data:`CSV_COLUMNS`."""
    out = df.reindex(columns=DETECTION_COLUMNS).copy()
    out.insert(0, "image", image)
    return out.reset_index(drop=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` via a temporary file in the same folder and ``os.replace``."""

    def write(fh) -> None:
        fh.write(text.encode("utf-8"))

    return _replace_atomic(path, write)


def copy_file_atomic(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy ``source`` to ``path`` through a temporary file (see :func:`write_text_atomic`)."""

    def write(fh) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, fh)

    return _replace_atomic(path, write)


def _replace_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_csv_atomic(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``table`` as CSV (no index) atomically; see :func:`write_text_atomic`."""
    return write_text_atomic(path, table.to_csv(index=False))
