"""Reading checkpoints as data (no pickled code can run), and the per-user trust store.

A PyTorch ``.pt`` file is a pickle: unpickling it may call any Python function the file
names (``os.system``...). No checkpoint is ever unpickled here, bundled, trusted or not:
:func:`read_model_file` reads the file's bytes once, hashes them, and interprets its pickle
with :mod:`~napari_yolocell.models.pickle_data` (every class and function becomes an inert
record of its name). A file whose pickle names globals that no checkpoint of the supported
families holds (``posix.system``, ``builtins.eval``...) is refused with
:class:`UntrustedModelError`; the user's trust store (``--trust``) only lifts that refusal, the
file is still read as data. The network itself is rebuilt by
:mod:`~napari_yolocell.models.netbuild` from a validated architecture.

The trust store is a small JSON file, ``$XDG_CONFIG_HOME/napari-yolocell/trusted.json``
(``YOLOCELL_CONFIG_DIR`` overrides the folder, for tests and shared installs).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from napari_yolocell.io.tables import write_text_atomic
from napari_yolocell.models.integrity import file_sha256

TRUST_FILE = "trusted.json"


class UntrustedModelError(ValueError):
    """A weights file that would run code when loaded, and that the user has not trusted.

    Attributes
    ----------
    path : pathlib.Path
        The weights file.
    sha256 : str
        Its SHA-256 (what :func:`trust` records).
    size : int
        Its size in bytes.
    global_name : str
        The first Python global outside the allow-list that its pickle references
        (``"posix.system"``...).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        global_name: str,
        sha256: str | None = None,
        size: int | None = None,
    ):
        self.path = Path(path)
        self.global_name = global_name
        self.sha256 = sha256 or file_sha256(self.path)
        self.size = self.path.stat().st_size if size is None else size
        super().__init__(
            f"refusing to load {str(self.path)!r}: its pickle references "
            f"{_printable(global_name)!r}, "
            "which could run code; it was read as data only and not loaded. If you trust this "
            "file, pass --trust on the command line (or confirm in the widget)"
        )

    def __reduce__(self):
        # rebuilt from its fields when it crosses a process boundary (batch workers, dask)
        return type(self), (self.path, self.global_name, self.sha256, self.size)


def _printable(name: str) -> str:
    """A global's name as it may appear in a one-line message (short, printable)."""
    text = "".join(c if c.isprintable() else "?" for c in str(name))
    return text if len(text) <= 80 else text[:77] + "..."


def config_dir() -> Path:
    """The per-user settings folder (``YOLOCELL_CONFIG_DIR`` or ``$XDG_CONFIG_HOME/...``)."""
    override = os.environ.get("YOLOCELL_CONFIG_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "napari-yolocell"


def trust_store_path() -> Path:
    """Location of the trust store JSON file."""
    return config_dir() / TRUST_FILE


def trusted_models() -> dict[str, dict[str, Any]]:
    """Trusted hashes -> ``{"path", "size", "added"}`` as recorded (empty if no store).

    A damaged store is treated as empty (trusting nothing is the safe failure).
    """
    path = trust_store_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("trusted") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {str(k).lower(): v if isinstance(v, dict) else {} for k, v in entries.items()}


def _write_store(entries: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"version": 1, "trusted": entries}, indent=2, sort_keys=True)
    write_text_atomic(trust_store_path(), text + "\n")


def is_trusted(sha256: str) -> bool:
    """Whether ``sha256`` is in the user's trust store."""
    return sha256.lower() in trusted_models()


