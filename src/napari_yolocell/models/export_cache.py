"""Offline ONNX / OpenVINO exports of ultralytics detectors, cached per user.

The ONNX Runtime and OpenVINO backends (:mod:`napari_yolocell.models`) run an exported copy
of the network. Exporting takes seconds, so each export is made once per weights file and kept
in ``<cache>/<sha256 of the weights>/<format>-v<N>/``:

- ``onnx-vN/model.onnx``: the raw detection head output ``(N, 4 + nc, anchors)``, with a
  dynamic batch, height and width, so one file serves every tile size and batch size;
- ``openvino-vN/model.xml`` + ``model.bin``: the same graph as OpenVINO IR (FP32, not
  compressed to FP16, so answers match PyTorch's); it is reshaped to a static input shape when
  compiled;
- ``meta.json`` next to each: the checkpoint's ``"yolocell"`` settings, class names, stride.

An export of a checkpoint that is not bundled is made from its pickle-free form in
``torch-v1/`` (:mod:`~napari_yolocell.models.torch_cache`), so the pickle is read at most once.

The cache folder is ``$YOLOCELL_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/napari-yolocell/exports``
(``~/.cache/napari-yolocell/exports``), created 0700. An export is written to a private
temporary folder beside its final place, signed with the user's cache key
(:func:`~napari_yolocell.models.user_cache.sign_folder`: every file and ``meta.json``) and
renamed into place (``os.replace``), so a crash never leaves a half export and concurrent
workers (``--workers``, dask) can export the same model at once safely. An export folder whose
signature does not verify (planted, edited) is deleted and made again. Delete the folder to
reclaim the space; it is rebuilt on demand.

We export with :func:`torch.onnx.export` ourselves instead of ``YOLO.export``: the ultralytics
exporter writes next to the weights (read-only for bundled models), and its requirement checks
may try to ``pip install`` packages, which must never happen offline.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from napari_yolocell.models import torch_cache
from napari_yolocell.models.checkpoints import load_network, network_family
from napari_yolocell.models.ultralytics_env import import_ultralytics
from napari_yolocell.models.user_cache import (
    cache_root,
    entry_tempdir,
    sign_folder,
    verify_folder,
    weights_sha256,
)

FORMATS = ("onnx", "openvino")
#: Bump when the export recipe changes: old exports are then ignored (and may be deleted).
EXPORT_VERSION = 1
ONNX_OPSET = 17
META_FILE = "meta.json"
_MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}

__all__ = ["cache_root", "cached_export", "export_dir", "export_onnx", "weights_sha256"]


def export_dir(key: str, fmt: str, root: Path | None = None) -> Path:
    """Where the ``fmt`` export of the weights with SHA-256 ``key`` lives."""
    _check_format(fmt)
    return (root or cache_root()) / key / f"{fmt}-v{EXPORT_VERSION}"


def model_file(folder: Path, fmt: str) -> Path:
    """The file a runtime loads from an export folder."""
    return Path(folder) / _MODEL_FILES[fmt]


def read_meta(folder: Path) -> dict[str, Any]:
    """The ``meta.json`` of an export folder (empty dict if missing or unreadable)."""
    try:
        return json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def cached_export(spec, fmt: str, model=None, root: Path | None = None) -> Path:
    """Folder of the ``fmt`` export of ``spec``'s weights, exporting it on first use.

    Parameters
    ----------
    spec : ModelSpec
        A model with a weights file (``spec.path``); its SHA-256 keys the cache.
    fmt : {"onnx", "openvino"}
        Export format.
    model : ultralytics.YOLO, optional
        The already loaded model; loaded only when an export is needed: bundled weights from
        ``spec.path``, others from their pickle-free cached form
        (:func:`~napari_yolocell.models.torch_cache.load_network_cached`).
    root : pathlib.Path, optional
        Cache folder (default :func:`cache_root`).

    Returns
    -------
    pathlib.Path
        The export folder (see :func:`model_file`, :func:`read_meta`).

    Raises
    ------
    ValueError
        Unreadable weights (names the file).
    """
    _check_format(fmt)
    key = weights_sha256(spec.path, spec.sha256)
    final = export_dir(key, fmt, root)
    if model_file(final, fmt).is_file() and verify_folder(final, _purpose(fmt, key)):
        return final
    if model is None and spec.sha256 is not None:  # bundled: the bytes read are hash-checked
        model = load_network(spec.path, trusted=True, sha256=spec.unpacked_sha256 or spec.sha256)
    elif model is None:  # never the pickle again once converted (:mod:`torch_cache`)
        # the bytes loaded must be the ones hashed for the key (no swap in between)
        model = torch_cache.load_network_cached(spec.path, root=root, sha256=key)
    if fmt == "openvino":
        onnx_dir = cached_export(spec, "onnx", model=model, root=root)
        build = lambda tmp: _onnx_to_openvino(model_file(onnx_dir, "onnx"), tmp)  # noqa: E731
    else:
        build = lambda tmp: export_onnx(model, model_file(tmp, "onnx"))  # noqa: E731
    return _build_atomically(final, build, _meta(model, spec), _purpose(fmt, key))


def _purpose(fmt: str, key: str) -> str:
    return f"{fmt}-v{EXPORT_VERSION}:{key}"


def temporary_export(model, fmt: str) -> tempfile.TemporaryDirectory:
    """Export an in-memory model (an untrained YAML architecture) to a fresh temp folder.

    Untrained architectures get new random weights at every load, so their exports are not
    cached on disk. The folder is deleted when the returned object is garbage collected.
    """
    _check_format(fmt)
    tmp = tempfile.TemporaryDirectory(prefix="yolocell-export-")
    folder = Path(tmp.name)
    export_onnx(model, model_file(folder, "onnx"))
    if fmt == "openvino":
        _onnx_to_openvino(model_file(folder, "onnx"), folder)
    return tmp


def export_onnx(model, path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Export an ultralytics detection model to ONNX with dynamic batch, height and width.

    The graph ends at the detection head's raw output ``(N, 4 + nc, anchors)`` (boxes as
    centre-x, centre-y, width, height in input pixels, then per-class scores), exactly what
    PyTorch gives ultralytics' non-maximum suppression; NMS itself is not exported.

    Parameters
    ----------
    model : ultralytics.YOLO or torch.nn.Module
        Detection model (``YOLO`` object or its ``.model``).
    path : str or Path
        Output ``.onnx`` file.
    opset : int
        ONNX opset.
    """
    import torch

    import_ultralytics()
    from ultralytics.nn.modules.head import Detect

    net = getattr(model, "model", model)
    net = copy.deepcopy(net).cpu().float().eval()
    for param in net.parameters():
        param.requires_grad = False
    if hasattr(net, "fuse"):
        net = net.fuse(verbose=False)  # the same fused graph ultralytics' predictor runs
    for module in net.modules():
        if isinstance(module, Detect):
            # Export mode: the head returns its decoded tensor only; dynamic: anchors rebuilt
            # from the feature-map size, so any input size works.
            module.export, module.dynamic, module.format = True, True, "onnx"
            module.shape = None
            if hasattr(module, "xyxy"):
                module.xyxy = False
    example = torch.zeros(1, 3, 64, 64)
    net(example)  # dry run: builds the anchors once, as the ultralytics exporter does
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"dynamo": False} if "dynamo" in _export_params(torch.onnx.export) else {}
    with warnings.catch_warnings():
        # the TorchScript-based exporter is deprecated but needs no extra package (onnxscript)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            example,
            str(path),
            opset_version=opset,
            input_names=["images"],
            output_names=["output0"],
            dynamic_axes={
                "images": {0: "batch", 2: "height", 3: "width"},
                "output0": {0: "batch", 2: "anchors"},
            },
            **kwargs,
        )
    return path


