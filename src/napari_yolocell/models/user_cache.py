"""The per-user cache folder, the SHA-256 keys of weights files, and authenticated entries.

Everything derived from a weights file (ONNX / OpenVINO exports, the pickle-free PyTorch form,
unpacked ``.xz`` weights) lives under :func:`cache_root`, keyed by the file's SHA-256
(:func:`weights_sha256`).

The cache is only as trusted as the user's own files: every entry is signed
(:func:`sign_folder`) with an HMAC-SHA256 under a per-user secret key (``cache.key``, mode
0600, in the settings folder) and checked (:func:`verify_folder`) before anything in it is
used. An entry planted by someone else (another user of a shared cache, a copied folder)
fails the check and is rebuilt. Cache and temporary folders are created by us with mode
0700 and refused when someone else owns them or may write to them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
import threading
from pathlib import Path

from napari_yolocell.models.integrity import file_sha256

_HASHES: dict[tuple, str] = {}
_LOCK = threading.Lock()
SIGNATURE_FILE = "signature.json"
KEY_FILE = "cache.key"


class CacheFolderError(OSError):
    """A cache folder we cannot use safely (owned by someone else, writable by others)."""


def _owned_private(path: Path) -> bool:
    """Whether ``path`` is a real folder of ours that no one else may write to."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return False
    return not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def private_dir(path: str | Path) -> Path:
    """``path`` as a folder of ours with mode 0700 (created if missing, parents too).

    Raises
    ------
    CacheFolderError
        It exists but is a link, someone else's, or writable by others.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    if not _owned_private(path):
        raise CacheFolderError(
            f"refusing cache folder {str(path)!r}: not a folder of this user that only this "
            "user can write to"
        )
    return path


def cache_root() -> Path:
    """Folder holding all exports (created on demand, 0700, ours).

    ``$YOLOCELL_CACHE_DIR``, else ``$XDG_CACHE_HOME/napari-yolocell/exports``. If that cannot
    be used (read-only home on some clusters), a fresh private temporary folder of this
    process; a predictable shared path is never used.
    """
    env = os.environ.get("YOLOCELL_CACHE_DIR")
    if env:
        root = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = Path(base) / "napari-yolocell" / "exports"
    try:
        return private_dir(root)
    except OSError:
        return _process_temp_root()


_TEMP_ROOT: list[Path] = []


def _process_temp_root() -> Path:
    """A private temporary cache made by this process (mkdtemp: unpredictable, 0700)."""
    with _LOCK:
        if not _TEMP_ROOT or not _owned_private(_TEMP_ROOT[0]):
            _TEMP_ROOT[:] = [Path(tempfile.mkdtemp(prefix="napari-yolocell-cache-"))]
        return _TEMP_ROOT[0]


def weights_sha256(path: str | Path, expected: str | None = None) -> str:
    """SHA-256 of a weights file, memoised per (path, size, mtime); ``expected`` if known."""
    if expected:
        return expected.lower()

    path = Path(path)
    stat_ = path.stat()
    key = (str(path.resolve()), stat_.st_size, stat_.st_mtime_ns)
    with _LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = file_sha256(path)
    with _LOCK:
        _HASHES[key] = digest
    return digest


# ---------------------------------------------------------------------------------------------
# Authenticated entries


def _config_dir() -> Path:
    from napari_yolocell.models.safety import config_dir

    return config_dir()


def secret_key() -> bytes:
    """This user's cache key (32 random bytes in ``<settings>/cache.key``, mode 0600).

    Created on first use. A key file that is a link, someone else's, readable by others or of
    the wrong size is replaced by a new one (every cached entry is then rebuilt).
    """
    folder = private_dir(_config_dir())
    path = folder / KEY_FILE
    with _LOCK:
        key = _read_key(path)
        if key is None:
            key = secrets.token_bytes(32)
            tmp = folder / f".{KEY_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key)
            os.replace(tmp, path)
    return key


def _read_key(path: Path) -> bytes | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    mine = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    if not stat.S_ISREG(info.st_mode) or not mine or info.st_mode & 0o077:
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        key = fh.read(33)
    return key if len(key) == 32 else None


def _listing(folder: Path) -> dict[str, str]:
    """SHA-256 of every regular file of ``folder`` (the signature file aside); links refused."""
    out = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name == SIGNATURE_FILE:
            continue
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise CacheFolderError(f"cache entry {str(folder)!r} holds something not a file")
        out[entry.name] = file_sha256(entry.path)
    return out


def _mac(key: bytes, purpose: str, files: dict[str, str]) -> str:
    message = json.dumps({"purpose": purpose, "files": files}, sort_keys=True).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_folder(folder: str | Path, purpose: str) -> None:
    """Sign every file of a cache entry (``signature.json``: file hashes and their HMAC).

    ``purpose`` ties the signature to what the entry is (``"torch-v1:<sha256>"``), so an entry
    cannot be moved to serve other weights.
    """
    folder = Path(folder)
    files = _listing(folder)
    body = {"purpose": purpose, "files": files, "hmac": _mac(secret_key(), purpose, files)}
    (folder / SIGNATURE_FILE).write_text(json.dumps(body, sort_keys=True), encoding="utf-8")


def verify_folder(folder: str | Path, purpose: str) -> bool:
    """Whether a cache entry is ours, for ``purpose``, and unchanged since it was signed."""
    folder = Path(folder)
    try:
        if not _owned_private(folder) and not _owned_entry(folder):
            return False
        body = json.loads((folder / SIGNATURE_FILE).read_text(encoding="utf-8"))
        files = _listing(folder)
    except (OSError, ValueError):
        return False
    if not isinstance(body, dict) or body.get("purpose") != purpose or body.get("files") != files:
        return False
    expected = _mac(secret_key(), purpose, files)
    return hmac.compare_digest(str(body.get("hmac", "")), expected)


def _owned_entry(folder: Path) -> bool:
    """A real folder of ours (entries may be group-readable; their signature guards them)."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    mine = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    return stat.S_ISDIR(info.st_mode) and mine and not info.st_mode & stat.S_IWOTH


def entry_tempdir(final: Path) -> Path:
    """A fresh private folder next to ``final`` (in an owned cache folder) to build an entry."""
    parent = private_dir(final.parent)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
