"""Checks on exported models made elsewhere (ONNX files, OpenVINO IR folders) before a runtime
opens them.

An exported model cannot run Python, but its runtime can be made to read other files (ONNX
external data, a ``model.bin`` link), load custom-op libraries, loop for ever or allocate
gigabytes. A file given as ``--model`` must therefore be a regular file (no links), within the
size limit, with every tensor inside the file, only standard operator sets, no control-flow
operators (``Loop``, ``Scan``, ``If``: unbounded iterations) and a bounded input shape. Every
refusal is one :class:`~napari_yolocell.models.spec.WeightsError` line naming the file and the
reason, never the file's contents.

The files are read **once**, into memory (:func:`check_export` returns a
:class:`CheckedExport`); the checks run on those bytes and the runtime is opened from the same
bytes (:mod:`~napari_yolocell.models.backends`), never from the path again: a file swapped
after the read cannot change what runs. For ONNX the runtime gets the checked message itself,
serialised again with any field our ``onnx`` does not know dropped, so ONNX Runtime cannot
read something the checks did not see.

At run time, what a dynamic graph may allocate is bounded too: ONNX Runtime sessions of
foreign models share one capped memory arena (:func:`capped_ort_options`), and OpenVINO models
are reshaped to the tile size we feed them and refused when an inferred tensor exceeds
:data:`MAX_TENSOR_BYTES` (:func:`check_openvino_tensors`).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import threading
from pathlib import Path

from napari_yolocell.models.spec import WeightsError

MAX_ONNX_BYTES = 400 * 1024 * 1024
MAX_XML_BYTES = 32 * 1024 * 1024
#: Largest static input side and batch an exported detector may declare (and largest side a
#: dynamic one is run at).
MAX_SIDE = 4096
MAX_BATCH = 64
#: Largest tensor a ConstantOfShape with a stored shape may make (64 M elements).
MAX_CONSTANT_ELEMENTS = 1 << 26
#: Memory all ONNX Runtime sessions of foreign models may take from their shared arena.
MAX_ORT_ARENA_BYTES = 4 << 30
#: Largest tensor an OpenVINO model may infer once reshaped to the input we feed it.
MAX_TENSOR_BYTES = 2 << 30
_DOMAINS = frozenset({"", "ai.onnx"})
_CONTROL_FLOW = frozenset({"Loop", "Scan", "If", "SequenceMap"})
_OV_CONTROL_FLOW = frozenset({"Loop", "TensorIterator", "If"})


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class CheckedExport:
    """An exported model read once and checked: what the runtime opens, as bytes.

    Attributes
    ----------
    path : pathlib.Path
        What the user gave (for messages only; never read again).
    kind : {"onnx", "openvino"}
        Format.
    model : bytes
        The checked ONNX message, or the ``model.xml`` bytes.
    weights : bytes
        ``model.bin`` bytes (OpenVINO; empty when there is none).
    input_shape : tuple of int
        Declared ``(N, C, H, W)`` input, -1 for a dynamic dimension.
    """

    path: Path
    kind: str
    model: bytes
    weights: bytes = b""
    input_shape: tuple[int, ...] = ()

    def __repr__(self) -> str:  # never the bytes
        return f"CheckedExport({str(self.path)!r}, {self.kind!r}, {len(self.model)} bytes)"


def _refuse(path: Path, reason: str) -> WeightsError:
    return WeightsError(f"refusing exported model {str(path)!r}: {reason}")


_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open: it is refused below
    | getattr(os, "O_CLOEXEC", 0)
)


def read_once(path: Path, limit: int, dir_fd: int | None = None) -> bytes:
    """The bytes of ``path``, a regular file (not a link, FIFO or device) of at most ``limit``
    bytes, read once through one descriptor (``dir_fd``: ``path.name`` inside that folder).

    Raises
    ------
    FileNotFoundError, WeightsError
    """
    path = Path(path)
    target = path.name if dir_fd is not None else path
    try:
        fd = os.open(target, _OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file not found: {str(path)!r}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _refuse(path, "it is a symbolic link (give the file itself)") from None
        raise _refuse(path, f"it cannot be read ({type(err).__name__})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path, "not a regular file")
        if info.st_size > limit:
            raise _refuse(path, f"larger than the {limit >> 20} MiB limit")
        chunks, size = [], 0
        while size <= limit:  # the file may grow while read: stop past the limit
            chunk = os.read(fd, min(1 << 24, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise _refuse(path, f"it cannot be read ({type(err).__name__})") from None
    finally:
        os.close(fd)
    if size > limit:
        raise _refuse(path, f"larger than the {limit >> 20} MiB limit")
    return b"".join(chunks)


def check_export(path: str | Path) -> CheckedExport:
    """Read an ONNX file or OpenVINO IR (folder or ``.xml``) once and check it.

    Returns
    -------
    CheckedExport
        The bytes the runtime must open (never the path again).

    Raises
    ------
    FileNotFoundError
        Missing file.
    WeightsError
        Refused (one line).
    """
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file not found: {str(path)!r}") from None
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(path, "it is a symbolic link (give the file itself)")
    if stat.S_ISDIR(info.st_mode) or path.suffix.lower() == ".xml":
        return check_openvino(path)
    return check_onnx(path)


def check_onnx(path: Path) -> CheckedExport:
    """The ONNX rules: one file, standard operators, no control flow, bounded input."""
    path = Path(path)
    data = read_once(path, MAX_ONNX_BYTES)
    model = _parse_onnx(path, data)
    del data
    shape = check_onnx_model(path, model)
    model.DiscardUnknownFields()  # the runtime reads exactly the fields checked here
    return CheckedExport(path, "onnx", model.SerializeToString(), input_shape=tuple(shape))


def _parse_onnx(path: Path, data: bytes):
    import onnx

    try:
        return onnx.load_model_from_string(data)
    except Exception:  # protobuf errors echo bytes of the file: name the type only
        raise _refuse(path, "not a readable ONNX model") from None


def check_onnx_model(path: Path, model) -> list[int]:
    """The ONNX rules on a parsed ``ModelProto``; returns the declared input shape."""
    if model.functions:
        raise _refuse(path, "it defines its own functions (custom operators)")
    for opset in model.opset_import:
        if opset.domain not in _DOMAINS:
            raise _refuse(path, "it uses a non-standard operator set (custom operators)")
    graph = model.graph
    for tensor in list(graph.initializer) + list(graph.sparse_initializer):
        if _external(tensor):
            raise _refuse(path, "it keeps tensor data in other files (external data)")
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in constants:
            _check_constant_shape(path, constants[node.input[0]])
        if node.domain not in _DOMAINS:
            raise _refuse(path, "it uses a non-standard operator (custom operator)")
        if node.op_type in _CONTROL_FLOW:
            raise _refuse(path, f"it uses the control-flow operator {node.op_type}")
        for attr in node.attribute:
            if attr.type in (attr.GRAPH, attr.GRAPHS):
                raise _refuse(path, "it holds nested graphs")
            if attr.HasField("t") and _external(attr.t):
                raise _refuse(path, "it keeps tensor data in other files (external data)")
            if attr.HasField("sparse_tensor") and (
                _external(attr.sparse_tensor.values) or _external(attr.sparse_tensor.indices)
            ):
                raise _refuse(path, "it keeps tensor data in other files (external data)")
            if any(_external(t) for t in attr.tensors):
                raise _refuse(path, "it keeps tensor data in other files (external data)")
    inputs = [i for i in graph.input if i.name not in constants]
    if len(inputs) != 1:
        raise _refuse(path, "a detector takes exactly one image input")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    check_input_shape(path, shape)
    return shape


def _check_constant_shape(path: Path, shape_tensor) -> None:
    """A ConstantOfShape whose shape is stored must stay small (runtimes fold it at load)."""
    from onnx import numpy_helper

    try:
        dims = numpy_helper.to_array(shape_tensor).astype("int64").ravel().tolist()
    except Exception:  # malformed initializer
        raise _refuse(path, "a malformed constant shape") from None
    total = 1
    for d in dims:
        total *= max(int(d), 0)
    if len(dims) > 8 or total > MAX_CONSTANT_ELEMENTS:
        raise _refuse(path, "a constant tensor larger than the limit")


def _external(tensor) -> bool:
    import onnx

    if isinstance(tensor, onnx.SparseTensorProto):
        return _external(tensor.values) or _external(tensor.indices)
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def check_input_shape(path: Path, shape: list[int]) -> None:
    """An NCHW image input with a bounded batch, 1 or 3 channels and sides up to MAX_SIDE."""
    if len(shape) != 4:
        raise _refuse(path, "its input is not an image batch (N, C, H, W)")
    batch, channels, height, width = shape
    if batch > MAX_BATCH or channels not in (-1, 1, 3):
        raise _refuse(path, "its input batch or channel count is out of range")
    if height > MAX_SIDE or width > MAX_SIDE or 0 in (height, width):
        raise _refuse(path, f"its input is larger than {MAX_SIDE} x {MAX_SIDE} pixels")


def check_openvino(path: Path) -> CheckedExport:
    """The OpenVINO rules: model.xml and model.bin regular files side by side, no links, no
    DTD, no control flow, a bounded input. Both files are read once, through one descriptor
    of their folder."""
    path = Path(path)
    is_dir = stat.S_ISDIR(os.lstat(path).st_mode) if os.path.lexists(path) else False
    xml = path / "model.xml" if is_dir else path
    folder = xml.parent
    dir_flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
    if is_dir:
        dir_flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        dir_fd = os.open(folder, dir_flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file not found: {str(xml)!r}") from None
    except OSError as err:
        raise _refuse(path, f"its folder cannot be opened ({type(err).__name__})") from None
    try:
        for name in os.listdir(dir_fd):
            if name.endswith((".xml", ".bin")):
                info = os.lstat(name, dir_fd=dir_fd)
                if stat.S_ISLNK(info.st_mode):
                    raise _refuse(path, "its folder holds symbolic links")
        text = read_once(xml, MAX_XML_BYTES, dir_fd=dir_fd)
        try:
            weights = read_once(xml.with_suffix(".bin"), MAX_ONNX_BYTES, dir_fd=dir_fd)
        except FileNotFoundError:
            weights = b""
    finally:
        os.close(dir_fd)
    shape = check_openvino_xml(path, text)
    return CheckedExport(path, "openvino", text, weights, tuple(shape))


def check_openvino_xml(path: Path, text: bytes) -> list[int]:
    """The OpenVINO rules on ``model.xml``'s bytes; returns the declared input shape."""
    import xml.etree.ElementTree as ET

    if b"\0" in text:  # UTF-16/32 would hide a DTD from the byte test below
        raise _refuse(path, "its XML is not UTF-8")
    if b"<!DOCTYPE" in text or b"<!ENTITY" in text:
        raise _refuse(path, "its XML declares a DTD or entities")
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        raise _refuse(path, "not a readable OpenVINO IR (XML)") from None
    if root.tag != "net":
        raise _refuse(path, "not an OpenVINO IR (XML)")
    parameters = []
    for layer in root.iter("layer"):
        kind = layer.get("type", "")
        if kind in _OV_CONTROL_FLOW:
            raise _refuse(path, f"it uses the control-flow operation {kind}")
        if layer.get("version", "opset").startswith("extension"):
            raise _refuse(path, "it uses custom operations")
        if kind == "Parameter":
            parameters.append(layer)
    if len(parameters) != 1:
        raise _refuse(path, "a detector takes exactly one image input")
    data = parameters[0].find("data")
    shape_text = "" if data is None else data.get("shape", "")
    shape = [_dim(x, path) for x in shape_text.split(",") if x.strip()]
    check_input_shape(path, shape)
    return shape


