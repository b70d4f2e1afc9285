"""Loading checkpoints without running their pickled code, and the per-user trust store.

A PyTorch ``.pt`` file is a pickle: unpickling it may call any Python function the file
names (``os.system``...). Weights whose SHA-256 is in the bundled registry or in the user's
trust store load as usual; any other checkpoint is read by :func:`safe_load`, which rebuilds
tensors and an allow-list of known classes only and refuses anything else *before* any object
is built, raising :class:`UntrustedModelError`.

The trust store is a small JSON file, ``$XDG_CONFIG_HOME/napari-yolocell/trusted.json``
(``YOLOCELL_CONFIG_DIR`` overrides the folder, for tests and shared installs).
"""

from __future__ import annotations

import json
import os
import pickle
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

    def __init__(self, path: str | os.PathLike, global_name: str, sha256: str | None = None):
        self.path = Path(path)
        self.global_name = global_name
        self.sha256 = sha256 or file_sha256(self.path)
        self.size = self.path.stat().st_size
        super().__init__(
            f"refusing to load {str(self.path)!r}: its pickle references {global_name!r}, "
            "which could run code; if you trust this file, pass --trust on the command line "
            "(or confirm in the widget)"
        )

    def __reduce__(self):
        # rebuilt from its fields when it crosses a process boundary (batch workers, dask)
        return type(self), (self.path, self.global_name, self.sha256)


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
# Reading a checkpoint without running its pickle


