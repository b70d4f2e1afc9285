"""Open any image a user points the CLI at: TIFF and OME-Zarr lazily (via :mod:`tiff_io` and
:mod:`~napari_yolocell.io.omezarr`), PNG/JPEG/BMP eagerly.

Also expands folders and glob patterns into image files. An OME-Zarr image is a folder
(``.zarr``): expansion takes it as one image and never descends into it.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_yolocell.io.omezarr import ZARR_SUFFIXES, is_zarr_path, open_omezarr
from napari_yolocell.io.tiff import TiffReadError, is_tiff_path, open_tiff

__all__ = ["IMAGE_SUFFIXES", "OpenedImage", "expand_inputs", "glob_images", "open_image"]

PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PLAIN_SUFFIXES + ZARR_SUFFIXES


def is_zarr_image(path: str | os.PathLike) -> bool:
    """True for a zarr folder: named ``.zarr`` or holding zarr group metadata (v2 or v3)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return is_zarr_path(p) or (p / "zarr.json").is_file() or (p / ".zgroup").is_file()


def _folder_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively) and zarr image folders, not entering those."""
    found = []
    for folder, dirs, files in os.walk(root):
        base = Path(folder)
        zarrs = [d for d in dirs if is_zarr_image(base / d)]
        found.extend(base / d for d in zarrs)
        dirs[:] = [d for d in dirs if d not in zarrs]
        found.extend(base / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(found)


@dataclass
class OpenedImage:
    """An image ready for :func:`napari_yolocell.engine.detect.detect_image`.

    ``levels`` are lazy for TIFFs (level 0 = full resolution); ``axes`` use tifffile's codes.
    """

    path: Path
    levels: list[Any]
    axes: str
    channel_axis: int | None = None
    rgb: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    _close: Any = None

    @property
    def data(self):
        return self.levels[0]

    @property
    def pixel_size_um(self) -> tuple[float, float] | None:
        """Pixel size (y, x) in micrometres from the file's metadata; None when unknown."""
        size = self.metadata.get("pixel_size_um") or {}
        if "Y" in size and "X" in size:
            return float(size["Y"]), float(size["X"])
        return None

    def close(self) -> None:
        if self._close is not None:
            self._close()


def open_image(path: str | os.PathLike) -> OpenedImage:
    """Open one image file.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file cannot be read as an image (the message names the file and the problem).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if is_zarr_image(p):
        z = open_omezarr(p)
        return OpenedImage(
            path=p,
            levels=list(z.levels),
            axes=z.axes,
            channel_axis=z.channel_axis,
            rgb=False,
            metadata=dict(z.metadata),
            _close=z.close,
        )
    if p.is_dir():
        raise ValueError(f"{p} is a folder; give image files (or let the CLI expand the folder)")
    if is_tiff_path(p):
        try:
            t = open_tiff(p)
        except TiffReadError:
            raise
        except Exception as exc:  # tifffile raises many kinds; keep the user's view simple
            raise ValueError(f"{p}: cannot read as TIFF: {exc}") from exc
        return OpenedImage(
            path=p,
            levels=list(t.levels),
            axes=t.axes,
            channel_axis=t.channel_axis,
            rgb=t.rgb,
            metadata=dict(t.metadata),
            _close=t.close,
        )
    if p.suffix.lower() in PLAIN_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                arr = np.asarray(im)
        # Exception, not just PIL's errors: ultralytics patches Image.open to retry unknown
        # files with optional HEIF plugins, which raises ImportError when they are absent.
        except (UnidentifiedImageError, OSError, ImportError, ValueError) as exc:
            why = "unknown or corrupt image format" if isinstance(exc, ImportError) else exc
            raise ValueError(f"{p}: cannot read image: {why}") from exc
        if arr.ndim == 3 and arr.shape[-1] == 2:  # grey + alpha (PNG "LA"): keep the grey
            arr = arr[..., 0]
        rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4)
        if rgb and _is_grey(arr):
            arr, rgb = arr[..., 0], False
        return OpenedImage(
            path=p,
            levels=[arr],
            axes="YXS" if rgb else "YX",
            rgb=rgb,
            metadata={"path": str(p), "shape": arr.shape, "dtype": str(arr.dtype)},
        )
    raise ValueError(
        f"{p}: unsupported file type {p.suffix!r} (supported: {', '.join(IMAGE_SUFFIXES)})"
    )


def _is_grey(arr: np.ndarray) -> bool:
    """RGB files of fluorescence images often hold the same grey values in R, G and B."""
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    return bool(np.array_equal(r, g) and np.array_equal(r, b))


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders -> their image files (recursively); globs (``plate/**/*.tif``).

    A zarr folder (``.zarr``, or holding zarr metadata) is one image, named or found.

    Order is kept (sorted within a folder or glob) and duplicates are removed. A file named
    explicitly keeps the spelling the user gave (it is what the CLI prints back). A pattern or
    folder that matches nothing raises ``FileNotFoundError``.
    """
    out: list[Path | str] = []
    for item in inputs:
        p = Path(item)
        if is_zarr_image(p):
            out.append(item)
        elif p.is_dir():
            found = _folder_images(p)
            if not found:
                kinds = ", ".join(IMAGE_SUFFIXES)
                raise FileNotFoundError(f"{p}: folder holds no images ({kinds})")
            out.extend(found)
        elif glob.has_magic(item):
            found = sorted(
                Path(f)
                for f in glob.glob(item, recursive=True)
                if Path(f).is_file() or is_zarr_image(f)
            )
            # ``**`` also matches the chunk files inside a zarr image: keep the image only
            found = [f for f in found if not any(is_zarr_image(a) for a in f.parents)]
            if not found:
                raise FileNotFoundError(f"{item}: pattern matches no files")
            out.extend(found)
        else:
            out.append(item)
    seen: set[Path] = set()
    uniq = []
    for f in out:
        key = Path(f).resolve()
        if key not in seen:
            seen.add(key)
            uniq.append(str(f))
    return uniq


def glob_images(folder: str | os.PathLike, pattern: str = "*.tif") -> list[Path]:
    """Image files of ``folder`` matching ``pattern`` (``**`` recurses), sorted.

    Files without an image suffix (:data:`IMAGE_SUFFIXES`) are skipped, so a broad pattern
    never picks up the CSVs or part files of a previous run written into the same folder.

    Parameters
    ----------
    folder : path
        Folder to search; the pattern is relative to it.
    pattern : str
        Glob pattern (default ``*.tif``; blank means the default).

    Returns
    -------
    list of Path

    Raises
    ------
    ValueError
        No folder given (empty or ``.``), or it is not a folder.
    FileNotFoundError
        No image file matches.
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
    images = [
        p for p in found if (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) or is_zarr_image(p)
    ]
    if not images:
        raise FileNotFoundError(f"no image file matches {pattern!r} in {str(root)!r}")
    return images