def clear_cache(root: Path | None = None) -> None:
    """Delete every cached export."""
    shutil.rmtree(root or cache_root(), ignore_errors=True)


def _export_params(func) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return set()


def _onnx_to_openvino(onnx_path: Path, folder: Path) -> Path:
    import openvino as ov

    # Core.read_model, not ov.convert_model: the converter (ovc) sends usage telemetry by
    # default, and nothing here may reach the network.
    ov_model = ov.Core().read_model(str(onnx_path))
    xml = model_file(folder, "openvino")
    # FP32 on disk: ov.save_model compresses weights to FP16 by default, which changes answers.
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)
    return xml


def _meta(model, spec) -> dict[str, Any]:
    ckpt = getattr(model, "ckpt", None)
    settings = ckpt.get("yolocell") if isinstance(ckpt, dict) else None
    net = getattr(model, "model", model)
    names = getattr(net, "names", None) or getattr(model, "names", None) or {}
    stride = getattr(net, "stride", None)
    meta = {
        "source": str(spec.path),
        "export_version": EXPORT_VERSION,
        "names": {str(k): str(v) for k, v in dict(names).items()},
        "stride": int(max(stride.tolist())) if stride is not None else 32,
        "yolocell": settings if isinstance(settings, dict) else None,
        "family": network_family(model),
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError):  # exotic settings in the checkpoint: keep the rest
        meta["yolocell"] = None
    return meta


def _build_atomically(final: Path, build, meta: dict[str, Any], purpose: str) -> Path:
    """Run ``build(tmp_folder)`` in a private temp folder next to ``final``, sign it, then rename
    it into place."""
    if final.exists() or final.is_symlink():  # damaged, planted or stale: never used
        if final.is_symlink() or final.is_file():
            final.unlink()
        else:
            shutil.rmtree(final, ignore_errors=True)
    tmp = entry_tempdir(final)
    try:
        build(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        sign_folder(tmp, purpose)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same export first (non-empty target): use theirs.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {FORMATS}")
