"""File integrity: SHA-256 of weights files and of INT8 model folders.

Bundled weights are pickles (loading runs code), so they are checked against the hashes in the
registry before loading; a mismatch is refused, never loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Refuse a file whose SHA-256 differs from ``expected``.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        On mismatch: the file is corrupt or was replaced, and is not loaded (it is pickled code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights file not found: {str(path)!r}")
    actual = file_sha256(path)
    if actual.lower() != expected.lower():
        raise ValueError(
            f"SHA-256 mismatch for model weights {str(path)!r}: expected {expected}, got "
            f"{actual}. The file is corrupt or was replaced; it was not loaded. Reinstall "
            "napari-yolocell to restore the bundled weights."
        )


INT8_FILES = ("model.xml", "model.bin", "meta.json")


def folder_hashes(folder: str | Path) -> dict[str, str]:
    """SHA-256 of each file of an INT8 model folder."""
    return {name: file_sha256(Path(folder) / name) for name in INT8_FILES}


def verify_folder(folder: str | Path, expected: dict[str, str]) -> None:
    """Refuse an INT8 folder whose files differ from the registry's hashes.

    Raises
    ------
    FileNotFoundError
        A file is missing.
    ValueError
        A hash differs (the message names the file).
    """
    folder = Path(folder)
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"INT8 model file not found: {str(path)!r}")
        actual = file_sha256(path)
        if actual != digest.lower():
            raise ValueError(
                f"SHA-256 mismatch for {str(path)!r}: expected {digest}, got {actual}. The file "
                "is corrupt or was replaced; reinstall napari-yolocell."
            )
