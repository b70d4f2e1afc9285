"""Reading a PyTorch checkpoint as data: a pickle interpreter that never builds a live object.

:func:`read_checkpoint` is our own interpreter of the pickle opcodes. It differs from
``pickle.load`` in what it *is*, not in a list of things it refuses:

- every global (``torch.nn.Conv2d``, ``posix.system``, ``ultralytics.nn.tasks.DetectionModel``)
  becomes a :class:`Global` holding its dotted name: nothing is imported or looked up;
- calling one (REDUCE, NEWOBJ) makes a :class:`Record` of the name and its arguments; only a
  handful of names become plain values, and those are built here from the arguments
  (``collections.OrderedDict`` -> ``dict``, ``torch.Size`` -> ``tuple``, tensors ->
  :class:`TensorRef`);
- APPEND/APPENDS, SETITEM/SETITEMS, ADDITEMS and BUILD act only on the reader's own lists,
  dicts, sets and records; any other target is refused. No method of any object is ever called;
- tensors are rebuilt later (:func:`tensor`) from the bytes of their storage, with their size
  and strides checked against the bytes present.

The whole file is read once into memory (:func:`read_bytes`, size-limited); its SHA-256 is taken
from those bytes and the pickle is parsed from them, so a file swapped on disk during a load
changes nothing. Errors are :class:`PickleDataError`: one line, naming no file contents.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Largest checkpoint read (the biggest released YOLO detectors are ~280 MB).
MAX_FILE_BYTES = 400 * 1024 * 1024
#: Largest pickle stream (``data.pkl``); real ones are well under 1 MB.
MAX_PICKLE_BYTES = 32 * 1024 * 1024
#: Most opcodes interpreted: bounds the time a crafted stream can take.
MAX_OPS = 4_000_000
#: Most members of a checkpoint zip.
MAX_MEMBERS = 20_000
#: Deepest nesting followed when converting records to plain data.
MAX_DEPTH = 64


class PickleDataError(ValueError):
    """A checkpoint that is not a plain-data PyTorch pickle (the message names no contents)."""


@dataclass(frozen=True)
class Global:
    """A global named by the pickle (never imported)."""

    name: str


@dataclass(eq=False)
class Record:
    """An inert stand-in for an object the pickle would have built.

    Attributes
    ----------
    name : str
        Dotted name of the class or function (``"torch.nn.modules.conv.Conv2d"``).
    args : tuple
        Its arguments, as read.
    state : Any
        What BUILD gave it (a module's ``__dict__``), or None.
    """

    name: str
    args: tuple = ()
    state: Any = None


@dataclass(frozen=True)
class StorageRef:
    """A tensor storage of a ``torch.save`` zip: its member key, dtype and element count."""

    key: str
    dtype: str
    numel: int


@dataclass(eq=False)
class TensorRef:
    """A tensor to rebuild from a storage: ``storage[offset]`` viewed with ``size``/``stride``."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    parameter: bool = False


#: Storage class name -> (torch dtype name, element size).
STORAGE_DTYPES = {
    "torch.FloatStorage": ("float32", 4),
    "torch.HalfStorage": ("float16", 2),
    "torch.BFloat16Storage": ("bfloat16", 2),
    "torch.DoubleStorage": ("float64", 8),
    "torch.LongStorage": ("int64", 8),
    "torch.IntStorage": ("int32", 4),
    "torch.ShortStorage": ("int16", 2),
    "torch.CharStorage": ("int8", 1),
    "torch.ByteStorage": ("uint8", 1),
    "torch.BoolStorage": ("bool", 1),
}

_TENSOR_REBUILDERS = frozenset(
    {
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
    }
)
_PARAMETER_REBUILDERS = frozenset(
    {"torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"}
)
_KEY_TYPES = (str, int, float, bool, bytes, type(None))


def _canonical(module: str, name: str) -> str:
    module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
    return f"{module}.{name}"


def _check_key(key: Any) -> Any:
    """Dict keys and set items must be plain values (never a record: no ``__hash__`` runs)."""
    if isinstance(key, _KEY_TYPES) or (
        isinstance(key, tuple) and all(isinstance(k, _KEY_TYPES) for k in key)
    ):
        return key
    raise PickleDataError("a dictionary key or set item that is not a plain value")


def _int(value: Any, what: str, low: int = 0, high: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PickleDataError(f"a tensor with an invalid {what}")
    return value


def _tensor_ref(args: tuple, parameter: bool = False) -> TensorRef:
    """``_rebuild_tensor_v2(storage, offset, size, stride, ...)`` as a checked reference."""
    if len(args) < 4 or not isinstance(args[0], StorageRef):
        raise PickleDataError("a tensor without its storage")
    size, stride = args[2], args[3]
    if not (isinstance(size, tuple) and isinstance(stride, tuple)) or len(size) != len(stride):
        raise PickleDataError("a tensor with an invalid shape")
    if len(size) > 8:
        raise PickleDataError("a tensor with more than 8 dimensions")
    return TensorRef(
        args[0],
        _int(args[1], "offset"),
        tuple(_int(s, "size") for s in size),
        tuple(_int(s, "stride") for s in stride),
        parameter,
    )


def _call(func: Any, args: Any) -> Any:
    """REDUCE: a few names become plain values; everything else an inert :class:`Record`."""
    if not isinstance(func, Global) or not isinstance(args, tuple):
        raise PickleDataError("a call of something that is not a named global")
    name = func.name
    if name in _TENSOR_REBUILDERS:
        return _tensor_ref(args)
    if name in _PARAMETER_REBUILDERS:
        if not args or not isinstance(args[0], TensorRef):
            raise PickleDataError("a parameter without its tensor")
        ref = args[0]
        return TensorRef(ref.storage, ref.offset, ref.size, ref.stride, True)
    if name == "collections.OrderedDict":
        if args == ():
            return {}
        if len(args) == 1 and isinstance(args[0], list):
            return _pairs_to_dict(args[0])
    if name in ("builtins.set", "builtins.frozenset") and len(args) <= 1:
        items = args[0] if args else []
        if isinstance(items, (list, tuple)):
            return {_check_key(x) for x in items}
    if name == "torch.Size" and len(args) == 1 and isinstance(args[0], tuple):
        return tuple(_int(s, "size") for s in args[0])
    if name == "_codecs.encode" and len(args) == 2 and isinstance(args[0], str):
        if args[1] == "latin1":  # how protocol 2 stores bytes
            return args[0].encode("latin1")
    return Record(name, args)


def _pairs_to_dict(pairs: list) -> dict:
    out = {}
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise PickleDataError("a dictionary built from something other than pairs")
        out[_check_key(pair[0])] = pair[1]
    return out


class _Reader:
    """The opcode interpreter (see the module docstring)."""

    def __init__(self, data: bytes, storages: dict[str, StorageRef] | None) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.storages = storages  # None: persistent ids are refused (plain pickles)
        self.globals: list[str] = []  # every global named, in order (for the allow-list)

    # -- reading bytes
    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise PickleDataError("a truncated pickle")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def line(self) -> bytes:
        end = bytes(self.data[self.pos : self.pos + 4096]).find(b"\n")
        if end < 0:
            raise PickleDataError("a truncated or overlong text opcode")
        return self.take(end + 1)[:-1]

    # -- stack helpers
    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise PickleDataError("a pickle with unbalanced marks")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def push(self, value: Any) -> None:
        self.stack.append(value)

    def pop(self) -> Any:
        if not self.stack:
            raise PickleDataError("a pickle that pops an empty stack")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise PickleDataError("a pickle that reads an empty stack")
        return self.stack[-1]

    def run(self) -> Any:
        for _ in range(MAX_OPS):
            code = self.take(1)[0]
            handler = _DISPATCH.get(code)
            if handler is None:
                raise PickleDataError(f"a pickle opcode this reader refuses (0x{code:02x})")
            if handler(self) is _STOP:
                if self.pos != len(self.data):
                    raise PickleDataError("trailing bytes after the pickle")
                if self.stack or self.marks:
                    raise PickleDataError("a pickle that leaves values behind")
                return self.result
        raise PickleDataError("a pickle with too many opcodes")


_STOP = object()
_DISPATCH: dict[int, Any] = {}


def _op(*codes: bytes):
    def register(fn):
        for code in codes:
            _DISPATCH[code[0]] = fn
        return fn

    return register


@_op(b"\x80")
def _proto(r: _Reader):
    if r.take(1)[0] > 5:
        raise PickleDataError("an unknown pickle protocol")


@_op(b"\x95")
def _frame(r: _Reader):
    r.take(8)  # frames are hints: the bytes follow inline


@_op(b".")
def _stop(r: _Reader):
    r.result = r.pop()
    return _STOP


@_op(b"N")
def _none(r):
    r.push(None)


@_op(b"\x88")
def _true(r):
    r.push(True)


@_op(b"\x89")
def _false(r):
    r.push(False)


@_op(b"J")
def _binint(r):
    r.push(int.from_bytes(r.take(4), "little", signed=True))


@_op(b"K")
def _binint1(r):
    r.push(r.uint(1))


@_op(b"M")
def _binint2(r):
    r.push(r.uint(2))


@_op(b"\x8a")
def _long1(r):
    r.push(int.from_bytes(r.take(r.uint(1)), "little", signed=True))


@_op(b"\x8b")
def _long4(r):
    n = r.uint(4)
    if n > 64:  # no checkpoint stores integers of more than 512 bits
        raise PickleDataError("an oversized integer")
    r.push(int.from_bytes(r.take(n), "little", signed=True))


@_op(b"I")
def _int_text(r):
    text = r.line()
    value = {b"00": False, b"01": True}.get(text)
    r.push(value if value is not None else _parse_int(text))


@_op(b"L")
def _long_text(r):
    r.push(_parse_int(r.line().rstrip(b"L")))


def _parse_int(text: bytes) -> int:
    if len(text) > 40:
        raise PickleDataError("an oversized integer")
    try:
        return int(text)
    except ValueError:
        raise PickleDataError("a malformed integer") from None


@_op(b"G")
def _binfloat(r):
    r.push(struct.unpack(">d", r.take(8))[0])


@_op(b"F")
def _float_text(r):
    try:
        r.push(float(r.line()))
    except ValueError:
        raise PickleDataError("a malformed float") from None


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise PickleDataError("a string that is not UTF-8") from None


@_op(b"X")
def _binunicode(r):
    r.push(_text(r.take(r.uint(4))))


@_op(b"\x8c")
def _short_binunicode(r):
    r.push(_text(r.take(r.uint(1))))


@_op(b"\x8d")
def _binunicode8(r):
    r.push(_text(r.take(r.uint(8))))


@_op(b"T")
def _binstring(r):
    r.push(r.take(r.uint(4)).decode("latin1"))  # py2 str, read as torch does


@_op(b"U")
def _short_binstring(r):
    r.push(r.take(r.uint(1)).decode("latin1"))


@_op(b"B")
def _binbytes(r):
    r.push(r.take(r.uint(4)))


@_op(b"C")
def _short_binbytes(r):
    r.push(r.take(r.uint(1)))


@_op(b"\x8e")
def _binbytes8(r):
    r.push(r.take(r.uint(8)))


@_op(b"\x96")
def _bytearray8(r):
    r.push(r.take(r.uint(8)))


@_op(b"}")
def _empty_dict(r):
    r.push({})


@_op(b"]")
def _empty_list(r):
    r.push([])


@_op(b")")
def _empty_tuple(r):
    r.push(())


@_op(b"\x8f")
def _empty_set(r):
    r.push(set())


@_op(b"(")
def _mark(r):
    if len(r.marks) > 10_000:
        raise PickleDataError("a pickle nested too deeply")
    r.marks.append(r.stack)
    r.stack = []


@_op(b"t")
def _tuple(r):
    r.push(tuple(r.pop_mark()))


@_op(b"\x85")
def _tuple1(r):
    r.push((r.pop(),))


@_op(b"\x86")
def _tuple2(r):
    b, a = r.pop(), r.pop()
    r.push((a, b))


@_op(b"\x87")
def _tuple3(r):
    c, b, a = r.pop(), r.pop(), r.pop()
    r.push((a, b, c))


@_op(b"l")
def _list(r):
    r.push(r.pop_mark())


@_op(b"d")
def _dict(r):
    items = r.pop_mark()
    if len(items) % 2:
        raise PickleDataError("a dictionary with an odd number of items")
    r.push({_check_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})


@_op(b"\x91")
def _frozenset(r):
    r.push({_check_key(x) for x in r.pop_mark()})


@_op(b"a")
def _append(r):
    value = r.pop()
    target = r.top()
    if type(target) is not list:
        raise PickleDataError("APPEND to something that is not a list")
    target.append(value)


@_op(b"e")
def _appends(r):
    items = r.pop_mark()
    target = r.top()
    if type(target) is not list:
        raise PickleDataError("APPENDS to something that is not a list")
    target.extend(items)


@_op(b"s")
def _setitem(r):
    value, key = r.pop(), r.pop()
    target = r.top()
    if type(target) is not dict:
        raise PickleDataError("SETITEM on something that is not a dictionary")
    target[_check_key(key)] = value


@_op(b"u")
def _setitems(r):
    items = r.pop_mark()
    target = r.top()
    if type(target) is not dict or len(items) % 2:
        raise PickleDataError("SETITEMS on something that is not a dictionary")
    for i in range(0, len(items), 2):
        target[_check_key(items[i])] = items[i + 1]


@_op(b"\x90")
def _additems(r):
    items = r.pop_mark()
    target = r.top()
    if type(target) is not set:
        raise PickleDataError("ADDITEMS on something that is not a set")
    target.update(_check_key(x) for x in items)


@_op(b"b")
def _build(r):
    state = r.pop()
    target = r.top()
    if type(target) is not Record or target.state is not None:
        raise PickleDataError("BUILD on something that is not a fresh record")
    target.state = state


@_op(b"c")
def _global(r):
    module = _text(r.line())
    name = _text(r.line())
    r.push(_named(r, _canonical(module, name)))


@_op(b"\x93")
def _stack_global(r):
    name, module = r.pop(), r.pop()
    if not (isinstance(module, str) and isinstance(name, str)):
        raise PickleDataError("a global whose name is not text")
    r.push(_named(r, _canonical(module, name)))


def _named(r: _Reader, name: str) -> Global:
    if len(name) > 200:
        raise PickleDataError("a global with an overlong name")
    if name not in r.globals:
        r.globals.append(name)
    return Global(name)


@_op(b"R")
def _reduce(r):
    args = r.pop()
    func = r.pop()
    r.push(_call(func, args))


@_op(b"\x81")
def _newobj(r):
    args = r.pop()
    cls = r.pop()
    if not isinstance(cls, Global) or not isinstance(args, tuple):
        raise PickleDataError("NEWOBJ of something that is not a named class")
    r.push(Record(cls.name, args))


@_op(b"\x92")
def _newobj_ex(r):
    kwargs, args, cls = r.pop(), r.pop(), r.pop()
    if not isinstance(cls, Global) or not isinstance(args, tuple) or kwargs:
        raise PickleDataError("NEWOBJ_EX of something that is not a named class")
    r.push(Record(cls.name, args))


@_op(b"Q")
def _binpersid(r):
    r.push(_storage(r, r.pop()))


def _storage(r: _Reader, pid: Any) -> StorageRef:
    """A persistent id of a ``torch.save`` zip: ``("storage", type, key, location, numel)``."""
    if r.storages is None:
        raise PickleDataError("tensor data outside a PyTorch zip archive")
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise PickleDataError("an unknown kind of persistent id")
    kind, key, _location, numel = pid[1:]
    if not isinstance(kind, Global) or kind.name not in STORAGE_DTYPES:
        raise PickleDataError("a tensor storage of an unsupported type")
    if not isinstance(key, str) or not key.isalnum() or len(key) > 32:
        raise PickleDataError("a tensor storage with an invalid key")
    ref = StorageRef(key, STORAGE_DTYPES[kind.name][0], _int(numel, "storage size"))
    known = r.storages.setdefault(key, ref)
    if known != ref:
        raise PickleDataError("one tensor storage described twice differently")
    return ref


@_op(b"0")
def _pop(r):
    r.pop()


@_op(b"1")
def _pop_mark(r):
    r.pop_mark()


@_op(b"2")
def _dup(r):
    r.push(r.top())


@_op(b"q")
def _binput(r):
    r.memo[r.uint(1)] = r.top()


@_op(b"r")
def _long_binput(r):
    r.memo[r.uint(4)] = r.top()


@_op(b"p")
def _put(r):
    r.memo[_parse_int(r.line())] = r.top()


@_op(b"\x94")
def _memoize(r):
    r.memo[len(r.memo)] = r.top()


def _get(r: _Reader, index: int) -> None:
    if index not in r.memo:
        raise PickleDataError("a memo reference to nothing")
    r.push(r.memo[index])


@_op(b"h")
def _binget(r):
    _get(r, r.uint(1))


@_op(b"j")
def _long_binget(r):
    _get(r, r.uint(4))


@_op(b"g")
def _get_text(r):
    _get(r, _parse_int(r.line()))


def parse_pickle(
    data: bytes, storages: dict[str, StorageRef] | None = None, names: list | None = None
) -> Any:
    """The value a pickle describes, as plain data, :class:`Record` and :class:`TensorRef`.

    Parameters
    ----------
    data : bytes
        One complete pickle (trailing bytes are refused).
    storages : dict, optional
        Filled with the tensor storages the pickle references; None refuses persistent ids.

    Raises
    ------
    PickleDataError
        Anything but a plain-data pickle (the message names no contents).
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise PickleDataError("a pickle stream larger than the limit")
    reader = _Reader(bytes(data), storages)
    try:
        return reader.run()
    finally:
        if names is not None:
            names.extend(reader.globals)


# ---------------------------------------------------------------------------------------------
# The checkpoint file


@dataclass
class Checkpoint:
    """A checkpoint read as data.

    Attributes
    ----------
    sha256 : str
        SHA-256 of the bytes read (the bytes everything else was parsed from).
    size : int
        File size in bytes.
    root : Any
        The pickle's value (plain data, records, tensor references).
    members : dict
        Storage key -> raw bytes of the zip member (tensor data).
    storages : dict
        Storage key -> what the pickle says it holds.
    globals : list of str
        Every global the pickle names (never imported).
    """

    sha256: str
    size: int
    root: Any
    members: dict[str, bytes] = field(default_factory=dict)
    storages: dict[str, StorageRef] = field(default_factory=dict)
    globals: list[str] = field(default_factory=list)
    #: Storages already turned into tensors, and the bytes of tensors made so far (bounded:
    #: many views of one large storage must not each become a copy of it).
    tensor_cache: dict = field(default_factory=dict, repr=False)
    made_bytes: int = 0


def read_bytes(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes of a regular file (not a link, not a device), read once, at most ``limit``.

    Raises
    ------
    FileNotFoundError
        No such file.
    PickleDataError
        A link, not a regular file, or larger than ``limit``.
    """
    import stat

    limit = MAX_FILE_BYTES if limit is None else limit
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file not found: {str(path)!r}") from None
    if stat.S_ISLNK(info.st_mode):
        raise PickleDataError("a symbolic link (give the file it points to)")
    if not stat.S_ISREG(info.st_mode):
        raise PickleDataError("not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise PickleDataError(f"larger than the {limit >> 20} MiB limit")
    return data


def read_checkpoint(path: str | os.PathLike, data: bytes | None = None) -> Checkpoint:
    """Read a ``torch.save`` file (zip, or a plain pickle without tensors) as data.

    Parameters
    ----------
    path : path-like
        The file (read once with :func:`read_bytes` unless ``data`` is given).
    data : bytes, optional
        Its bytes, already read.

    Raises
    ------
    PickleDataError
        Not a plain-data checkpoint: TorchScript, a legacy or damaged file, an archive whose
        members disagree, tensor sizes beyond the bytes present...
    """
    data = read_bytes(path) if data is None else data
    digest = hashlib.sha256(data).hexdigest()
    if data[:4] == b"PK\x03\x04":
        pkl, members = _zip_members(data)
        storages: dict[str, StorageRef] = {}
        names: list[str] = []
        root = parse_pickle(pkl, storages, names)
        for key, ref in storages.items():
            raw = members.get(key)
            if raw is None:
                raise PickleDataError("a tensor whose data is missing from the archive")
            if len(raw) < ref.numel * _ELEMENT_SIZE[ref.dtype]:
                raise PickleDataError("a tensor larger than its data in the archive")
        return Checkpoint(digest, len(data), root, members, storages, names)
    if data[:1] != b"\x80":
        raise PickleDataError("neither a PyTorch zip archive nor a pickle")
    names = []
    root = parse_pickle(data, None, names)
    return Checkpoint(digest, len(data), root, globals=names)


_ELEMENT_SIZE = {dtype: size for dtype, size in STORAGE_DTYPES.values()}
_META_MEMBERS = {
    "byteorder",
    "version",
    ".format_version",
    ".storage_alignment",
    ".data/version",
    ".data/serialization_id",
}


def _zip_members(data: bytes) -> tuple[bytes, dict[str, bytes]]:
    """``data.pkl`` and the tensor members of a ``torch.save`` zip, strictly checked.

    One folder, one ``data.pkl``, no duplicate names, nothing but tensor data and torch's small
    metadata files (TorchScript archives carry ``code/`` and ``constants.pkl``: refused);
    members stored uncompressed as torch writes them, each within the file's size.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        raise PickleDataError("a damaged zip archive") from None
    if len(infos) > MAX_MEMBERS:
        raise PickleDataError("a zip archive with too many members")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise PickleDataError("a zip archive with duplicate member names")
    prefixes = {n.split("/", 1)[0] for n in names}
    if len(prefixes) != 1 or not all("/" in n for n in names):
        raise PickleDataError("a zip archive that is not one PyTorch checkpoint folder")
    prefix = prefixes.pop() + "/"
    if any(n.startswith((prefix + "code/", prefix + "constants")) for n in names):
        raise PickleDataError("a TorchScript archive (code), not a checkpoint")
    members: dict[str, bytes] = {}
    pkl = None
    total = 0
    for info in infos:
        rest = info.filename[len(prefix) :]
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > len(data):
            raise PickleDataError("a zip member that is compressed or larger than the file")
        total += info.file_size
        if total > len(data):
            raise PickleDataError("zip members that add up to more than the file")
        if rest in _META_MEMBERS:
            if rest == "byteorder" and _read_member(archive, info) != b"little":
                raise PickleDataError("a checkpoint saved big-endian")
            continue
        if rest == "data.pkl":
            pkl = _read_member(archive, info)
        elif rest.startswith("data/") and rest[5:].isalnum():
            members[rest[5:]] = _read_member(archive, info)
        else:
            raise PickleDataError("a zip archive with members a checkpoint does not have")
    if pkl is None:
        raise PickleDataError("a zip archive without data.pkl (not a PyTorch checkpoint)")
    return pkl, members


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with archive.open(info) as fh:
            raw = fh.read(info.file_size + 1)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError):
        raise PickleDataError("a damaged zip member") from None
    if len(raw) != info.file_size:
        raise PickleDataError("a zip member whose size differs from its header")
    return raw


def tensor(ckpt: Checkpoint, ref: TensorRef):
    """The tensor ``ref`` describes, built from its storage bytes (a copy, float or not).

    Raises
    ------
    PickleDataError
        A view that reaches past its storage, or more elements than the storage holds
        (stride-0 tricks that would allocate gigabytes from a few bytes).
    """
    import torch

    storage = ref.storage
    numel = 1
    for s in ref.size:
        numel *= s
    if numel > storage.numel:
        raise PickleDataError("a tensor with more elements than its stored data")
    ckpt.made_bytes += numel * _ELEMENT_SIZE[storage.dtype]
    if ckpt.made_bytes > 2 * ckpt.size + (1 << 20):
        raise PickleDataError("tensors that add up to more than the bytes in the file")
    if numel:
        last = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride, strict=True))
        if last >= storage.numel:
            raise PickleDataError("a tensor view reaching past its stored data")
    cache = ckpt.tensor_cache
    base = cache.get(storage.key)
    dtype = getattr(torch, storage.dtype)
    if base is None:
        raw = ckpt.members[storage.key][: storage.numel * _ELEMENT_SIZE[storage.dtype]]
        base = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        cache[storage.key] = base
    if not numel:
        return torch.empty(ref.size, dtype=dtype)
    return base.as_strided(ref.size, ref.stride, ref.offset).clone()
