"""Exported models made elsewhere (issue 21, cases 9, 10, 11): ONNX and OpenVINO IR.

External data, custom operators, control flow, giant constants and inputs, links out of the
model folder, garbage: refused before a runtime opens them, in one line naming the file.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from napari_yolocell.cli import main
from napari_yolocell.models.loading import describe_model, load_detector

from ._craft import contained


def _graph(nodes, inputs=None, initializers=(), shape=(1, 3, 64, 64), opsets=None):
    inputs = inputs or [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(shape))]
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", inputs, [out], initializer=list(initializers))
    return helper.make_model(graph, opset_imports=opsets or [helper.make_opsetid("", 17)])


def _identity(**kw):
    return _graph([helper.make_node("Identity", ["images"], ["output0"])], **kw)


def _hostile(tmp_path) -> dict[str, onnx.ModelProto]:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)
    external = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    external.data_location = TensorProto.EXTERNAL
    external.ClearField("raw_data")
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = external.external_data.add()
        entry.key, entry.value = key, value
    add = helper.make_node("Add", ["images", "w"], ["output0"])
    loop_body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])],
    )
    trips = numpy_helper.from_array(np.array(10**15, np.int64), "trips")
    cond = numpy_helper.from_array(np.array(True), "cond")
    loop = helper.make_node("Loop", ["trips", "cond"], ["output0"], body=loop_body)
    shape = numpy_helper.from_array(np.array([100_000, 100_000], np.int64), "shape")
    big = helper.make_node("ConstantOfShape", ["shape"], ["output0"])
    custom = helper.make_node("Evil", ["images"], ["output0"], domain="com.evil")
    return {
        "external data ../": _graph([add], initializers=[external]),
        "Loop of 1e15": _graph([loop], initializers=[trips, cond]),
        "ConstantOfShape 1e10": _graph([big], initializers=[shape]),
        "custom op": _graph(
            [custom], opsets=[helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)]
        ),
        "30000 x 30000 input": _identity(shape=(1, 3, 30000, 30000)),
    }


@pytest.mark.parametrize(
    "name",
    [
        "external data ../",
        "Loop of 1e15",
        "ConstantOfShape 1e10",
        "custom op",
        "30000 x 30000 input",
    ],
)
def test_hostile_onnx(tmp_path, marker, name):
    path = tmp_path / "model.onnx"
    onnx.save(_hostile(tmp_path)[name], path)
    contained(lambda: load_detector(path, device="cpu"), marker)
    contained(lambda: describe_model(path), marker)


@pytest.mark.parametrize("size", [0, 16, 4096])
def test_garbage_onnx(tmp_path, marker, size):
    path = tmp_path / "model.onnx"
    path.write_bytes(os.urandom(size))
    contained(lambda: load_detector(path, device="cpu"), marker)


def _ir(folder, shape="1,3,64,64"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.xml").write_text(
        '<?xml version="1.0"?>\n<net name="x" version="11"><layers>'
        '<layer id="0" name="images" type="Parameter" version="opset1">'
        f'<data shape="{shape}" element_type="f32"/></layer>'
        "</layers><edges/></net>\n"
    )
    return folder


def test_openvino_bin_link_out_of_the_folder(tmp_path, marker):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"S" * 64)
    folder = _ir(tmp_path / "ir")
    (folder / "model.bin").symlink_to(secret)
    err = contained(lambda: load_detector(folder, device="cpu"), marker)
    assert "link" in str(err)


def test_openvino_huge_shape_via_cli_models(tmp_path, marker, capsys):
    folder = _ir(tmp_path / "ir", shape="1,3,100000,100000")
    (folder / "model.bin").write_bytes(b"")
    assert main(["models", str(folder)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0]
    assert not marker.exists()


def test_openvino_entities_refused(tmp_path, marker):
    folder = tmp_path / "ir"
    folder.mkdir()
    (folder / "model.xml").write_text(
        '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><net>&b;</net>'
    )
    contained(lambda: load_detector(folder, device="cpu"), marker)