def trust(path: str | os.PathLike) -> str:
    """Record the SHA-256 of ``path`` in the per-user trust store; return the hash.

    Later loads of a file with this content run its pickle as a normal ``torch.load`` would
    (and convert it once to a pickle-free cached form).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {str(path)!r}")
    digest = file_sha256(path)
    entries = trusted_models()
    entries[digest] = {
        "path": str(path.resolve()),
        "size": path.stat().st_size,
        "added": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_store(entries)
    return digest


def untrust(sha256: str) -> bool:
    """Remove a hash (or a unique prefix of at least 8 hex digits) from the store.

    Returns
    -------
    bool
        Whether an entry was removed.

    Raises
    ------
    ValueError
        The prefix is too short or matches several entries.
    """
    key = sha256.strip().lower()
    entries = trusted_models()
    matches = [h for h in entries if h == key or (len(key) >= 8 and h.startswith(key))]
    if len(matches) > 1:
        raise ValueError(f"hash prefix {sha256!r} matches {len(matches)} trusted models")
    if not matches:
        return False
    del entries[matches[0]]
    _write_store(entries)
    return True


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint as data

#: Globals a checkpoint of the supported families names: module classes of torch, ultralytics,
#: yolov5 (``models.``) and meituan (``yolov6.``), tensor rebuilders, containers, NumPy scalars,
#: argument holders. They are recorded by name, never imported; anything else is refused
#: because only a file made to run code would name it.
_ALLOWED_NAMES = frozenset(
    {
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.Size",
        "collections.OrderedDict",
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.complex",
        "_codecs.encode",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "argparse.Namespace",
        "types.SimpleNamespace",
        "ultralytics.utils.IterableSimpleNamespace",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
        *(
            f"torch.{kind}Storage"
            for kind in ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char")
            + ("Byte", "Bool")
        ),
        *(
            f"torch.{dt}"
            for dt in ("float16", "float32", "float64", "bfloat16", "int64", "int32", "uint8")
            + ("bool",)
        ),
    }
)
_ALLOWED_PREFIXES = (
    "torch.nn.modules.",
    "ultralytics.nn.modules.",
    "ultralytics.nn.tasks.",
    "models.common.",
    "models.yolo.",
    "models.experimental.",
    "yolov6.layers.",
    "yolov6.models.",
)
#: ``ultralytics.nn.tasks`` also holds functions (``torch_safe_load``...): only classes count.
_TASK_CLASSES = frozenset(
    {
        "DetectionModel",
        "SegmentationModel",
        "ClassificationModel",
        "PoseModel",
        "OBBModel",
        "WorldModel",
        "RTDETRDetectionModel",
        "BaseModel",
    }
)


def is_allowed_global(name: str) -> bool:
    """Whether a checkpoint of the supported families may name global ``name``."""
    if name in _ALLOWED_NAMES:
        return True
    if not name.startswith(_ALLOWED_PREFIXES):
        return False
    module, _, attr = name.rpartition(".")
    if not attr.isidentifier() or not attr[:1].isupper():
        return False  # classes only (functions are lower case in all these packages)
    if module == "ultralytics.nn.tasks":
        return attr in _TASK_CLASSES
    return all(part.isidentifier() for part in module.split("."))


def read_model_file(
    path: str | os.PathLike,
    expected_sha256: str | None = None,
    trusted: bool = False,
    data: bytes | None = None,
):
    """A checkpoint read once and as data (see :mod:`~napari_yolocell.models.pickle_data`).

    Parameters
    ----------
    path : path-like
        The ``.pt`` file (a symbolic link is refused).
    expected_sha256 : str, optional
        The hash the bytes read must have (bundled weights).
    trusted : bool
        Skip the refusal of unknown globals (the file is still read as data only). Files whose
        hash is in the trust store are trusted too.
    data : bytes, optional
        The file's bytes, already read once by the caller.

    Returns
    -------
    napari_yolocell.models.pickle_data.Checkpoint

    Raises
    ------
    FileNotFoundError
        No such file.
    UntrustedModelError
        Its pickle names a global no supported checkpoint holds.
    WeightsError
        Not a readable checkpoint, or not the expected hash (one line naming the file).
    """
    from napari_yolocell.models import pickle_data
    from napari_yolocell.models.spec import WeightsError

    path = Path(path)
    try:
        data = pickle_data.read_bytes(path) if data is None else data
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 and digest != expected_sha256.lower():
            raise WeightsError(
                f"SHA-256 mismatch for model weights {str(path)!r}: expected {expected_sha256}, "
                f"got {digest}. The file is corrupt or was replaced; it was not loaded."
            )
        ckpt = pickle_data.read_checkpoint(path, data)
    except pickle_data.PickleDataError as err:
        raise WeightsError(f"cannot read model weights {str(path)!r}: {err}") from None
    except MemoryError:
        raise WeightsError(f"cannot read model weights {str(path)!r}: out of memory") from None
    if not (trusted or is_trusted(ckpt.sha256)):
        for name in ckpt.globals:
            if not is_allowed_global(name):
                raise UntrustedModelError(path, name, ckpt.sha256, ckpt.size)
    return ckpt


def checkpoint_globals(path: str | os.PathLike) -> list[str]:
    """The globals a ``.pt`` file's pickle names, in order (nothing is built or run).

    Raises
    ------
    WeightsError
        Not a readable checkpoint.
    """
    return list(read_model_file(path, trusted=True).globals)


def check_file(path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose pickle names a global off the allow-list (read as data).

    Raises
    ------
    UntrustedModelError
        Names the file and the first offending global.
    WeightsError
        Not a readable checkpoint.
    """
    read_model_file(path)


def require_safe(path: str | os.PathLike) -> None:
    """Refuse a file that is not a checkpoint we can read as data and rebuild.

    Since training gets a network rebuilt by us (never the file), this is an early, one-line
    check for the command line; the same checks run again when the network is built.

    Raises
    ------
    UntrustedModelError, WeightsError
        Names the file and what is wrong.
    """
    from napari_yolocell.models import netbuild, pickle_data
    from napari_yolocell.models.spec import WeightsError

    if Path(path).suffix.lower() in (".yaml", ".yml"):
        try:
            netbuild.read_architecture_yaml(path)
        except netbuild.ArchitectureError as err:
            raise WeightsError(str(err)) from None
        return
    ckpt = read_model_file(path)
    try:
        netbuild.family_of(ckpt.root)
    except pickle_data.PickleDataError as err:
        raise WeightsError(f"cannot load model weights {str(path)!r}: {err}") from None
