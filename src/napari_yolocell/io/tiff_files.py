"""Which files are TIFFs, by name: all napari's reader needs to answer "is this ours?".

Standard library only, so that asking costs no numpy, tifffile, zarr or dask import; the pixels
are opened by :mod:`napari_yolocell.io.tiff`, which re-exports these names.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TIFF_SUFFIXES", "is_tiff_path", "list_tiffs"]

#: File name endings handled by this module (lower case; ``.ome.tif`` is covered by ``.tif``).
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs")


def is_tiff_path(path: str | os.PathLike) -> bool:
    """Return True when ``path`` has a TIFF-like file name ending (see ``TIFF_SUFFIXES``)."""
    return str(path).lower().endswith(TIFF_SUFFIXES)


def list_tiffs(folder: str | os.PathLike) -> list[Path]:
    """Sorted TIFF-like files directly inside ``folder`` (hidden files skipped)."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and is_tiff_path(p) and not p.name.startswith(".")
    )