class _Refused(Exception):
    """A pickle references a global that is not on the allow-list (internal)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


#: Module prefixes of the original YOLOv5 (``models.*``) and meituan YOLOv6 (``yolov6.*``)
#: repositories: their classes become inert stand-ins that only hold the pickled state.
STANDIN_PREFIXES = ("models.", "yolov6.")

#: Functions and data types the pickle may *call* (REDUCE): they rebuild tensors, storages,
#: containers and NumPy values and cannot reach the file system, the shell or the interpreter.
_CALLABLE_NAMES = (
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
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
)

#: Other globals that may be referenced but never called: storage types, dtypes, NumPy arrays.
_VALUE_NAMES = (
    "numpy.ndarray",
    "torch.storage.UntypedStorage",
    "torch.storage.TypedStorage",
    *(
        f"torch.{kind}Storage"
        for kind in (
            "Float",
            "Half",
            "BFloat16",
            "Double",
            "Long",
            "Int",
            "Short",
            "Char",
            "Byte",
            "Bool",
        )
    ),
    *(
        f"torch.{dt}"
        for dt in ("float16", "float32", "float64", "bfloat16", "int64", "int32", "uint8", "bool")
    ),
)

#: Plain attribute holders found in some checkpoints (``opt``, ``train_args``), rebuilt as
#: :class:`types.SimpleNamespace`: no behaviour of the original class is kept.
_NAMESPACE_NAMES = (
    "argparse.Namespace",
    "types.SimpleNamespace",
    "ultralytics.utils.IterableSimpleNamespace",
)

#: Path objects in training arguments: rebuilt as plain strings.
_PATH_NAMES = (
    "pathlib.Path",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
)


def _path_as_str(*parts: Any) -> str:
    return os.path.join(*(str(p) for p in parts)) if parts else ""


def _namespace(*args: Any, **kwargs: Any):
    import types

    return types.SimpleNamespace(**kwargs)


def _resolve_dotted(fullname: str):
    import importlib

    module, _, name = fullname.rpartition(".")
    return getattr(importlib.import_module(module), name)


_STANDIN_CACHE: dict[str, type] = {}


def inert_standin(fullname: str) -> type:
    """An inert ``torch.nn.Module`` subclass standing in for a foreign class ``fullname``.

    Unpickling restores its attributes (sub-modules, parameters, plain values) and nothing
    else: it has no methods of the original and cannot run.
    """
    import torch

    cls = _STANDIN_CACHE.get(fullname)
    if cls is None:

        def forward(self, *args, **kwargs):
            raise TypeError(f"{fullname} is an inert stand-in and cannot run")

        name = fullname.rpartition(".")[2]
        cls = type(name, (torch.nn.Module,), {"forward": forward, "origin": fullname})
        _STANDIN_CACHE[fullname] = cls
    return cls


def _module_class(fullname: str):
    """The ``torch.nn`` / ``ultralytics.nn`` module class ``fullname``, or None if not one."""
    if fullname.startswith("torch.nn.modules."):
        pass
    elif fullname.startswith(("ultralytics.nn.modules.", "ultralytics.nn.tasks.")):
        from napari_yolocell.models.ultralytics_env import import_ultralytics

        import_ultralytics()
    else:
        return None
    import torch

    module, _, name = fullname.rpartition(".")
    if not name.isidentifier() or any(not p.isidentifier() for p in module.split(".")):
        return None
    try:
        obj = _resolve_dotted(fullname)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return obj
    return None


class SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be checked
    """Unpickler that builds tensors, containers and allow-listed ``nn.Module`` classes only.

    - globals off the allow-list raise before they are looked up (nothing is imported for
      them);
    - only data constructors (:data:`_CALLABLE_NAMES`) may be *called* (REDUCE); module
      classes are created with ``cls.__new__`` and filled from their pickled ``__dict__``,
      never through ``__init__``;
    - protocol-0/1 instantiation (INST/OBJ) and the copyreg extension registry are refused.

    Parameters
    ----------
    file : binary file
        The pickle stream.
    persistent_load : callable, optional
        Resolves persistent ids (tensor storages of ``torch.save`` zips).
    standins : dict, optional
        Full global name -> class to use instead (see :data:`STANDIN_PREFIXES`).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, persistent_load=None, standins: dict[str, type] | None = None):
        super().__init__(file, encoding="latin1")
        self._persistent = persistent_load
        self._standins = standins or {}
        self._callables: set[int] = set()
        self._classes: set[int] = set()

    def persistent_load(self, pid):
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent ids are not supported in this file")
        return self._persistent(pid)

    def find_class(self, module: str, name: str):
        fullname = _canonical(module, name)
        if fullname in _CALLABLE_NAMES or fullname in _VALUE_NAMES:
            obj = _resolve_dotted(fullname)
            if fullname in _CALLABLE_NAMES:
                self._callables.add(id(obj))
            return obj
        if fullname in _NAMESPACE_NAMES:
            self._callables.add(id(_namespace))
            return _namespace
        if fullname in _PATH_NAMES:
            self._callables.add(id(_path_as_str))
            return _path_as_str
        cls = self._standins.get(fullname)
        if cls is None and fullname.startswith(STANDIN_PREFIXES):
            cls = inert_standin(fullname)
        if cls is None:
            cls = _module_class(fullname)
        if cls is None:
            raise _Refused(fullname)
        self._classes.add(id(cls))
        return cls

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self._callables:
            raise _Refused(f"call of {_qualname(func)}")
        self.stack[-1] = func(*args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            raise _Refused(f"keyword construction of {_qualname(cls)}")
        self.append(self._new(cls, args))

    def _new(self, cls, args):
        if id(cls) in self._callables and cls in (set, frozenset, complex):
            return cls.__new__(cls, *args)
        if id(cls) not in self._classes or args:
            raise _Refused(f"construction of {_qualname(cls)}")
        return cls.__new__(cls)

    def load_build(self):
        import torch

        inst = self.stack[-2]  # the state is on top

        # Module.__setstate__ only updates __dict__; tensors and NumPy objects rebuild their
        # own data. Anything else gets no BUILD (a __setstate__ could run code).
        if not (
            id(type(inst)) in self._classes
            or isinstance(inst, (torch.Tensor, torch.nn.Module))
            or type(inst).__module__.split(".")[0] == "numpy"
        ):
            raise _Refused(f"state of {_qualname(type(inst))}")
        super().load_build()

    def _refuse_opcode(self):
        raise _Refused("a protocol-0/1 instantiation or copyreg extension")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    for _op in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse_opcode
    del _op


def _canonical(module: str, name: str) -> str:
    module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
    return f"{module}.{name}"


def _qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return f"{module}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _is_allowed(fullname: str, standins: dict[str, type]) -> bool:
    return (
        fullname in _CALLABLE_NAMES
        or fullname in _VALUE_NAMES
        or fullname in _NAMESPACE_NAMES
        or fullname in _PATH_NAMES
        or fullname in standins
        or fullname.startswith(STANDIN_PREFIXES)
        or _module_class(fullname) is not None
    )


_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
               "SHORT_BINUNICODE", "BINUNICODE8"}  # fmt: skip


def pickle_globals(data: bytes) -> list[str]:
    """Every global a pickle references, read from its opcodes without building anything.

    ``STACK_GLOBAL`` takes its names from the stack; they are followed through the memo. A
    global whose name is not two literal strings is reported as ``"<computed global>"``.

    Raises
    ------
    ValueError
        The data is not a complete pickle.
    """
    import pickletools

    found: list[str] = []
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # values pushed by the last ops (strings or None)
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append(_canonical(module, attr))
            elif name == "STACK_GLOBAL":
                module, attr = recent[-2:] if len(recent) >= 2 else (None, None)
                if isinstance(module, str) and isinstance(attr, str):
                    found.append(_canonical(module, attr))
                else:
                    found.append("<computed global>")
            elif name.startswith("EXT"):
                found.append(f"<copyreg extension {arg}>")
            if name in _STRING_OPS:
                recent.append(arg if isinstance(arg, str) else None)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(arg)))
            elif name not in ("FRAME", "PROTO"):
                recent.append(None)
            del recent[:-4]
    except Exception as err:  # genops raises ValueError / struct errors on damaged data
        raise ValueError(f"not a complete pickle ({err})") from err
    return found


_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


