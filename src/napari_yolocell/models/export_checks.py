"""Checks on exported models made elsewhere (ONNX files, OpenVINO IR folders) before a runtime
opens them.

An exported model cannot run Python, but its runtime can be made to read other files (ONNX
external data, a ``model.bin`` link), load custom-op libraries, loop for ever or allocate
gigabytes. A file given as ``--model`` must therefore be a regular file (no links), within the
size limit, with every tensor inside the file, only standard operator sets, no control-flow
operators (``Loop``, ``Scan``, ``If``: unbounded iterations) and a bounded input shape. Every
refusal is one :class:`~napari_yolocell.models.spec.WeightsError` line naming the file and the
reason, never the file's contents.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from napari_yolocell.models.spec import WeightsError

MAX_ONNX_BYTES = 400 * 1024 * 1024
MAX_XML_BYTES = 32 * 1024 * 1024
#: Largest static input side and batch an exported detector may declare.
MAX_SIDE = 4096
MAX_BATCH = 64
#: Largest tensor a ConstantOfShape with a stored shape may make (64 M elements).
MAX_CONSTANT_ELEMENTS = 1 << 26
_DOMAINS = frozenset({"", "ai.onnx"})
_CONTROL_FLOW = frozenset({"Loop", "Scan", "If", "SequenceMap"})
_OV_CONTROL_FLOW = frozenset({"Loop", "TensorIterator", "If"})


def _refuse(path: Path, reason: str) -> WeightsError:
    return WeightsError(f"refusing exported model {str(path)!r}: {reason}")


def regular_file(path: Path, limit: int) -> int:
    """Size of ``path``, a regular file (not a link) of at most ``limit`` bytes.

    Raises
    ------
    FileNotFoundError, WeightsError
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file not found: {str(path)!r}") from None
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(path, "it is a symbolic link (give the file itself)")
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(path, "not a regular file")
    if info.st_size > limit:
        raise _refuse(path, f"larger than the {limit >> 20} MiB limit")
    return info.st_size


def check_export(path: str | Path) -> None:
    """Refuse an ONNX file or OpenVINO IR (folder or ``.xml``) outside the rules above.

    Raises
    ------
    FileNotFoundError
        Missing file.
    WeightsError
        Refused (one line).
    """
    path = Path(path)
    if path.is_symlink():
        raise _refuse(path, "it is a symbolic link (give the file itself)")
    if path.is_dir() or path.suffix.lower() == ".xml":
        check_openvino(path)
    else:
        check_onnx(path)


def check_onnx(path: Path) -> None:
    """The ONNX rules: one file, standard operators, no control flow, bounded input."""
    import onnx

    regular_file(path, MAX_ONNX_BYTES)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf errors echo bytes of the file: name the type only
        raise _refuse(path, "not a readable ONNX model") from None
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
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1:
        raise _refuse(path, "a detector takes exactly one image input")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    check_input_shape(path, shape)


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


def check_openvino(path: Path) -> None:
    """The OpenVINO rules: model.xml and model.bin regular files side by side, no links, no
    DTD, no control flow, a bounded input."""
    import xml.etree.ElementTree as ET

    xml = path / "model.xml" if path.is_dir() else path
    folder = xml.parent
    regular_file(xml, MAX_XML_BYTES)
    bin_file = xml.with_suffix(".bin")
    if bin_file.exists() or bin_file.is_symlink():
        regular_file(bin_file, MAX_ONNX_BYTES)
    for entry in os.scandir(folder):
        if entry.is_symlink() and entry.name.endswith((".xml", ".bin")):
            raise _refuse(path, "its folder holds symbolic links")
    with open(xml, "rb") as fh:
        text = fh.read(MAX_XML_BYTES + 1)
    if b"<!DOCTYPE" in text or b"<!ENTITY" in text:
        raise _refuse(path, "its XML declares a DTD or entities")
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        raise _refuse(path, "not a readable OpenVINO IR (XML)") from None
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
    check_input_shape(path, [_dim(x, path) for x in shape_text.split(",") if x.strip()])


def _dim(text: str, path: Path) -> int:
    text = text.strip()
    if text in ("?", "-1") or ".." in text:
        return -1
    if not text.isdigit() or len(text) > 9:
        raise _refuse(path, "its input shape is not readable")
    return int(text)
