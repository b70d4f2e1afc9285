"""Lazy opening of OME-Zarr (OME-NGFF 0.4 and 0.5) multiscale images.

An OME-Zarr image is a folder (``name.zarr`` / ``name.ome.zarr``): a zarr group whose
attributes hold ``multiscales`` (NGFF 0.4: ``.zattrs``; 0.5: ``zarr.json`` under ``ome``) with
the axes and one dataset path per resolution level, full resolution first. Only that metadata is
read on opening; pixels are read chunk by chunk when the detection engine asks for a window,
through dask arrays on the zarr arrays (the same lazy path as the TIFF reader). zarr itself reads
both formats, so no OME-specific library is needed at run time.

Supported: the image group itself, or a bioformats2raw container (series ``0``). Size-1
non-spatial axes (``t``, ``c``, ``z`` of length 1) are squeezed, as tifffile does for TIFFs, so a
single-channel 2-D image is plain ``YX``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from napari_yolocell.io.zarr_files import ZARR_SUFFIXES, is_ngff_image, is_zarr_path

__all__ = ["ZARR_SUFFIXES", "OmeZarrImage", "is_ngff_image", "is_zarr_path", "open_omezarr"]

# Micrometres per NGFF (UDUNITS-2) length unit.
_UNIT_TO_UM = {
    "angstrom": 1e-4,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
    "inch": 25400.0,
}


@dataclass
class OmeZarrImage:
    """A lazily opened OME-Zarr image.

    Attributes
    ----------
    path : pathlib.Path
        The ``.zarr`` folder.
    levels : list of dask.array.Array
        Resolution levels, full resolution first (squeezed like :attr:`axes`).
    axes : str
        Axis codes as the TIFF reader's (``"YX"``, ``"CYX"``, ``"TZCYX"``...).
    channel_axis : int or None
        Index of the channel axis in :attr:`axes`, None when there is none.
    channel_names : list of str or None
        ``omero`` channel labels, when present.
    scale : tuple of float
        Pixel spacing per axis of level 0 (micrometres for space axes with a known unit).
    metadata : dict
        path, shape, dtype, axes, pixel_size_um (``{"Y": .., "X": ..}`` or None), level_shapes,
        ngff_version, chunks.
    """

    path: Path
    levels: list[da.Array]
    axes: str
    channel_axis: int | None = None
    channel_names: list[str] | None = None
    scale: tuple[float, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> da.Array:
        """Full-resolution level."""
        return self.levels[0]

    def close(self) -> None:
        """Nothing to close (zarr opens chunk files per read); kept for symmetry with TIFFs."""


def _ome_attrs(group: zarr.Group) -> dict[str, Any]:
    """NGFF attributes of a group: 0.5 nests them under ``ome``, 0.4 keeps them at the top."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    if isinstance(ome, dict):
        merged = dict(ome)
        merged.setdefault("version", ome.get("version"))
        return merged
    return attrs


def _image_group(path: Path) -> tuple[zarr.Group, dict[str, Any]]:
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several kinds for a folder that is no zarr group
        raise ValueError(f"{path}: not a zarr group ({type(exc).__name__}: {exc})") from exc
    attrs = _ome_attrs(group)
    if "multiscales" not in attrs and "bioformats2raw.layout" in attrs:
        # bioformats2raw: the images are numbered child groups; the first series is the image
        try:
            child = group["0"]
        except KeyError:
            raise ValueError(f"{path}: bioformats2raw container without series 0") from None
        group, attrs = child, _ome_attrs(child)
    if "plate" in attrs or "well" in attrs:
        raise ValueError(f"{path}: an OME-Zarr plate/well; give the path of one field image")
    if not isinstance(attrs.get("multiscales"), list) or not attrs["multiscales"]:
        raise ValueError(f"{path}: not an OME-Zarr image (no NGFF 'multiscales' metadata)")
    return group, attrs


def _axes(ms: dict[str, Any], ndim: int, path: Path) -> list[dict[str, Any]]:
    axes = ms.get("axes")
    if axes is None:  # NGFF <= 0.3 had no axes: always TCZYX, trailing ones kept
        return [{"name": n} for n in "tczyx"[5 - ndim :]]
    axes = [{"name": a} if isinstance(a, str) else dict(a) for a in axes]
    if len(axes) != ndim:
        raise ValueError(f"{path}: {len(axes)} axes in the metadata but {ndim}-D arrays")
    names = [str(a.get("name", "")).lower() for a in axes]
    if names[-2:] != ["y", "x"]:
        raise ValueError(f"{path}: the last two axes must be y, x (got {', '.join(names)})")
    return axes


