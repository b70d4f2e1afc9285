"""npe2 reader: open (large, pyramidal) TIFFs and OME-Zarr images lazily as napari Image layers.

Dispatch rule (``napari_get_reader``):

* a folder that is an OME-Zarr image (NGFF 0.4/0.5: its ``.zattrs`` / ``zarr.json`` names
  ``multiscales`` or ``bioformats2raw.layout``) -> :func:`read_omezarr`; other zarr folders
  (plain arrays or groups, plates, wells) -> None. A broken NGFF image it claimed (missing
  level, unexpected axes, unreadable metadata) raises a one-line ``ValueError`` naming it;
* a path whose name does not end in a TIFF suffix -> None (other readers get a chance);
* a TIFF-named file that starts with another format's signature (a PNG/JPEG/GIF/BMP/JPEG 2000
  saved as ``.tif``) -> None, so napari's builtin readers can try it;
* any other TIFF-named file -> the reader. Corruption found while opening (bad header,
  truncated data, broken IFDs, missing codec) is raised by the reader function as a
  :class:`~napari_yolocell.io.tiff.TiffReadError` naming the file, so napari shows a clear
  error instead of "no reader found". Only 4 bytes are read to decide;
* a folder containing TIFFs -> the reader (same-shape files are stacked lazily).

Answering imports nothing beyond the standard library; reading a TIFF imports numpy, tifffile
and, for compressed or tiled files, zarr. TIFF layers get the levels as opened (zarr arrays or
memory maps, :attr:`~napari_yolocell.io.tiff.TiffImage.arrays`), not dask arrays: a cold open
through npe2 then skips importing dask (and, on the first compute, dask.distributed). OME-Zarr
layers get :func:`~napari_yolocell.io.omezarr.open_omezarr`'s dask levels (size-1 axes
squeezed, as the detection engine sees them), so reading one imports dask too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_yolocell.io.tiff_files import is_tiff_path, list_tiffs
from napari_yolocell.io.zarr_files import is_ngff_image

if TYPE_CHECKING:
    import numpy as np

    from napari_yolocell.io.omezarr import OmeZarrImage
    from napari_yolocell.io.tiff import TiffImage

LayerData = tuple[Any, dict[str, Any], str]
PathLike = str | os.PathLike

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # TIFF and BigTIFF
# Largest plane side used to compute contrast limits (a crop of the smallest level).
_CONTRAST_SIDE = 1024


def _as_list(path: PathLike | Sequence[PathLike]) -> list[PathLike]:
    """napari passes one path or a list of them."""
    return [path] if isinstance(path, str | os.PathLike) else list(path)


def napari_get_reader(path: PathLike | Sequence[PathLike]) -> Callable[..., list[LayerData]] | None:
    """Return a reader function when ``path`` looks like data this plugin handles.

    Parameters
    ----------
    path : str, os.PathLike or list of them
        File, folder, or list of files/folders.

    Returns
    -------
    callable or None
        :func:`read_tiff` (TIFFs), :func:`read_omezarr` (OME-Zarr images), :func:`read_images`
        (a list mixing both) or None when another reader should handle the path.
    """
    paths = _as_list(path)
    kinds = {_kind(p) for p in paths}
    if not paths or None in kinds:
        return None
    if kinds == {"tiff"}:
        return read_tiff
    return read_omezarr if kinds == {"zarr"} else read_images


def _kind(path: PathLike) -> str | None:
    """``"zarr"``, ``"tiff"`` or None (not ours); stdlib only, reads at most one small file."""
    if is_ngff_image(path):  # before the TIFF folder rule: an image folder is never a stack
        return "zarr"
    return "tiff" if _accepts_tiff(path) else None


def _accepts_tiff(path: PathLike) -> bool:
    p = Path(path)
    if p.is_dir():
        try:
            return bool(list_tiffs(p))
        except OSError:
            return False
    if not is_tiff_path(p):
        return False
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return True  # let the reader raise a clear error (permissions, vanished file)
    # A header-less or empty file is reported as corrupt by the reader; a different format
    # with a TIFF name (PNG/JPEG renamed) is left to other readers.
    return head in _TIFF_MAGIC or len(head) < 4 or not _known_other_format(head)


def _known_other_format(head: bytes) -> bool:
    return head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"\x00\x00\x00\x0cjP"))


def read_tiff(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Read TIFF file(s)/folder(s) lazily into napari layer data tuples.

    Parameters
    ----------
    path : str, os.PathLike or list of them
        Files or folders.

    Returns
    -------
    list of (data, kwargs, "image")
        ``data`` is the list of resolution levels (multiscale) for pyramids, else one lazy array
        (zarr array or memory map; a dask array for a stacked folder).

    Raises
    ------
    napari_yolocell.io.tiff.TiffReadError
        Corrupt/truncated file or unavailable codec; the message names the file.
    """
    from napari_yolocell.io.tiff import open_tiffs

    paths = _as_list(path)
    layers: list[LayerData] = []
    for p in paths:
        for image in open_tiffs(p):
            layers.append(layer_data(image))
    return layers


