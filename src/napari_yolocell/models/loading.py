"""Loading a model: resolve its name, verify its files, pick a backend, cache the detector.

:func:`load_detector` is the one entry point the engine, the CLI and the widgets use; it knows
every implementation (the runtimes of :mod:`~napari_yolocell.models.backends` and the classical
baseline), so it sits at the top of the models layer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import lzma
import os
import shutil
import threading
import warnings
from pathlib import Path

from napari_yolocell.models import export_cache, export_checks, pickle_data, torch_cache
from napari_yolocell.models.backends import (
    ForeignExportDetector,
    ModuleDetector,
    OnnxRuntimeDetector,
    OpenVinoDetector,
    TorchDetector,
    int8_detector,
)
from napari_yolocell.models.checkpoints import load_network, network_family
from napari_yolocell.models.classical import ClassicalDetector
from napari_yolocell.models.detector import BACKEND_CHOICES, Detector, default_device
from napari_yolocell.models.integrity import file_sha256, verify_sha256
from napari_yolocell.models.registry import resolve_model
from napari_yolocell.models.safety import UntrustedModelError
from napari_yolocell.models.safety import trust as trust_file
from napari_yolocell.models.spec import CHECKPOINT_KEY, ModelSpec, WeightsError, sidecar_path
from napari_yolocell.models.user_cache import (
    cache_root,
    entry_tempdir,
    private_dir,
    sign_folder,
)
from napari_yolocell.models.user_cache import verify_folder as verify_cache_folder

#: Preference of ``backend="auto"`` on a CPU: measured fastest first (``"openvino"`` becomes
#: ``"openvino-int8"`` for models that ship an INT8 version).
_AUTO_CPU_ORDER = ("openvino", "onnxruntime")


_BACKEND_MODULE = {
    "torch": "torch",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "openvino-int8": "openvino",
}


def available_backends() -> list[str]:
    """Backends whose runtime package is installed, fastest on a CPU first."""
    found = [b for b in _AUTO_CPU_ORDER if importlib.util.find_spec(_BACKEND_MODULE[b])]
    return [*found, "torch"]


def resolve_backend(backend: str = "auto", device: str | None = None) -> str:
    """The concrete backend for ``backend`` on ``device``.

    ``"auto"``: PyTorch on a GPU; on a CPU the fastest installed runtime, OpenVINO, then ONNX
    Runtime, then PyTorch.

    Raises
    ------
    ValueError
        Unknown backend name.
    ImportError
        The named backend's package is not installed (the message says what to install).
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKEND_CHOICES}")
    if backend == "auto":
        if not (device or default_device()).lower().startswith("cpu"):
            return "torch"
        return available_backends()[0]
    if importlib.util.find_spec(_BACKEND_MODULE[backend]) is None:
        raise ImportError(
            f"backend {backend!r} needs the {_BACKEND_MODULE[backend]!r} package: "
            f"pip install {_BACKEND_MODULE[backend]}"
        )
    return backend


def _is_architecture(spec: ModelSpec) -> bool:
    return spec.path is not None and Path(spec.path).suffix.lower() in (".yaml", ".yml")


def make_detector(spec: ModelSpec, backend: str = "auto", device: str | None = None) -> Detector:
    """Build a detector for ``spec`` with the chosen backend.

    Parameters
    ----------
    spec : ModelSpec
        Resolved model (see :func:`napari_yolocell.models.registry.resolve_model`).
    backend : {"auto", "torch", "onnxruntime", "openvino", "openvino-int8"}
        Forward-pass runtime; see :func:`resolve_backend`. The classical detector ignores it.
        ``"auto"`` on a CPU uses a bundled model's INT8 version when OpenVINO is installed.
        ONNX Runtime / OpenVINO run a cached export of the weights, made on first use (a few
        seconds). Untrained architectures (``"yolov5n.yaml"``) get random weights at every load,
        so they are exported to a temporary folder instead of the cache. With ``"auto"``, a
        model that cannot be exported falls back to PyTorch with a warning.
    device : str, optional
        Device for the backend (default: CUDA if available for PyTorch, else the CPU).

    Raises
    ------
    ValueError
        Unknown backend, or unreadable weights (names the file).
    ImportError
        The named backend is not installed.
    RuntimeError
        The model could not be exported for the named backend.
    """
    if spec.family == "classical":
        return ClassicalDetector(spec=spec)
    if is_exported_model(spec.path):
        return open_foreign_export(spec, device)
    requested = backend
    backend = resolve_backend(backend, device)
    if backend == "torch":
        return _torch_detector(_load_network(spec), spec, device)
    if backend == "openvino-int8" or (requested == "auto" and backend == "openvino"):
        # the bundled or user-quantized INT8 version, if it exists and passed its check
        int8 = int8_detector(spec, device, required=backend == "openvino-int8")
        if int8 is not None:
            return int8
        backend = "openvino"

    fmt, cls = {
        "onnxruntime": ("onnx", OnnxRuntimeDetector),
        "openvino": ("openvino", OpenVinoDetector),
    }[backend]
    model = None
    try:
        if _is_architecture(spec):
            model = _load_network(spec)
            keep = export_cache.temporary_export(model, fmt)
            return cls(spec, keep.name, device=device, keep=keep)
        return cls(spec, export_cache.cached_export(spec, fmt), device=device)
    except (WeightsError, UntrustedModelError, FileNotFoundError):
        raise
    except Exception as err:  # exporters and runtimes fail in many ways: report them as one
        if requested != "auto":
            raise RuntimeError(
                f"cannot run model {str(spec.path)!r} with {backend}: {type(err).__name__}: {err}"
            ) from err
        warnings.warn(
            f"{backend} backend unavailable for {str(spec.path)!r} ({err}); using PyTorch",
            RuntimeWarning,
            stacklevel=2,
        )
    return _torch_detector(model or _load_network(spec), spec, device)