def _scale(datasets: dict[str, Any], ms: dict[str, Any], ndim: int) -> list[float]:
    """Level 0's scale: the dataset's ``scale`` transform times the multiscale's own, if any."""
    scale = np.ones(ndim)
    for transforms in (
        datasets.get("coordinateTransformations"),
        ms.get("coordinateTransformations"),
    ):
        for t in transforms or []:
            if isinstance(t, dict) and t.get("type") == "scale" and len(t.get("scale", ())) == ndim:
                scale *= np.asarray(t["scale"], dtype=float)
    return [float(s) for s in scale]


def open_omezarr(path: str | os.PathLike) -> OmeZarrImage:
    """Open an OME-Zarr image lazily (metadata only; pixels are read on demand).

    Parameters
    ----------
    path : path
        The ``.zarr`` / ``.ome.zarr`` folder of one image (or a bioformats2raw container).

    Returns
    -------
    OmeZarrImage

    Raises
    ------
    FileNotFoundError
        The folder does not exist.
    ValueError
        Not a zarr group, no NGFF ``multiscales``, missing or mismatched levels, unexpected
        axes (one line naming the path).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    group, attrs = _image_group(path)
    ms = attrs["multiscales"][0]
    datasets = ms.get("datasets") or []
    if not datasets:
        raise ValueError(f"{path}: OME-Zarr multiscales lists no datasets (resolution levels)")
    arrays = []
    for ds in datasets:
        key = str(ds.get("path", ""))
        try:
            arr = group[key]
        except KeyError:
            raise ValueError(f"{path}: resolution level {key!r} is missing") from None
        if not isinstance(arr, zarr.Array):
            raise ValueError(f"{path}: resolution level {key!r} is not an array")
        arrays.append(arr)
    ndim = arrays[0].ndim
    if ndim < 2 or any(a.ndim != ndim for a in arrays):
        shapes = ", ".join(str(a.shape) for a in arrays)
        raise ValueError(f"{path}: levels need the same number (>= 2) of dimensions: {shapes}")
    axes = _axes(ms, ndim, path)
    names = [str(a.get("name", "")).lower() for a in axes]
    scale = _scale(datasets[0], ms, ndim)
    # squeeze size-1 axes other than y, x (tifffile does the same for TIFFs)
    keep = [i for i in range(ndim) if arrays[0].shape[i] > 1 or i >= ndim - 2]
    index = tuple(slice(None) if i in keep else 0 for i in range(ndim))
    stat = path.stat()
    levels = []
    for i, arr in enumerate(arrays):
        name = f"omezarr-{path.resolve()}-{stat.st_mtime_ns}-l{i}"
        lazy = da.from_zarr(arr, name=name, inline_array=True)
        levels.append(lazy[index] if len(keep) < ndim else lazy)
    codes = "".join(_code(names[i], axes[i]) for i in keep)
    channel_axis = codes.index("C") if "C" in codes else None
    units = {names[i]: str(axes[i].get("unit", "")).lower() for i in range(ndim)}
    pixel_um: dict[str, float] = {}
    for ax in ("z", "y", "x"):
        if ax in names and units.get(ax) in _UNIT_TO_UM:
            pixel_um[ax.upper()] = scale[names.index(ax)] * _UNIT_TO_UM[units[ax]]
    level_scale = tuple(pixel_um.get(names[i].upper(), scale[i]) for i in keep)
    channel_names = None
    omero = attrs.get("omero")
    if isinstance(omero, dict) and isinstance(omero.get("channels"), list):
        channel_names = [str(c.get("label", i)) for i, c in enumerate(omero["channels"])]
    metadata = {
        "path": str(path),
        "shape": tuple(levels[0].shape),
        "dtype": str(levels[0].dtype),
        "axes": codes,
        "pixel_size_um": {k: v for k, v in pixel_um.items() if k in "YX"} or None,
        "is_pyramid": len(levels) > 1,
        "level_shapes": [tuple(a.shape) for a in levels],
        "ngff_version": str(attrs.get("version") or ms.get("version") or ""),
        "chunks": tuple(arrays[0].chunks),
        "kind": "ome-zarr",
    }
    return OmeZarrImage(
        path=path,
        levels=levels,
        axes=codes,
        channel_axis=channel_axis,
        channel_names=channel_names,
        scale=level_scale,
        metadata=metadata,
    )


def _code(name: str, axis: dict[str, Any]) -> str:
    """NGFF axis -> the TIFF reader's one-letter code (channel-typed axes are ``C``)."""
    if str(axis.get("type", "")).lower() == "channel" or name == "c":
        return "C"
    return {"t": "T", "z": "Z", "y": "Y", "x": "X"}.get(name, "Q")
