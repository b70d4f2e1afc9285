"""Open any image a user points the CLI at: TIFF lazily (via :mod:`tiff_io`), PNG/JPEG/BMP eagerly.

Also expands folders and glob patterns into image files.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_yolocell.io.tiff import TiffReadError, is_tiff_path, open_tiff

__all__ = ["IMAGE_SUFFIXES", "OpenedImage", "expand_inputs", "open_image"]

PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PLAIN_SUFFIXES


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

    Order is kept (sorted within a folder or glob) and duplicates are removed. A file named
    explicitly keeps the spelling the user gave (it is what the CLI prints back). A pattern or
    folder that matches nothing raises ``FileNotFoundError``.
    """
    out: list[Path | str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                kinds = ", ".join(IMAGE_SUFFIXES)
                raise FileNotFoundError(f"{p}: folder holds no images ({kinds})")
            out.extend(found)
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
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
