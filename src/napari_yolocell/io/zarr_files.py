"""Which folders are OME-Zarr images, from their names and metadata files alone.

Standard library only, like :mod:`~napari_yolocell.io.tiff_files`: napari's reader asks "is this
ours?" for every path dropped on the viewer, and answering must not import numpy, zarr or dask.
The pixels are opened by :mod:`napari_yolocell.io.omezarr`, which re-exports these names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["ZARR_SUFFIXES", "is_ngff_image", "is_zarr_path"]

#: Folder name endings opened as OME-Zarr (lower case; ``.ome.zarr`` is covered by ``.zarr``).
ZARR_SUFFIXES = (".zarr",)

# Metadata keys of what this package opens: one image, or a bioformats2raw container of images.
# Plates and wells (``plate`` / ``well``) are not images and are left to other readers.
_IMAGE_KEYS = ("multiscales", "bioformats2raw.layout")


def is_zarr_path(path: str | os.PathLike) -> bool:
    """True when ``path`` names a zarr folder (``.zarr`` / ``.ome.zarr``, with or without ``/``)."""
    return str(path).rstrip("/\\").lower().endswith(ZARR_SUFFIXES)


def _group_attrs(folder: Path) -> dict[str, Any] | None:
    """The group attributes (zarr v3 ``zarr.json``, else v2 ``.zattrs``); None when absent.

    Raises
    ------
    ValueError
        The metadata file exists but is not a JSON object (``json`` raises a ValueError).
    OSError
        It cannot be read.
    """
    v3, v2 = folder / "zarr.json", folder / ".zattrs"
    if v3.is_file():
        meta = json.loads(v3.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("zarr.json is not a JSON object")
        attrs = meta.get("attributes", {})
    elif v2.is_file():
        attrs = json.loads(v2.read_text(encoding="utf-8"))
    else:
        return None
    if not isinstance(attrs, dict):
        raise ValueError("zarr attributes are not a JSON object")
    ome = attrs.get("ome")
    # NGFF 0.5 nests its keys under "ome"; 0.4 keeps them at the top
    return {**attrs, **ome} if isinstance(ome, dict) else attrs


def is_ngff_image(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding an OME-Zarr (NGFF) image this package opens.

    Decided from one small JSON file: the group's ``zarr.json`` (NGFF 0.5) or ``.zattrs`` (0.4)
    must name ``multiscales`` (an image) or ``bioformats2raw.layout`` (a container whose series
    ``0`` is opened). A plain zarr array or group, a plate or a well, or a folder without zarr
    metadata is not one. A ``.zarr``-named folder whose metadata file cannot be parsed is
    claimed, so that opening it reports the problem instead of "no reader".

    Parameters
    ----------
    path : path
        Candidate folder.

    Returns
    -------
    bool
    """
    folder = Path(path)
    if not folder.is_dir():
        return False
    try:
        attrs = _group_attrs(folder)
    except (OSError, ValueError):
        return is_zarr_path(folder)
    return attrs is not None and any(key in attrs for key in _IMAGE_KEYS)