def open_foreign_export(spec: ModelSpec, device: str | None = None) -> ForeignExportDetector:
    """An ONNX file / OpenVINO folder made elsewhere, read once and checked
    (:mod:`export_checks`), then opened from the bytes read (never the path again).

    Raises
    ------
    WeightsError
        Refused by the checks, or the runtime cannot open it (one line naming the file).
    """
    checked = export_checks.check_export(spec.path)  # read once: the runtime opens these bytes
    try:
        return ForeignExportDetector(spec, checked, device=device)
    except (FileNotFoundError, WeightsError):
        raise
    except Exception as err:  # runtimes raise their own types; their text may echo the file
        raise WeightsError(
            f"cannot open exported model {str(spec.path)!r}: the runtime refused it "
            f"({type(err).__name__})"
        ) from None


def is_exported_model(path) -> bool:
    """Whether ``path`` is an exported model (``.onnx`` file, or a folder with model.xml)."""
    if path is None:
        return False
    path = Path(path)
    return path.suffix.lower() in (".onnx", ".xml") or (path / "model.xml").is_file()


def network_of(spec: ModelSpec):
    """A model's network for PyTorch (read as data, built by us; see :func:`_load_network`)."""
    return _load_network(unpack_weights(spec))


def _load_network(spec: ModelSpec):
    if _is_architecture(spec):  # read as data and checked like any architecture
        return load_network(spec.path)
    if spec.sha256 is not None:
        # bundled weights: read once as data, the bytes read checked against the registry hash
        return load_network(spec.path, trusted=True, sha256=spec.unpacked_sha256 or spec.sha256)
    # any other checkpoint is read once as data, then loaded from its signed pickle-free form
    return torch_cache.load_network_cached(spec.path)


def _torch_detector(model, spec: ModelSpec, device: str | None) -> Detector:
    if network_family(model) == "ultralytics":
        return TorchDetector(model, spec, device=device)
    return ModuleDetector(model, spec, device=device)


def _with_checkpoint_metadata(detector: Detector) -> Detector:
    """Apply settings stored in a checkpoint's ``"yolocell"`` entry, if it carries one."""
    ckpt = getattr(getattr(detector, "model", None), "ckpt", None)
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if isinstance(meta, dict):
        spec = ModelSpec.from_dict({**meta, "path": str(detector.spec.path)})
        detector.spec = dataclasses.replace(spec, sha256=detector.spec.sha256)
    return detector


_CACHE: dict[tuple, Detector] = {}


_CACHE_SIZE = 4


_CACHE_LOCK = threading.Lock()


def _cached_detector(spec: ModelSpec, device: str | None, backend: str) -> Detector:
    """Load once per (weights, file version, device, backend); keeps the last few models."""
    key = (str(spec.path), _fingerprint(spec), device, backend)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    detector = make_detector(spec, backend=backend, device=device)
    has_sidecar = spec.path is not None and sidecar_path(spec.path).exists()
    if spec.sha256 is None and not has_sidecar:
        detector = _with_checkpoint_metadata(detector)
    with _CACHE_LOCK:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = detector
    return detector


