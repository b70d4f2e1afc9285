"""Lazy opening of (large) TIFF files: plain, BigTIFF, pyramidal, OME, ImageJ, Aperio SVS.

napari-free core. :func:`open_tiff` parses only the TIFF headers (IFDs); pixel data are read on
demand, tile by tile, through tifffile's zarr store. Uncompressed contiguous images are
memory-mapped instead (a single huge strip would otherwise be one chunk).

Imports are paid where they are needed: zarr only for a file with compressed or tiled data, and
dask only when :attr:`TiffImage.levels` is first asked for. napari's reader shows
:attr:`TiffImage.arrays` (zarr arrays or memory maps) and, channels aside, no dask; importing dask
(0.5-0.9 s with the scipy it pulls in) and computing through it (the first compute imports
dask.distributed when that is installed, another 0.5 s) made a cold open through npe2 about
three times slower (``docs/reader.md``).
"""

from __future__ import annotations

import hashlib
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile

from napari_yolocell.io.tiff_files import TIFF_SUFFIXES, is_tiff_path, list_tiffs
from napari_yolocell.io.tiff_tiles import TiffTiles

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "TIFF_SUFFIXES",
    "TiffImage",
    "TiffReadError",
    "is_tiff_path",
    "list_tiffs",
    "open_tiff",
    "open_tiffs",
]

# Micrometres per unit for the length units found in OME and ImageJ metadata.
_UNIT_TO_UM = {
    "µm": 1.0,
    "\u03bcm": 1.0,  # Greek mu, not the micro sign
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "inch": 25400.0,
}

# Strips thinner than _THIN_ROWS (e.g. 1-row strips) are merged into bands of about
# _MIN_CHUNK_ROWS rows so dask graphs stay small; tiles are kept as they are.
_THIN_ROWS = 64
_MIN_CHUNK_ROWS = 256


class TiffReadError(ValueError):
    """A file could not be opened as a TIFF image (corrupt, truncated, unsupported codec...)."""


