"""Files that are not what they say (issue 21, cases 5, 8, 9, 10, 11).

TorchScript under other names, zip bombs, stride-0 tensors, truncated data, ``.xz`` bombs,
size limits, links, a file swapped during its load, odd settings and names: each either loads
the genuine network or ends in one line naming the file, with nothing run or cached.
"""

from __future__ import annotations

import lzma
import os
import shutil
import zipfile

import pytest
import torch

from napari_yolocell.models import loading, pickle_data
from napari_yolocell.models.loading import load_detector
from napari_yolocell.models.spec import ModelSpec

from ._craft import (
    BUNDLED,
    bundled_checkpoint,
    contained,
    glob,
    pickled,
    stream,
    text,
    torch_zip,
)


def _load(path, backend="torch"):
    return lambda: load_detector(path, backend=backend, device="cpu")


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.bin", "model.torchscript"])
def test_torchscript_under_any_name(tmp_path, marker, name):
    path = tmp_path / name
    torch.jit.save(torch.jit.script(torch.nn.Identity()), path)
    err = contained(_load(path), marker, tmp_path / "cache")
    assert "TorchScript" in str(err)


def test_zip_bomb_is_not_inflated(tmp_path, marker):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", stream(b"}"))
        archive.writestr("archive/data/0", b"\0" * (300 << 20))  # 300 MB in ~300 KB
    assert path.stat().st_size < 2 << 20
    err = contained(_load(path), marker)
    assert "compressed" in str(err)


def _module_with(tensor_ops: bytes) -> bytes:
    """An ultralytics DetectionModel record whose one parameter is ``tensor_ops``."""
    # MARK k v k v ... SETITEMS, as pickle writes a module's __dict__
    state = (
        b"}("
        + text("_parameters")
        + b"}"
        + text("w")
        + tensor_ops
        + b"s"
        + text("_modules")
        + b"}"
        + text("yaml")
        + pickled({"nc": 1})
        + b"u"
    )
    model = glob("ultralytics.nn.tasks", "DetectionModel") + b")\x81" + state + b"b"
    return stream(b"}" + text("model") + model + b"s")


def _tensor(size: tuple, stride: tuple, numel: int = 1) -> bytes:
    storage = (
        b"("
        + text("storage")
        + glob("torch", "FloatStorage")
        + text("0")
        + text("cpu")
        + pickled(numel)
        + b"tQ"
    )
    return (
        glob("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + storage
        + b"K\x00"
        + pickled(size)
        + pickled(stride)
        + b"\x89"
        + glob("collections", "OrderedDict")
        + b")Rt"
        + b"R"
    )


@pytest.mark.parametrize(
    ("case", "size", "stride", "numel", "data"),
    [
        ("stride-0 view of one float", (100_000, 100_000), (0, 0), 1, 4),
        ("view past its storage", (10,), (1,), 4, 16),
        ("storage larger than its data", (1,), (1,), 1 << 28, 4),
        ("storage data missing", (1,), (1,), 1, None),
    ],
)
def test_tensor_sizes_are_checked_against_the_bytes(
    tmp_path, marker, case, size, stride, numel, data
):
    path = tmp_path / "tensor.pt"
    members = {} if data is None else {"0": b"\0" * data}
    torch_zip(path, _module_with(_tensor(size, stride, numel)), members)
    contained(_load(path), marker, tmp_path / "cache")


def test_xz_that_unpacks_past_the_limit(tmp_path, marker, monkeypatch):
    monkeypatch.setattr(pickle_data, "MAX_FILE_BYTES", 1 << 20)
    path = tmp_path / "big.pt.xz"
    path.write_bytes(lzma.compress(b"\0" * (3 << 20)))
    err = contained(_load(path), marker)
    assert "MiB" in str(err)
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not [p for p in left if p.name != "cache.key"], f"left behind: {left}"


def test_xz_that_is_not_xz(tmp_path, marker):
    path = tmp_path / "bad.pt.xz"
    path.write_bytes(os.urandom(4096))
    contained(_load(path), marker)


def test_file_size_limit(tmp_path, marker, monkeypatch):
    monkeypatch.setattr(pickle_data, "MAX_FILE_BYTES", 1 << 20)
    path = tmp_path / "mine.pt"
    shutil.copy(BUNDLED, path)
    assert "limit" in str(contained(_load(path), marker))


def test_links_are_not_followed(tmp_path, marker):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-FIRST-LINE\nmore\n")
    link = tmp_path / "model.pt"
    link.symlink_to(secret)
    err = contained(_load(link), marker, secret="SECRET-FIRST-LINE")
    assert "link" in str(err)


def test_swap_during_load_changes_nothing(tmp_path, marker, monkeypatch):
    """The bytes are read once: a file replaced right after that read is never looked at."""
    path = tmp_path / "mine.pt"
    shutil.copy(BUNDLED, path)
    hostile = bundled_checkpoint()
    hostile["model"].yaml["activation"] = f"__import__('os').system('touch {marker}')"
    original = pickle_data.read_checkpoint

    def swap_then_read(p, data=None):
        torch.save(hostile, p)  # the attacker's swap, after our read
        return original(p, data)

    monkeypatch.setattr(pickle_data, "read_checkpoint", swap_then_read)
    detector = load_detector(path, backend="torch", device="cpu")
    assert detector.model.model.names == {0: "nucleus"} and not marker.exists()


@pytest.mark.parametrize("content", [os.urandom(1024), b"", b"PK\x03\x04", b"\x80\x02K"])
def test_pth_and_garbage_are_one_line(tmp_path, marker, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    contained(
        _load(path), marker, secret=content[:8].decode("latin1") if len(content) > 4 else None
    )


def test_odd_settings_and_names_are_dropped(tmp_path):
    ckpt = bundled_checkpoint()
    ckpt["yolocell"] = {"imgsz": "big", "percentiles": "x", "int8": {"dir": "/"}, "diameter_px": 9}
    ckpt["model"].names = {0: ["not", "a", "name"]}
    path = tmp_path / "odd.pt"
    torch.save(ckpt, path)
    detector = load_detector(path, backend="torch", device="cpu")
    assert detector.spec.diameter_px == 9 and detector.spec.imgsz == ModelSpec("x").imgsz
    assert detector.model.model.names == {0: "0"}
    assert not detector.spec.int8


def test_bundled_weights_are_hash_checked_on_the_bytes_read(tmp_path, monkeypatch):
    """A bundled file replaced after its hash was checked: the bytes loaded are checked."""
    spec = loading.resolve_model("v5")
    fake = tmp_path / "fake.pt"
    ckpt = bundled_checkpoint()
    ckpt["model"].names = {0: "swapped"}
    torch.save(ckpt, fake)
    import dataclasses

    swapped = dataclasses.replace(spec, path=fake)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        loading.make_detector(swapped, backend="torch", device="cpu")