def _dim(text: str, path: Path) -> int:
    text = text.strip()
    if text in ("?", "-1") or ".." in text:
        return -1
    if not text.isdigit() or len(text) > 9:
        raise _refuse(path, "its input shape is not readable")
    return int(text)


# ---------------------------------------------------------------------------------------------
# Run-time bounds


_ARENA_LOCK = threading.Lock()
_ARENA_READY: list[bool] = []


def capped_ort_options(threads: int):
    """ONNX Runtime session options for a foreign model: its CPU memory comes from one arena
    shared by all such sessions and capped at :data:`MAX_ORT_ARENA_BYTES` (an allocation past
    it fails the run instead of taking the machine's memory), and the runtime logs nothing (its
    messages can quote node names from the file)."""
    import onnxruntime as ort

    with _ARENA_LOCK:
        if not _ARENA_READY:
            config = ort.OrtArenaCfg(
                {"max_mem": MAX_ORT_ARENA_BYTES, "arena_extend_strategy": 1}  # as requested
            )
            info = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            ort.create_and_register_allocator(info, config)
            _ARENA_READY.append(True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only
    options.enable_cpu_mem_arena = True
    options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def ort_run_options():
    """Run options of a foreign model: silent, the arena given back after each run."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def check_openvino_tensors(path: Path, network) -> None:
    """Refuse an OpenVINO model (reshaped to the input we feed it) in which some tensor is of
    unbounded size or larger than :data:`MAX_TENSOR_BYTES`."""
    for op in network.get_ordered_ops():
        for output in op.outputs():
            shape = output.get_partial_shape()
            if shape.rank.is_dynamic:
                raise _refuse(path, "a tensor of unbounded size at this input size")
            count = 1
            for dim in shape:
                length = dim.get_max_length()
                if length < 0:
                    raise _refuse(path, "a tensor of unbounded size at this input size")
                count *= length
            if count * max(1, output.get_element_type().size) > MAX_TENSOR_BYTES:
                raise _refuse(path, "a tensor larger than the memory limit at this input size")
