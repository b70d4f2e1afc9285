"""Hand-made pickles and archives for the hostile-file tests (no file is committed)."""

from __future__ import annotations

import io
import pickle
import resource
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

BUNDLED = Path(__file__).parents[2] / "src/napari_yolocell/models/weights/nucleus_v5n.pt"
#: Time and memory a refusal may take (the issue's bounds).
MAX_SECONDS = 10.0
MAX_EXTRA_RSS = 1 << 30


def glob(module: str, name: str) -> bytes:
    """GLOBAL opcode."""
    return b"c" + f"{module}\n{name}\n".encode()


def text(value: str) -> bytes:
    """BINUNICODE opcode."""
    raw = value.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def pickled(value) -> bytes:
    """A plain value's pickle opcodes without PROTO/STOP (to splice into a stream)."""
    data = pickle.dumps(value, protocol=2)
    return data[2:-1]


def stream(body: bytes) -> bytes:
    """A complete protocol-2 pickle of ``body``."""
    return b"\x80\x02" + body + b"."


def torch_zip(path: Path, pkl: bytes, members: dict[str, bytes] | None = None, folder="archive"):
    """A ``torch.save``-like zip: ``<folder>/data.pkl``, byteorder, tensor members."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{folder}/data.pkl", pkl)
        archive.writestr(f"{folder}/byteorder", "little")
        for key, raw in (members or {}).items():
            archive.writestr(f"{folder}/data/{key}", raw)
    return path


def zip_bytes(entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as archive:
        for name, raw in entries.items():
            archive.writestr(name, raw)
    return buf.getvalue()


def bundled_checkpoint():
    """The bundled ultralytics checkpoint as live objects (our own file, to edit in tests)."""
    import torch

    return torch.load(BUNDLED, weights_only=False)


def payload(marker: Path) -> str:
    """A Python expression that creates ``marker`` if anything evaluates it."""
    return f"__import__('os').system('touch {marker}')"


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def contained(
    action: Callable[[], object],
    marker: Path,
    cache: Path | None = None,
    errors: type[BaseException] | tuple = (ValueError, FileNotFoundError, OSError),
    secret: str | None = None,
) -> BaseException:
    """Run ``action``, which must fail: one line, quickly, no payload, nothing cached.

    Returns the exception. ``secret``: text of the file that must not appear in the message.
    """
    before, start = _rss(), time.perf_counter()
    with pytest.raises(errors) as info:
        action()
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    assert elapsed < MAX_SECONDS, f"took {elapsed:.1f} s"
    assert _rss() - before < MAX_EXTRA_RSS, "used more than 1 GB"
    assert not marker.exists(), "the payload ran"
    if secret is not None:
        assert secret not in message, "the message echoes the file's contents"
    if cache is not None and cache.exists():
        made = [p for p in cache.rglob("*") if p.is_file() and p.suffix in (".onnx", ".json")]
        made = [p for p in made if "torch-v" in str(p) or "onnx-v" in str(p)]
        assert not made, f"cached: {made}"
    return info.value
