"""The per-user cache folder and the SHA-256 keys of weights files.

Everything derived from a weights file (ONNX / OpenVINO exports, the pickle-free PyTorch form,
unpacked ``.xz`` weights) lives under :func:`cache_root`, keyed by the file's SHA-256
(:func:`weights_sha256`).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from napari_yolocell.models.integrity import file_sha256

_HASHES: dict[tuple, str] = {}
_LOCK = threading.Lock()


def cache_root() -> Path:
    """Folder holding all exports (created on demand; a temp folder if home is read-only)."""
    env = os.environ.get("YOLOCELL_CACHE_DIR")
    if env:
        root = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = Path(base) / "napari-yolocell" / "exports"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(root)
    except OSError:  # read-only home on some clusters: exports then live for this machine's boot
        user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
        root = Path(tempfile.gettempdir()) / f"napari-yolocell-exports-{user}"
        root.mkdir(parents=True, exist_ok=True)
    return root


def weights_sha256(path: str | Path, expected: str | None = None) -> str:
    """SHA-256 of a weights file, memoised per (path, size, mtime); ``expected`` if known."""
    if expected:
        return expected.lower()

    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = file_sha256(path)
    with _LOCK:
        _HASHES[key] = digest
    return digest
