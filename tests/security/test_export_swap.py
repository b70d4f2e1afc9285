"""Exported models made elsewhere are read once (issue 21, case 8 for ONNX / OpenVINO): a file
swapped between the checks and the runtime's open cannot change what runs, and what a dynamic
graph allocates at run time is bounded.

Every model is made here: ``x * k`` reshaped to ``(1, N, 6)`` (a layout the detector accepts),
so the output tells which file's graph ran.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from napari_yolocell.models import export_checks
from napari_yolocell.models.loading import load_detector
from napari_yolocell.models.spec import WeightsError

from ._craft import contained

SHAPE = (1, 3, 64, 64)
BATCH = np.linspace(0, 1, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)


def _scale_onnx(k: float, shape=SHAPE) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(shape))]
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, None, 6])
    inits = [
        numpy_helper.from_array(np.array(k, np.float32), "k"),
        numpy_helper.from_array(np.array([1, -1, 6], np.int64), "to3d"),
    ]
    nodes = [
        helper.make_node("Mul", ["images", "k"], ["scaled"]),
        helper.make_node("Reshape", ["scaled", "to3d"], ["output0"]),
    ]
    graph = helper.make_graph(nodes, "g", inputs, [out], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _hostile_onnx(tmp_path) -> onnx.ModelProto:
    """Reads ``secret.bin`` as external data: refused by the checks if they ever see it."""
    model = _scale_onnx(1.0)
    k = model.graph.initializer[0]
    k.ClearField("raw_data")
    k.ClearField("float_data")
    k.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", "4")):
        entry = k.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "secret.bin").write_bytes(np.float32(1000).tobytes())
    return model


def _swap_after_read(monkeypatch, name: str, swap) -> list[str]:
    """Run ``swap()`` right after ``read_once`` has read the file called ``name``."""
    original = export_checks.read_once
    reads: list[str] = []

    def read_then_swap(path, limit, dir_fd=None):
        data = original(path, limit, dir_fd=dir_fd)
        reads.append(path.name)
        if path.name == name:
            swap()
        return data

    monkeypatch.setattr(export_checks, "read_once", read_then_swap)
    return reads


def _spy_sessions(monkeypatch) -> list[type]:
    import onnxruntime as ort

    seen: list[type] = []
    original = ort.InferenceSession

    def session(model, *args, **kwargs):
        seen.append(type(model))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    return seen


def _outputs(detector) -> np.ndarray:
    return np.asarray(detector._forward(BATCH)).ravel()


@pytest.mark.parametrize("replacement", ["other graph", "external data", "link", "garbage"])
def test_onnx_swapped_after_the_read_changes_nothing(tmp_path, monkeypatch, marker, replacement):
    path = tmp_path / "model.onnx"
    onnx.save(_scale_onnx(2.0), path)

    def swap():
        path.unlink()
        if replacement == "other graph":
            onnx.save(_scale_onnx(3.0), path)
        elif replacement == "external data":
            onnx.save(_hostile_onnx(tmp_path), path)
        elif replacement == "link":
            path.symlink_to(tmp_path / "secret.bin")
        else:
            path.write_bytes(b"\x08" * 64)

    reads = _swap_after_read(monkeypatch, "model.onnx", swap)
    sessions = _spy_sessions(monkeypatch)
    detector = load_detector(path, device="cpu")
    assert reads == ["model.onnx"], "the file was read more than once"
    assert sessions == [bytes], "ONNX Runtime was given something other than the bytes read"
    np.testing.assert_allclose(_outputs(detector), 2.0 * BATCH.ravel(), rtol=1e-6)
    assert not marker.exists()


def test_onnx_unknown_fields_do_not_reach_the_runtime(tmp_path):
    """The runtime gets the checked message, re-serialised: bytes our parser skipped are gone."""
    path = tmp_path / "model.onnx"
    raw = _scale_onnx(2.0).SerializeToString()
    unknown = b"\xf8\xff\x03\x01"  # field 65535, varint 1: unknown to ModelProto
    path.write_bytes(raw + unknown)
    checked = export_checks.check_export(path)
    assert checked.model == _scale_onnx(2.0).SerializeToString()
    assert "model.onnx" in repr(checked) and "\\x" not in repr(checked)


def _ir_files(folder, k: float, dynamic: bool = False, tile: int = 1):
    """An OpenVINO IR of ``x * k`` (``k`` stored in model.bin); ``tile``: the input repeated
    ``tile`` x ``tile`` times in H and W first (an allocation that grows with the input)."""
    import openvino as ov
    import openvino.opset13 as ops

    shape = [1, 3, -1, -1] if dynamic else list(SHAPE)
    images = ops.parameter(ov.PartialShape(shape), ov.Type.f32, name="images")
    x = images
    if tile > 1:
        x = ops.tile(x, ops.constant(np.array([1, 1, tile, tile], np.int64)))
    x = ops.multiply(x, ops.constant(np.full((1, 3, 1, 1), k, np.float32)))
    x = ops.reshape(x, ops.constant(np.array([1, -1, 6], np.int64)), special_zero=False)
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.Model([x], [images], "m"), str(folder / "model.xml"), compress_to_fp16=False)
    return folder


@pytest.mark.parametrize("swapped", ["model.xml", "model.bin"])
def test_openvino_swapped_after_the_read_changes_nothing(tmp_path, monkeypatch, marker, swapped):
    import openvino as ov

    folder = _ir_files(tmp_path / "ir", 2.0)
    other = _ir_files(tmp_path / "other", 3.0)

    def swap():
        if swapped == "model.xml":  # a hostile XML the checks would refuse (DTD, entities)
            (folder / "model.xml").write_text('<?xml version="1.0"?><!DOCTYPE n []><net/>')
        else:  # the other model, both files
            for name in ("model.xml", "model.bin"):
                (folder / name).write_bytes((other / name).read_bytes())

    reads = _swap_after_read(monkeypatch, swapped, swap)
    opened: list[tuple[type, type]] = []
    original = ov.Core.read_model

    def read_model(self, model, weights=None, config=None):
        opened.append((type(model), type(weights)))
        return original(self, model, weights)

    monkeypatch.setattr(ov.Core, "read_model", read_model)
    detector = load_detector(folder, device="cpu")
    assert sorted(reads) == ["model.bin", "model.xml"], "a file was read more than once"
    assert opened == [(bytes, ov.Tensor)], "OpenVINO was given a path"
    np.testing.assert_allclose(_outputs(detector), 2.0 * BATCH.ravel(), rtol=1e-6)
    assert not marker.exists()


def test_openvino_folder_swapped_for_a_link_is_refused(tmp_path, marker):
    folder = _ir_files(tmp_path / "ir", 2.0)
    secret = tmp_path / "secret.xml"
    secret.write_bytes((folder / "model.xml").read_bytes())
    (folder / "model.xml").unlink()
    (folder / "model.xml").symlink_to(secret)
    err = contained(lambda: load_detector(folder, device="cpu"), marker)
    assert "link" in str(err)


def test_fifo_is_refused_without_blocking(tmp_path, marker):
    import os

    path = tmp_path / "model.onnx"
    os.mkfifo(path)
    contained(lambda: export_checks.read_once(path, 1 << 20), marker)


# ---------------------------------------------------------------------------------------------
# Run-time allocations of dynamic graphs


def _growing_onnx(factor: int) -> onnx.ModelProto:
    """Dynamic input; ConstantOfShape(shape(x) * factor): passes the static checks, and asks
    for ``factor**2`` times the input's memory when run."""
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "h", "w"])]
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, "n", 6])
    inits = [
        numpy_helper.from_array(np.array([1, 1, factor, factor], np.int64), "factor"),
        numpy_helper.from_array(np.array([1, -1, 6], np.int64), "to3d"),
    ]
    one = numpy_helper.from_array(np.array([1.0], np.float32))
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Mul", ["shape", "factor"], ["big"]),
        helper.make_node("ConstantOfShape", ["big"], ["filled"], value=one),
        helper.make_node("Reshape", ["filled", "to3d"], ["output0"]),
    ]
    graph = helper.make_graph(nodes, "g", inputs, [out], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_onnx_allocation_is_capped(tmp_path, marker):
    path = tmp_path / "model.onnx"
    onnx.save(_growing_onnx(1000), path)  # a 64 x 64 tile asks for 49 GB
    detector = load_detector(path, device="cpu")
    tile = np.zeros((64, 64), np.uint8)
    err = contained(lambda: detector.predict([tile], 0.25, 0.45, 100), marker, errors=WeightsError)
    assert str(path) in str(err) and "memory limit" in str(err)


def test_dynamic_onnx_small_allocation_runs(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_growing_onnx(2), path)
    detector = load_detector(path, device="cpu")
    detector.predict([np.zeros((64, 64), np.uint8)], 0.25, 0.45, 100)  # within the cap


def test_dynamic_input_is_run_at_most_at_the_side_limit(tmp_path, marker):
    path = tmp_path / "model.onnx"
    onnx.save(_growing_onnx(1), path)
    detector = load_detector(path, device="cpu")
    tile = np.zeros((export_checks.MAX_SIDE + 1, 8), np.uint8)
    err = contained(lambda: detector.predict([tile], 0.25, 0.45, 100), marker)
    assert str(path) in str(err) and "--tile" in str(err)


def test_dynamic_openvino_tensors_checked_at_the_tile_size(tmp_path, marker):
    folder = _ir_files(tmp_path / "ir", 2.0, dynamic=True, tile=1000)  # 49 GB at 64 x 64
    detector = load_detector(folder, device="cpu")
    tile = np.zeros((64, 64), np.uint8)
    err = contained(lambda: detector.predict([tile], 0.25, 0.45, 100), marker, errors=WeightsError)
    assert str(folder) in str(err) and "memory limit" in str(err)


def test_dynamic_openvino_runs_at_the_tile_size(tmp_path):
    folder = _ir_files(tmp_path / "ir", 2.0, dynamic=True)
    detector = load_detector(folder, device="cpu")
    np.testing.assert_allclose(_outputs(detector), 2.0 * BATCH.ravel(), rtol=1e-6)
    assert (1, 3, 64, 64) in detector._compiled
