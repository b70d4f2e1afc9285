"""Pickles that call methods of allowed objects (issue 21, cases 1 and 6).

The old reader built live objects from an allow-list, so APPEND / BUILD / setattr gadgets on
allowed classes ran code inside the safety scan. The data-only reader builds none: each gadget
must end in one line, with nothing run and nothing cached.
"""

from __future__ import annotations

import pytest

from napari_yolocell.models import pickle_data, safety
from napari_yolocell.models.loading import load_detector

from ._craft import contained, glob, payload, pickled, stream, text, torch_zip

DETECTION_MODEL = glob("ultralytics.nn.tasks", "DetectionModel")


def _cfg(marker) -> bytes:
    """A model config whose activation ultralytics would evaluate."""
    return pickled({"activation": payload(marker), "backbone": [], "head": [], "nc": 1})


def _storage(key: str = "0", numel: int = 1) -> bytes:
    """BINPERSID of a float storage (``torch.save`` layout)."""
    return (
        b"("
        + text("storage")
        + glob("torch", "FloatStorage")
        + text(key)
        + text("cpu")
        + b"K"
        + bytes([numel])
        + b"tQ"
    )


def _tensor() -> bytes:
    ordered = glob("collections", "OrderedDict") + b")R"
    return (
        glob("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + _storage()
        + b"K\x00"
        + pickled((1,))
        + pickled((1,))
        + b"\x89"
        + ordered
        + b"tR"
    )


def _gadgets(marker) -> dict[str, bytes]:
    """name -> pickle body that would construct DetectionModel(cfg) through a method call."""
    setattr_state = b"}" + text("append") + DETECTION_MODEL + b"s"
    identity = glob("torch.nn.modules.linear", "Identity") + b")\x81" + setattr_state + b"b"
    standin = glob("models.yolo", "Detect") + b")\x81" + setattr_state + b"b"
    param = (
        glob("torch._utils", "_rebuild_parameter_with_state")
        + b"("
        + _tensor()
        + b"\x89"
        + glob("collections", "OrderedDict")
        + b")R"
        + setattr_state
        + b"tR"
    )
    return {
        "APPEND on torch Identity": identity + _cfg(marker) + b"a",
        "APPENDS on torch Identity": identity + b"(" + _cfg(marker) + b"e",
        "APPEND on a models.* stand-in": standin + _cfg(marker) + b"a",
        "APPEND on a parameter with state": param + _cfg(marker) + b"a",
        "SETITEM on a module": identity + text("k") + _cfg(marker) + b"s",
        "ADDITEMS on a module": identity + b"(" + text("k") + b"\x90",
        "BUILD twice": identity + setattr_state + b"b",
        "BUILD on a dict": b"}" + setattr_state + b"b",
    }


@pytest.mark.parametrize("name", list(_gadgets(None)))
@pytest.mark.parametrize("container", ["zip", "plain"])
def test_method_gadgets_run_nothing(tmp_path, marker, name, container):
    body = b"}" + text("model") + _gadgets(marker)[name] + b"s"
    path = tmp_path / "gadget.pt"
    if container == "zip":
        torch_zip(path, stream(body), {"0": b"\0\0\0\0"})
    else:
        path.write_bytes(stream(body))
    for backend in ("torch", "onnxruntime"):
        err = contained(
            lambda b=backend: load_detector(path, backend=b, device="cpu"),
            marker,
            tmp_path / "cache",
        )
        assert str(path) in str(err)


def test_the_249_byte_file_is_refused_by_the_scan_itself(tmp_path, marker):
    """The red-team's file ran its payload inside the old safety scan: now a one-line refusal."""
    body = b"}" + text("model") + _gadgets(marker)["APPEND on torch Identity"] + b"s"
    path = tmp_path / "tiny.pt"
    path.write_bytes(stream(body))
    err = contained(lambda: safety.require_safe(path), marker)
    assert "APPEND" in str(err)


def _numpy_dtype_build() -> bytes:
    """numpy.dtype with an object field whose BUILD state clears the has-object flag, then a
    scalar of it from raw bytes (a forged pointer when numpy builds it)."""
    obj_dtype = glob("numpy", "dtype") + b"(" + text("O8") + b"\x89\x88tR"
    obj_dtype += pickled((3, "|", None, None, None, -1, -1, 63)) + b"b"
    void = glob("numpy", "dtype") + b"(" + text("V8") + b"\x89\x88tR"
    state = (
        b"(K\x03"
        + text("|")
        + b"N"
        + pickled(("a",))
        + b"}"
        + text("a")
        + b"("
        + obj_dtype
        + b"K\x00t"
        + b"s"
        + b"K\x08K\x01K\x00t"
    )
    void += state + b"b"
    return glob("numpy._core.multiarray", "scalar") + b"(" + void + b"C\x08" + b"A" * 8 + b"tR"


def test_numpy_dtype_state_is_never_applied(tmp_path, marker):
    """A dtype BUILD could make numpy read a forged pointer: no numpy object is ever built."""
    body = b"}" + text("train_args") + b"}" + text("x") + _numpy_dtype_build() + b"ss"
    path = tmp_path / "numpy.pt"
    path.write_bytes(stream(body))
    ckpt = safety.read_model_file(path)
    value = ckpt.root["train_args"]["x"]
    assert isinstance(value, pickle_data.Record) and value.name.endswith("scalar")
    assert isinstance(value.args[0], pickle_data.Record) and value.args[0].state is not None
    contained(lambda: load_detector(path, backend="torch", device="cpu"), marker)


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02(cos\nsystem\nX\x04\x00\x00\x00truei.",  # INST
        b"\x80\x02(cos\nsystem\nX\x04\x00\x00\x00trueo.",  # OBJ
        b"\x80\x02\x82\x01.",  # EXT1 (copyreg registry)
        b"\x80\x05\x97.",  # NEXT_BUFFER
        b"\x80\x02" + b"(" * 20000 + b".",
        b"\x80\x02\x8b\xff\xff\xff\x7f.",  # LONG4 of 2 GB
        b"\x80\x02N.trailing",
    ],
    ids=["INST", "OBJ", "EXT1", "NEXT_BUFFER", "deep-marks", "huge-long", "trailing"],
)
def test_refused_opcodes_and_shapes(tmp_path, marker, data):
    path = tmp_path / "odd.pt"
    path.write_bytes(data)
    contained(lambda: safety.read_model_file(path, trusted=True), marker)