def clear_cache() -> None:
    """Forget loaded models (frees their memory once no one else holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _fingerprint(spec: ModelSpec) -> str:
    """Cache key part that changes when the weights file changes."""
    if spec.sha256:
        return spec.sha256
    if spec.path is not None and spec.path.is_file():
        stat = spec.path.stat()
        return f"{spec.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return str(spec.path)


def load_detector(
    name_or_path: str | Path | ModelSpec,
    device: str | None = None,
    backend: str = "auto",
    trust: bool = False,
) -> Detector:
    """Resolve, verify and load a model, ready for
    :func:`napari_yolocell.engine.detect.detect_image`.

    Neural-network detectors are cached (same weights, device and backend -> same object);
    the classical detector is created fresh (it keeps a per-plane threshold).

    Parameters
    ----------
    name_or_path : str, Path or ModelSpec
        See :func:`resolve_model`.
    device : str, optional
        ``"cpu"``, ``"cuda:0"``...; default CUDA if available.
    backend : str
        Forward-pass backend (``"torch"``).
    trust : bool
        Record the weights file's SHA-256 in the user's trust store first
        (:func:`napari_yolocell.models.safety.trust`): its pickle may then run code.

    Raises
    ------
    FileNotFoundError
        Missing weights file (the message names it).
    UntrustedModelError
        (a ValueError) A checkpoint whose pickle references code off the allow-list, not
        trusted: nothing of it ran.
    ValueError
        Unknown model, SHA-256 mismatch, or unreadable / corrupt weights (names the file).
    """
    spec = resolve_model(name_or_path)
    if spec.int8 and not spec.sha256:  # only the registry may name an INT8 folder (hash-checked)
        spec = dataclasses.replace(spec, int8=None)
    if trust and spec.path is not None and Path(spec.path).is_file() and not spec.sha256:
        trust_file(spec.path)
    if spec.family == "classical":
        return make_detector(spec, backend=backend, device=device)
    if spec.sha256 and Path(spec.path).suffix.lower() == ".xz":
        verify_sha256(spec.path, spec.sha256)  # .pt files are checked on the bytes they load
    spec = unpack_weights(spec)
    return _cached_detector(spec, device, backend)


def unpack_weights(spec: ModelSpec, root: Path | None = None) -> ModelSpec:
    """For ``.xz`` weights: the same spec pointing at the unpacked ``.pt`` in the user cache.

    Unpacks once (into a private temporary file, then renamed into place), at most
    :data:`~napari_yolocell.models.pickle_data.MAX_FILE_BYTES`; the unpacked file is checked
    against ``spec.unpacked_sha256`` when it is loaded (bundled weights), or keyed by the
    SHA-256 of the ``.xz`` file and signed (others), so a damaged or planted file is replaced,
    never loaded. Other specs are returned unchanged.

    Raises
    ------
    WeightsError
        Not an xz file, damaged, or unpacking past the size limit (nothing is left behind).
    """
    if spec.path is None or Path(spec.path).suffix.lower() != ".xz":
        return spec
    folder = private_dir((root or cache_root()) / "unpacked-weights")
    key = spec.unpacked_sha256 or file_sha256(spec.path)
    name = f"{Path(spec.path).stem.removesuffix('.pt')}-{key[:16]}"
    target = folder / name
    if not (target / f"{name}.pt").is_file() or not verify_cache_folder(target, f"xz:{key}"):
        _unpack(Path(spec.path), target, key)
    return dataclasses.replace(spec, path=target / f"{name}.pt")


def _unpack(source: Path, target: Path, key: str) -> None:
    """Unpack ``source`` into a signed folder ``target`` (``<target name>.pt``), size-limited."""
    tmp = entry_tempdir(target)
    limit = pickle_data.MAX_FILE_BYTES
    try:
        written = 0
        with lzma.open(source, "rb") as src, open(tmp / f"{target.name}.pt", "wb") as dst:
            while block := src.read(1 << 20):
                written += len(block)
                if written > limit:
                    raise WeightsError(
                        f"cannot unpack model weights {str(source)!r}: it unpacks to more than "
                        f"{limit >> 20} MiB"
                    )
                dst.write(block)
        sign_folder(tmp, f"xz:{key}")
        if target.exists() or target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except (lzma.LZMAError, EOFError, OSError) as err:
        raise WeightsError(
            f"cannot unpack model weights {str(source)!r}: not a complete xz file "
            f"({type(err).__name__})"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe_model(name_or_path: str | Path) -> str:
    """One line naming a model's family (and an export's output layout), without running it.

    ``"YOLOv5 (ultralytics/yolov5)"``, ``"YOLOv6 (meituan)"``, ``"YOLOv5u/YOLOv6 (ultralytics)"``;
    for an ONNX file / OpenVINO folder, ``"exported model: <layout>"``.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing or unreadable model (names the file).
    """
    from napari_yolocell.models.checkpoints import FAMILY_LABELS, checkpoint_family

    spec = resolve_model(name_or_path)
    if spec.family == "classical" or spec.path is None or _is_architecture(spec):
        return spec.description or spec.family
    if is_exported_model(spec.path):
        return f"exported model: {open_foreign_export(spec).description}"
    path = unpack_weights(spec).path
    return FAMILY_LABELS[checkpoint_family(path)]