def read_omezarr(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Read OME-Zarr image folder(s) lazily into napari layer data tuples.

    Parameters
    ----------
    path : str, os.PathLike or list of them
        ``.zarr`` / ``.ome.zarr`` image folders (NGFF 0.4 or 0.5).

    Returns
    -------
    list of (data, kwargs, "image")
        One per image: the list of resolution levels (multiscale) when there are several,
        else the one lazy level; size-1 non-spatial axes squeezed, channels split.

    Raises
    ------
    ValueError
        A broken NGFF image (no zarr group, missing level, unexpected axes): one line naming
        the folder.
    """
    from napari_yolocell.io.omezarr import open_omezarr

    paths = _as_list(path)
    layers: list[LayerData] = []
    for p in paths:
        try:
            image = open_omezarr(p)
        except (OSError, ValueError) as exc:
            # zarr's own messages can span lines; napari shows the first one best
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            message = lines[0] if str(p) in lines[0] else f"{p}: {lines[0]}"
            raise ValueError(message) from exc
        layers.append(omezarr_layer_data(image))
    return layers


def read_images(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Read a list mixing TIFFs and OME-Zarr images, in the order given.

    Parameters
    ----------
    path : str, os.PathLike or list of them
        Paths :func:`napari_get_reader` accepted.

    Returns
    -------
    list of (data, kwargs, "image")
    """
    paths = _as_list(path)
    layers: list[LayerData] = []
    for p in paths:
        layers.extend(read_omezarr(p) if is_ngff_image(p) else read_tiff(p))
    return layers


def layer_data(image: TiffImage) -> LayerData:
    """Convert a :class:`TiffImage` into one napari Image layer data tuple.

    Parameters
    ----------
    image : TiffImage
        Opened image.

    Returns
    -------
    tuple
        ``(data, kwargs, "image")``.
    """
    return _layer_tuple(image, _layer_arrays(image), image.rgb)


def omezarr_layer_data(image: OmeZarrImage) -> LayerData:
    """Convert an :class:`~napari_yolocell.io.omezarr.OmeZarrImage` into a layer data tuple.

    Parameters
    ----------
    image : OmeZarrImage
        Opened image (its levels are lazy dask arrays; nothing is read but a contrast sample).

    Returns
    -------
    tuple
        ``(data, kwargs, "image")``, with the same keys as :func:`layer_data`.
    """
    return _layer_tuple(image, image.levels, rgb=False)


def _layer_tuple(image: TiffImage | OmeZarrImage, arrays: list[Any], rgb: bool) -> LayerData:
    multiscale = len(arrays) > 1
    data: Any = list(arrays) if multiscale else arrays[0]
    # napari drops the channel and RGB-sample axes from each layer: scale must match.
    dropped = {image.channel_axis} if image.channel_axis is not None else set()
    if rgb:
        dropped.add(len(image.axes) - 1)
    scale = [s for i, s in enumerate(image.scale) if i not in dropped]
    name = _stem(image.path)
    kwargs: dict[str, Any] = {
        "multiscale": multiscale,
        "rgb": rgb,
        "scale": scale,
        "metadata": {**image.metadata, "path": str(image.path)},
    }
    if image.channel_axis is not None:
        kwargs["channel_axis"] = image.channel_axis
        n = arrays[0].shape[image.channel_axis]
        names = image.channel_names or []
        names = names if len(names) == n else [f"ch{i}" for i in range(n)]
        kwargs["name"] = [f"{name} [{c}]" for c in names]
        kwargs["blending"] = "additive"
    else:
        kwargs["name"] = name
    if not rgb:
        limits = _sample_limits(arrays[-1], image.axes, image.channel_axis, rgb)
        if limits is not None:
            kwargs["contrast_limits"] = limits
    return data, kwargs, "image"


def _layer_arrays(image: TiffImage) -> list[Any]:
    """The levels napari gets: as opened (zarr arrays, memory maps), without dask.

    Except zarr arrays with a channel axis: napari splits channels by slicing and wraps zarr
    arrays in dask to do it (importing dask anyway), with one dask chunk per TIFF strip; our
    dask levels merge thin strips into bands.
    """
    import numpy as np

    if image.channel_axis is not None and not all(isinstance(a, np.ndarray) for a in image.arrays):
        return image.levels
    return image.arrays


def contrast_limits(image: TiffImage) -> list[float] | list[list[float]] | None:
    """Contrast limits from a small sample: a central crop of the smallest level.

    napari would otherwise compute them from the full-resolution data (reading everything).

    Parameters
    ----------
    image : TiffImage
        Opened image.

    Returns
    -------
    list
        ``[lo, hi]``, or one pair per channel when there is a channel axis; None when the
        sample could not be read.
    """
    # read directly: a dask compute would import dask.distributed
    return _sample_limits(image.arrays[-1], image.axes, image.channel_axis, image.rgb)


def _sample_limits(
    arr: Any, axes: str, channel_axis: int | None, rgb: bool
) -> list[float] | list[list[float]] | None:
    """:func:`contrast_limits` of one (the smallest) level ``arr`` with axis codes ``axes``."""
    import numpy as np

    spatial = {i for i, ax in enumerate(axes) if ax in "YX"}
    index: list[Any] = []
    for i, (ax, n) in enumerate(zip(axes, arr.shape, strict=True)):
        if i == channel_axis:
            index.append(slice(None))
        elif i in spatial:
            start = max(0, (n - _CONTRAST_SIDE) // 2)
            index.append(slice(start, start + _CONTRAST_SIDE))
        elif ax == "S" and rgb:
            index.append(slice(None))
        else:
            index.append(n // 2)  # middle plane of Z/T/...
    try:
        sample = _materialise(arr[tuple(index)])
    except Exception:  # noqa: BLE001 - a corrupt tile must not prevent opening the layer
        return None
    if channel_axis is None:
        return _limits(sample)
    # channel axis position inside the sample: count earlier axes that were kept
    c = sum(1 for i in range(channel_axis) if not isinstance(index[i], int))
    return [_limits(np.take(sample, k, axis=c)) for k in range(sample.shape[c])]


def _materialise(window: Any) -> np.ndarray:
    """A window as numpy; a dask window (stacked folder) is computed in this thread."""
    import numpy as np

    if hasattr(window, "dask"):
        return np.asarray(window.compute(scheduler="synchronous"))
    return np.asarray(window)


def _limits(sample: np.ndarray) -> list[float]:
    import numpy as np

    if sample.size == 0:
        return [0.0, 1.0]
    finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample.ravel()
    if finite.size == 0:
        return [0.0, 1.0]
    lo, hi = np.percentile(finite, [0.1, 99.9])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1
    return [float(lo), float(hi)]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name