def test_code_globals_are_refused_by_name_but_never_imported(tmp_path, marker, monkeypatch):
    """``posix.system`` is refused by name; even trusted, it stays an inert record."""
    import sys

    body = b"}" + text("model") + glob("notamodule_xyz", "boom") + b")R" + b"s"
    path = tmp_path / "import.pt"
    path.write_bytes(stream(body))
    err = contained(lambda: safety.read_model_file(path), marker, errors=safety.UntrustedModelError)
    assert err.global_name == "notamodule_xyz.boom"
    safety.trust(path)
    assert isinstance(safety.read_model_file(path).root["model"], pickle_data.Record)
    assert "notamodule_xyz" not in sys.modules


def _shared_lists(levels: int = 40) -> bytes:
    """A list of two references to the previous one, ``levels`` deep: 2**levels leaves."""
    body = b"]q\x000"
    for i in range(1, levels + 1):
        body += b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i]) + b"0"
    return body + b"h" + bytes([levels])


def test_shared_structures_do_not_expand(tmp_path, marker):
    """A DAG through the memo would expand to 2**40 values if walked as a tree."""
    from napari_yolocell.models import netbuild

    body = b"}" + text("yolocell") + _shared_lists() + b"s"
    path = tmp_path / "dag.pt"
    path.write_bytes(stream(body))
    root = safety.read_model_file(path).root
    assert netbuild.checkpoint_settings(root["yolocell"]) is None
    # modules: each level's _modules holds the previous module twice (2**30 visits as a tree)
    ops = glob("torch.nn.modules.linear", "Identity") + b")\x81q\x00}b0"
    for i in range(1, 31):
        children = b"}(" + text("a") + b"h" + bytes([i - 1]) + text("b") + b"h" + bytes([i - 1])
        state = b"}(" + text("_modules") + children + b"uu"
        ops += glob("torch.nn.modules.container", "Sequential") + b")\x81q" + bytes([i])
        ops += state + b"b0"
    ops += b"h\x1e"
    root = glob("ultralytics.nn.tasks", "DetectionModel") + b")\x81}(" + text("_modules")
    root += b"}(" + text("m") + ops + b"u" + b"ub"
    path.write_bytes(stream(b"}" + text("model") + root + b"s"))
    err = contained(lambda: load_detector(path, backend="torch", device="cpu"), marker)
    assert "too many" in str(err)