def _zip_pickle(path: Path):
    """``(data.pkl bytes, storage loader)`` of a ``torch.save`` zip archive."""
    import zipfile

    import torch

    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
        raise ValueError("a zip archive without data.pkl (not a PyTorch checkpoint)")
    prefix = pkl[0][: -len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in names:
        order = archive.read(prefix + "byteorder").decode()
    if order != "little":
        raise ValueError(f"unsupported byte order {order!r}")
    storages: dict[str, Any] = {}

    def load_storage(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:]
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in storages:
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type._dtype
            raw = bytearray(archive.read(f"{prefix}data/{key}"))
            nbytes = numel * torch._utils._element_size(dtype)
            if len(raw) < nbytes:
                raise ValueError(f"truncated tensor data {key!r}")
            untyped = (
                torch.frombuffer(raw, dtype=torch.uint8).untyped_storage()
                if raw
                else (torch.UntypedStorage(0))
            )
            storages[key] = torch.storage.TypedStorage(
                wrap_storage=untyped, dtype=dtype, _internal=True
            )
        return storages[key]

    return archive.read(pkl[0]), load_storage


def _check_globals(path: Path, data: bytes, standins: dict[str, type]) -> None:
    for name in pickle_globals(data):
        if not _is_allowed(name, standins):
            raise UntrustedModelError(path, name)


def safe_load(path: str | os.PathLike, standins: dict[str, type] | None = None) -> Any:
    """Read a PyTorch checkpoint without executing any of its pickled code.

    The pickle's globals are checked first, from its opcodes (nothing is built); a file that
    references anything off the allow-list is refused there. Then :class:`SafeUnpickler`
    rebuilds it, enforcing the same list again while it builds.

    Parameters
    ----------
    path : path-like
        ``.pt`` file (``torch.save`` zip, or a plain pickle).
    standins : dict, optional
        Global name -> stand-in class for foreign classes (classic YOLOv5, meituan YOLOv6).

    Returns
    -------
    object
        What ``torch.load`` would return (module classes of foreign code as stand-ins).

    Raises
    ------
    UntrustedModelError
        The file references a global off the allow-list (names the file and the global).
    WeightsError
        The file is not a readable checkpoint (truncated, random bytes...).
    """
    import io
    import zipfile

    from napari_yolocell.models.spec import WeightsError

    path = Path(path)
    standins = standins or {}
    try:
        if zipfile.is_zipfile(path):
            data, persistent = _zip_pickle(path)
        else:
            data, persistent = path.read_bytes(), None
            first = pickle_globals_prefix(data)
            if first == _TORCH_MAGIC:
                raise ValueError("legacy (PyTorch < 1.6) checkpoint format; re-save it")
        _check_globals(path, data, standins)
        return SafeUnpickler(io.BytesIO(data), persistent, standins).load()
    except UntrustedModelError:
        raise
    except _Refused as err:
        raise UntrustedModelError(path, err.name) from None
    except Exception as err:  # zip / pickle / torch errors vary: report them as one
        raise WeightsError(
            f"cannot read model weights {str(path)!r}: {type(err).__name__}: {err}"
        ) from None


def pickle_globals_prefix(data: bytes) -> Any:
    """The first pickled value of ``data`` if it is a plain int (the legacy torch magic)."""
    import pickletools

    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("PROTO", "FRAME"):
                continue
            return arg if isinstance(arg, int) and op.name.startswith("LONG") else None
    except Exception:
        return None
    return None


def checkpoint_globals(path: str | os.PathLike) -> list[str]:
    """The globals a ``.pt`` file's pickle references (nothing is built or run).

    Raises
    ------
    WeightsError
        Not a readable checkpoint.
    """
    import zipfile

    from napari_yolocell.models.spec import WeightsError

    path = Path(path)
    try:
        data = _zip_pickle(path)[0] if zipfile.is_zipfile(path) else path.read_bytes()
        return pickle_globals(data)
    except Exception as err:
        raise WeightsError(
            f"cannot read model weights {str(path)!r}: {type(err).__name__}: {err}"
        ) from None


def check_file(path: str | os.PathLike, standins: dict[str, type] | None = None) -> None:
    """Refuse a checkpoint whose pickle references anything off the allow-list.

    Reads the opcodes only (see :func:`pickle_globals`): nothing is built or run.

    Raises
    ------
    UntrustedModelError
        Names the file and the first offending global.
    WeightsError
        Not a readable checkpoint.
    """
    names = checkpoint_globals(path)
    for name in names:
        if not _is_allowed(name, standins or {}):
            raise UntrustedModelError(path, name)


def require_safe(path: str | os.PathLike) -> None:
    """Before a full unpickle (ultralytics' training does one): the file must be trusted, or its
    pickle must reference nothing off the allow-list (any genuine ultralytics checkpoint).

    Raises
    ------
    UntrustedModelError
        Names the file and the first offending global.
    """
    if not is_trusted(file_sha256(path)):
        check_file(path)