@dataclass
class TiffImage:
    """A lazily opened TIFF image.

    Attributes
    ----------
    path : pathlib.Path
        File (or folder, for a stacked folder of TIFFs) the image comes from.
    arrays : list of array-like
        Resolution levels, level 0 = full resolution, then decreasing size, as opened: a
        ``zarr.Array`` over tifffile's store (compressed or tiled data) or a ``numpy.memmap``
        (uncompressed contiguous data); dask arrays for a stacked folder. Slicing reads only
        the tiles/strips that are needed. napari's reader shows these; :attr:`levels` wraps
        them in dask.
    axes : str
        tifffile axes codes of every array dimension, e.g. ``"YX"``, ``"CYX"``, ``"TZCYX"``,
        ``"YXS"`` (``S`` = samples, RGB(A) when of length 3 or 4), ``"I"`` = stacked files.
    channel_axis : int or None
        Index of the channel axis (``C``, or ``S`` when it is not RGB), None when there is none.
    channel_names : list of str or None
        Channel names from OME metadata, when present.
    scale : tuple of float
        Pixel spacing per axis (same length as ``axes``), micrometres for ``X``/``Y``/``Z`` when the
        file states a physical size, else 1.0.
    rgb : bool
        True when the last axis holds RGB(A) samples.
    metadata : dict
        Summary: path, shape, dtype, axes, pixel_size_um, is_pyramid, level_shapes, compression,
        tiled, kind (tifffile series kind) and anything tifffile's shaped metadata stored.
    """

    path: Path
    arrays: list[Any]
    axes: str
    channel_axis: int | None = None
    channel_names: list[str] | None = None
    scale: tuple[float, ...] = ()
    rgb: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list, repr=False)
    _names: list[str] = field(default_factory=list, repr=False)
    _sources: list[Any] = field(default_factory=list, repr=False)  # tifffile series levels
    _levels: list[Any] | None = field(default=None, init=False, repr=False)

    @property
    def levels(self) -> list[da.Array]:
        """Resolution levels as dask arrays (level 0 = full resolution), built on first use.

        Dask arrays over tiled data carry the array the detection engine reads chunks from as
        ``yolocell_source``: a :class:`~napari_yolocell.io.tiff_tiles.TiffTiles` for a tiled
        single page, else the zarr array (no dask graph per chunk). Thin strips are merged
        into bands of about 256 rows so that dask graphs stay small.
        """
        if self._levels is None:
            names = self._names or [None] * len(self.arrays)
            sources = [
                None if s is None else TiffTiles.from_level(s)
                for s in (self._sources or [None] * len(self.arrays))
            ]
            self._levels = [
                _to_dask(a, n, s) for a, n, s in zip(self.arrays, names, sources, strict=True)
            ]
        return self._levels

    @property
    def data(self) -> da.Array:
        """Full-resolution level (``levels[0]``)."""
        return self.levels[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the full-resolution level."""
        return tuple(self.arrays[0].shape)

    @property
    def dtype(self) -> np.dtype:
        """Pixel data type."""
        return np.dtype(self.arrays[0].dtype)

    @property
    def is_pyramid(self) -> bool:
        """True when more than one resolution level is available."""
        return len(self.arrays) > 1

    def close(self) -> None:
        """Close the underlying file handles (arrays cannot be read afterwards)."""
        for handle in self._handles:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._handles.clear()

    def __enter__(self) -> TiffImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tiffs(path: str | os.PathLike) -> list[TiffImage]:
    """Open a file, or every TIFF in a folder.

    A folder of TIFFs with identical shape, dtype, axes and levels becomes ONE image stacked
    lazily along a new leading axis ``I``; otherwise one image per file is returned.

    Parameters
    ----------
    path : str or os.PathLike
        TIFF file or folder.

    Returns
    -------
    list of TiffImage
    """
    path = Path(path)
    if not path.is_dir():
        return [open_tiff(path)]
    files = list_tiffs(path)
    if not files:
        raise TiffReadError(f"{path}: folder contains no TIFF files ({', '.join(TIFF_SUFFIXES)})")
    images = [open_tiff(f) for f in files]
    if len(images) > 1 and _stackable(images):
        return [_stack(path, images)]
    return images


def open_tiff(path: str | os.PathLike, series: int = 0) -> TiffImage:
    """Open a TIFF file lazily; only headers are parsed, no pixel data are decoded.

    Parameters
    ----------
    path : str or os.PathLike
        TIFF, BigTIFF, OME-TIFF, ImageJ TIFF or Aperio SVS file. A folder is accepted when its
        TIFFs can be stacked (see :func:`open_tiffs`).
    series : int
        tifffile series to open. Series 0 is the main image (SVS thumbnails/labels/macros are
        later series).

    Returns
    -------
    TiffImage

    Raises
    ------
    TiffReadError
        When the file is missing, not a TIFF, corrupt or truncated, or compressed with a codec
        that is not available. The message names the file and the problem.
    """
    path = Path(path)
    if path.is_dir():
        images = open_tiffs(path)
        if len(images) != 1:
            raise TiffReadError(
                f"{path}: the {len(images)} TIFFs in this folder differ in shape, dtype or axes "
                "and cannot be stacked; open them one by one (open_tiffs returns them all)"
            )
        return images[0]
    if not path.exists():
        raise TiffReadError(f"{path}: file not found")

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises TiffFileError, struct.error, ValueError...
        raise TiffReadError(f"{path}: not a readable TIFF file ({exc})") from exc
    try:
        return _open_series(path, tif, series)
    except TiffReadError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise TiffReadError(
            f"{path}: cannot read TIFF structure ({type(exc).__name__}: {exc})"
        ) from exc


def _open_series(path: Path, tif: tifffile.TiffFile, series_index: int) -> TiffImage:
    if not tif.series:
        raise TiffReadError(f"{path}: corrupt TIFF: no readable image (IFD) found")
    if not 0 <= series_index < len(tif.series):
        raise TiffReadError(f"{path}: series {series_index} not found ({len(tif.series)} series)")
    series = tif.series[series_index]
    keyframe = series.keyframe
    _check_codec(path, keyframe)
    _check_truncation(path, series)

    axes = series.axes
    levels, handles, names = _lazy_levels(path, tif, series, series_index)
    # the engine's direct tile readers are made with the dask levels (reading every page's
    # IFD of a long stack is not paid at opening)
    sources = [
        None if isinstance(arr, np.memmap) else lvl
        for lvl, arr in zip(series.levels, levels, strict=True)
    ]

    rgb = "S" in axes and axes.endswith("S") and series.shape[-1] in (3, 4) and "C" not in axes
    if "C" in axes:
        channel_axis: int | None = axes.index("C")
    elif "S" in axes and not rgb:
        channel_axis = axes.index("S")
    else:
        channel_axis = None

    pixel_um = _pixel_size_um(tif, series_index, keyframe)
    scale = tuple(float(pixel_um.get(ax, 1.0) or 1.0) for ax in axes)
    channel_names = _channel_names(tif, series_index, axes, series.shape)

    metadata: dict[str, Any] = {
        "path": str(path),
        "shape": tuple(int(s) for s in series.shape),
        "dtype": str(series.dtype),
        "axes": axes,
        "pixel_size_um": {ax: pixel_um[ax] for ax in "ZYX" if ax in pixel_um} or None,
        "is_pyramid": len(levels) > 1,
        "level_shapes": [tuple(int(s) for s in lvl.shape) for lvl in levels],
        "compression": _compression_name(keyframe.compression),
        "tiled": bool(keyframe.is_tiled),
        "tile_shape": (int(keyframe.tilelength), int(keyframe.tilewidth))
        if keyframe.is_tiled
        else None,
        "kind": series.kind,
        "series": series_index,
        "n_series": len(tif.series),
    }
    if tif.is_shaped and tif.shaped_metadata:
        # tifffile's JSON description (e.g. written by write_synthetic_tiff: true_count).
        extra = {k: v for k, v in tif.shaped_metadata[0].items() if k != "shape"}
        if extra:
            metadata["tiff_metadata"] = extra
    return TiffImage(
        path=path,
        arrays=levels,
        axes=axes,
        channel_axis=channel_axis,
        channel_names=channel_names,
        scale=scale,
        rgb=bool(rgb),
        metadata=metadata,
        _handles=[tif, *handles],
        _names=names,
        _sources=sources,
    )


def _compression_name(compression: Any) -> str:
    return getattr(compression, "name", str(compression))


def _check_codec(path: Path, page: Any) -> None:
    """Fail early (not on the first tile read) when the decoder is missing."""
    compression = page.compression
    if compression == 1:
        return
    try:
        available = compression in tifffile.TIFF.DECOMPRESSORS
    except Exception:  # noqa: BLE001 - an unknown code behaves like a missing codec
        available = False
    if not available:
        name = _compression_name(compression)
        what = f"compression {name} (code {int(compression)})"
        if name == str(int(compression)):
            what = f"unknown compression (code {int(compression)})"
        raise TiffReadError(
            f"{path}: {what} cannot be decoded here; the codec is missing: pip install imagecodecs"
        )


def _check_truncation(path: Path, series: Any) -> None:
    """Cheap check that the pixel data of the first/last page of each level lie in the file."""
    for level in series.levels:
        pages = [p for p in (level.pages[0], level.pages[-1]) if p is not None]
        for page in pages:
            # The page's own file: OME multi-file series span several files.
            size = page.parent.filehandle.size
            offsets = np.asarray(getattr(page, "dataoffsets", ()), dtype=np.int64)
            counts = np.asarray(getattr(page, "databytecounts", ()), dtype=np.int64)
            if offsets.size == 0 or counts.size != offsets.size:
                continue
            used = counts > 0  # empty (sparse) tiles have offset 0 and count 0
            if not used.any():
                continue
            end = int((offsets[used] + counts[used]).max())
            if end > size:
                raise TiffReadError(
                    f"{page.parent.filehandle.path}: file is truncated or corrupt: image data "
                    f"extend to byte {end:,} but the file has only {size:,} bytes"
                )


def _lazy_levels(
    path: Path, tif: tifffile.TiffFile, series: Any, series_index: int
) -> tuple[list[Any], list[Any], list[str]]:
    """Per level a zarr array or a memory map, the handles to close, and dask names."""
    levels: list[Any] = []
    handles: list[Any] = []
    names: list[str] = []
    group = None
    stat = path.stat()
    token = f"{path.resolve()}-{stat.st_mtime_ns}-{stat.st_size}-s{series_index}"
    for index, level in enumerate(series.levels):
        names.append(f"tiff-{hashlib.md5(token.encode()).hexdigest()}-l{index}")
        offset = level.dataoffset
        if offset is not None and level.keyframe.compression == 1 and level.size > 0:
            # Contiguous uncompressed data: a memory map gives random access without decoding
            # the whole (possibly single-strip) image.
            dtype = np.dtype(level.dtype).newbyteorder(tif.byteorder)
            fh = level.keyframe.parent.filehandle
            levels.append(
                np.memmap(fh.path, dtype=dtype, mode="r", offset=offset, shape=level.shape)
            )
        else:
            import zarr  # 0.2 s: only files with compressed or tiled data need it

            if group is None:
                store = series.aszarr(multiscales=True)
                handles.append(store)
                group = zarr.open(store, mode="r")
            levels.append(group[str(index)] if isinstance(group, zarr.Group) else group)
    return levels, handles, names


def _to_dask(arr: Any, name: str | None, source: Any = None) -> da.Array:
    """Wrap one level (zarr array, memory map or dask array) in dask; ``source``: the engine's
    direct reader of the level, if it has one."""
    import dask.array as da

    if isinstance(arr, da.Array):
        return arr
    if isinstance(arr, np.memmap):
        return da.from_array(arr, chunks=_memmap_chunks(arr.shape, arr.dtype), name=name)
    out = _merge_thin_chunks(da.from_zarr(arr, name=name, inline_array=True))
    # the detection engine reads chunks from the zarr array or tifffile directly (no dask
    # graph per chunk); napari and everything else use the dask array
    out.yolocell_source = arr if source is None else source
    return out


def _memmap_chunks(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    # One plane row-band of ~1024 rows per chunk; non-spatial axes chunked per plane.
    chunks = [1] * len(shape)
    spatial = 3 if len(shape) >= 3 and shape[-1] in (3, 4) else 2
    for i in range(len(shape) - spatial, len(shape)):
        chunks[i] = shape[i]
    y = len(shape) - spatial
    chunks[y] = min(shape[y], 1024)
    if spatial == 3 or len(shape) < 2:
        return tuple(chunks)
    chunks[y + 1] = min(shape[y + 1], 1024)
    return tuple(chunks)


def _merge_thin_chunks(arr: da.Array) -> da.Array:
    """Merge 1-row (or few-row) strips into bands so dask graphs stay small."""
    if arr.ndim < 2:
        return arr
    # Y is the second-to-last axis, or third-to-last for interleaved samples (YXS).
    y = arr.ndim - 2
    if arr.ndim >= 3 and arr.shape[-1] in (3, 4) and arr.chunks[-1] == (arr.shape[-1],):
        y = arr.ndim - 3
    rows = max(arr.chunks[y])
    if rows >= _THIN_ROWS or arr.shape[y] <= rows:
        return arr
    band = min(arr.shape[y], rows * -(-_MIN_CHUNK_ROWS // rows))
    return arr.rechunk({y: band})


def _pixel_size_um(tif: tifffile.TiffFile, series_index: int, page: Any) -> dict[str, float]:
    """Pixel size per axis in micrometres from OME, ImageJ, SVS or resolution tags."""
    try:
        if tif.is_ome and tif.ome_metadata:
            sizes = _ome_pixel_size(tif.ome_metadata, series_index)
            if sizes:
                return sizes
        if tif.is_svs:
            match = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
            if match:
                mpp = float(match.group(1))
                return {"Y": mpp, "X": mpp}
        ij = tif.imagej_metadata if tif.is_imagej else None
        xres, yres = page.resolution
        if ij is not None:
            factor = _UNIT_TO_UM.get(
                str(ij.get("unit", "")).strip().lower().replace("\\u00b5", "µ")
            )
            if factor is None:
                return {}
            out = {}
            if xres and yres and (xres, yres) != (1.0, 1.0):
                out = {"Y": factor / yres, "X": factor / xres}
            if "spacing" in ij:
                out["Z"] = float(ij["spacing"]) * factor
            return out
        unit = int(page.resolutionunit)
        factor = {2: 25400.0, 3: 1e4}.get(unit)  # INCH, CENTIMETER
        if factor and xres and yres and (xres, yres) != (1.0, 1.0):
            return {"Y": factor / yres, "X": factor / xres}
    except Exception:  # noqa: BLE001 - odd metadata must never prevent opening the pixels
        pass
    return {}


def _ome_image(ome_xml: str, series_index: int) -> ET.Element | None:
    root = ET.fromstring(ome_xml)
    images = [el for el in root if el.tag.rsplit("}", 1)[-1] == "Image"]
    if not images:
        return None
    return images[min(series_index, len(images) - 1)]


def _ome_pixels(ome_xml: str, series_index: int) -> ET.Element | None:
    image = _ome_image(ome_xml, series_index)
    if image is None:
        return None
    for el in image:
        if el.tag.rsplit("}", 1)[-1] == "Pixels":
            return el
    return None


def _ome_pixel_size(ome_xml: str, series_index: int) -> dict[str, float]:
    pixels = _ome_pixels(ome_xml, series_index)
    if pixels is None:
        return {}
    out = {}
    for ax in "XYZ":
        value = pixels.get(f"PhysicalSize{ax}")
        if value is None:
            continue
        unit = pixels.get(f"PhysicalSize{ax}Unit", "µm").strip().lower()
        factor = _UNIT_TO_UM.get(unit)
        if factor is not None and float(value) > 0:
            out[ax] = float(value) * factor
    return out


def _channel_names(
    tif: tifffile.TiffFile, series_index: int, axes: str, shape: tuple[int, ...]
) -> list[str] | None:
    if "C" not in axes:
        return None
    n_channels = shape[axes.index("C")]
    try:
        if tif.is_ome and tif.ome_metadata:
            pixels = _ome_pixels(tif.ome_metadata, series_index)
            if pixels is not None:
                channels = [el for el in pixels if el.tag.rsplit("}", 1)[-1] == "Channel"]
                names = [c.get("Name") or f"channel {i}" for i, c in enumerate(channels)]
                if len(names) == n_channels and any(c.get("Name") for c in channels):
                    return names
        if tif.is_imagej and tif.imagej_metadata:
            labels = tif.imagej_metadata.get("Labels")
            if isinstance(labels, list | tuple) and len(labels) >= n_channels and n_channels > 1:
                names = [str(x) for x in labels[:n_channels]]
                if len(set(names)) == n_channels:
                    return names
    except Exception:  # noqa: BLE001 - names are cosmetic
        pass
    return None


def _stackable(images: list[TiffImage]) -> bool:
    first = images[0]
    return all(
        im.axes == first.axes
        and im.dtype == first.dtype
        and [a.shape for a in im.arrays] == [a.shape for a in first.arrays]
        for im in images[1:]
    )


def _stack(folder: Path, images: list[TiffImage]) -> TiffImage:
    import dask.array as da

    first = images[0]
    levels = [da.stack([im.levels[i] for im in images], axis=0) for i in range(len(first.levels))]
    metadata = dict(first.metadata)
    metadata.update(
        path=str(folder),
        shape=tuple(int(s) for s in levels[0].shape),
        axes="I" + first.axes,
        level_shapes=[tuple(int(s) for s in lvl.shape) for lvl in levels],
        files=[str(im.path) for im in images],
    )
    return TiffImage(
        path=folder,
        arrays=levels,
        axes="I" + first.axes,
        channel_axis=None if first.channel_axis is None else first.channel_axis + 1,
        channel_names=first.channel_names,
        scale=(1.0, *first.scale),
        rgb=first.rgb,
        metadata=metadata,
        _handles=[h for im in images for h in im._handles],
    )
