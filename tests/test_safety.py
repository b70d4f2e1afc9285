"""Untrusted weights never run code (issue #14): hostile files, the trust store, bad input."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest

from napari_yolocell.models import safety
from napari_yolocell.models.spec import WeightsError


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOCELL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("YOLOCELL_CACHE_DIR", str(tmp_path / "cache"))


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _hostile_files(folder: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the global its refusal must name)."""
    import torch

    files = {}
    plain = folder / "plain.pt"
    plain.write_bytes(pickle.dumps({"model": _System(marker)}))
    files["plain pickle"] = (plain, "system")

    zipped = folder / "zipped.pt"
    torch.save({"model": _System(marker)}, zipped)
    files["torch.save zip"] = (zipped, "system")

    bundled = Path(__file__).parents[1] / "src/napari_yolocell/models/weights/nucleus_v5n.pt"
    ckpt = torch.load(bundled, weights_only=False)  # a genuine ultralytics checkpoint (ours)
    ckpt["train_args"] = {**ckpt["train_args"], "data": _System(marker)}
    tucked = folder / "tucked.pt"
    torch.save(ckpt, tucked)
    files["payload in train_args"] = (tucked, "system")

    gadget = folder / "exec.pt"
    torch.save({"model": _Exec(marker)}, gadget)
    files["exec gadget"] = (gadget, "builtins.exec")
    return files


def test_hostile_files_are_refused_before_anything_runs(tmp_path):
    from napari_yolocell.models.loading import load_detector

    marker = tmp_path / "pwned"
    for name, (path, offending) in _hostile_files(tmp_path, marker).items():
        for backend in ("torch", "onnxruntime"):
            with pytest.raises(safety.UntrustedModelError) as info:
                load_detector(path, backend=backend, device="cpu")
            message = str(info.value)
            assert "\n" not in message, name
            assert str(path) in message and offending in message and "--trust" in message
            assert info.value.global_name.endswith(offending.rpartition(".")[2])
            assert info.value.size == path.stat().st_size
            assert not marker.exists(), f"{name}: payload ran"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.onnx"))


@pytest.mark.parametrize(
    "gadget",
    [
        "builtins.getattr",
        "builtins.eval",
        "builtins.__import__",
        "posix.system",
        "subprocess.Popen",
        "functools.partial",
        "operator.attrgetter",
        "ultralytics.nn.autobackend.AutoBackend",
        "torch.load",
    ],
)
def test_gadget_globals_are_refused(tmp_path, gadget):
    module, name = gadget.rsplit(".", 1)
    path = tmp_path / "gadget.pt"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R.")
    with pytest.raises(safety.UntrustedModelError) as info:
        safety.read_model_file(path)
    assert info.value.global_name == gadget


def test_allowed_module_class_cannot_be_called(tmp_path):
    """REDUCE on an allowed nn.Module class would run its __init__ with pickled arguments: the
    reader only records the call, and a called module is no network we rebuild."""
    from napari_yolocell.models.checkpoints import load_network

    path = tmp_path / "call.pt"
    path.write_bytes(
        b"\x80\x02}X\x05\x00\x00\x00modelcultralytics.nn.tasks\nDetectionModel\n"
        b"X\x08\x00\x00\x00evil.yml\x85Rs."
    )
    root = safety.read_model_file(path).root
    assert root["model"].name == "ultralytics.nn.tasks.DetectionModel"
    with pytest.raises(WeightsError, match="not a plain module record"):
        load_network(path)


def test_trust_store_round_trip(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not really weights")
    digest = safety.trust(weights)
    assert safety.is_trusted(digest)
    entry = safety.trusted_models()[digest]
    assert entry["size"] == weights.stat().st_size
    assert safety.trust_store_path() == tmp_path / "config" / "trusted.json"
    assert safety.untrust(digest[:12])
    assert not safety.is_trusted(digest)
    assert not safety.untrust(digest)


def test_trusted_file_is_still_read_as_data(tmp_path):
    """A trusted hash lifts the global-name refusal only: the pickle is still never run."""
    marker = tmp_path / "ran"
    path, _ = _hostile_files(tmp_path, marker)["torch.save zip"]
    safety.trust(path)
    from napari_yolocell.models.loading import load_detector

    with pytest.raises(WeightsError, match="no known detection model"):
        load_detector(path, backend="torch", device="cpu")
    assert not marker.exists()
    assert safety.is_trusted(safety.file_sha256(path))


def test_genuine_ultralytics_checkpoint_loads_untrusted(tmp_path):
    """Our own (ultralytics) checkpoint, copied elsewhere: no question asked, no code run."""
    import shutil

    import numpy as np

    from napari_yolocell.models.loading import load_detector

    bundled = Path(__file__).parents[1] / "src/napari_yolocell/models/weights/nucleus_v5n.pt"
    copy = tmp_path / "mine.pt"
    shutil.copy(bundled, copy)
    detector = load_detector(copy, backend="torch", device="cpu")
    boxes = detector.predict([np.zeros((64, 64), np.uint8)], conf=0.5, iou=0.5, max_det=10)
    assert boxes[0].shape[1] == 6


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04 truncated", os.urandom(2048), b"\x80\x02}q\x00(X"],
    ids=["empty", "truncated-zip", "random", "truncated-pickle"],
)
def test_bad_weights_one_line_error(tmp_path, content):
    from napari_yolocell.models.loading import load_detector

    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_detector(path, backend="onnxruntime", device="cpu")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not any((tmp_path / "cache").rglob("*.onnx")) if (tmp_path / "cache").exists() else True


def test_other_task_checkpoint_is_refused(tmp_path):
    import torch

    from napari_yolocell.models.checkpoints import checkpoint_family

    path = tmp_path / "seg.pt"
    data = pickle.dumps({"model": None}, protocol=2).replace(b"}", b"}", 1)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "seg/data.pkl",
            b"\x80\x02}X\x05\x00\x00\x00modelcultralytics.nn.tasks\nSegmentationModel\n)\x81s."
            + data[:0],
        )
    del torch
    with pytest.raises(WeightsError, match="segmentation"):
        checkpoint_family(path)


def test_bad_onnx_is_one_line_error(tmp_path):
    from napari_yolocell.models.loading import load_detector

    path = tmp_path / "random.onnx"
    path.write_bytes(os.urandom(512))
    with pytest.raises(Exception) as info:
        load_detector(path, device="cpu")
    assert "\n" not in str(info.value).strip()


def test_cli_refuses_then_trust_store_commands(tmp_path, capsys):
    import torch

    from napari_yolocell.cli import main

    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": _System(marker)}, hostile)
    image = tmp_path / "img.npy"
    import numpy as np

    np.save(image, np.zeros((64, 64), np.uint8))
    assert main(["detect", "--model", str(hostile), str(image), "--quiet"]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("yolocell: error: refusing to load")
    assert not marker.exists()

    assert main(["models", "--trusted"]) == 0
    assert capsys.readouterr().out == ""
    digest = safety.trust(hostile)  # what --trust records (without running the payload here)
    assert main(["models", "--trusted"]) == 0
    assert capsys.readouterr().out.startswith(digest)
    assert main(["models", "--untrust", digest[:10]]) == 0
    assert not safety.is_trusted(digest)
    assert main(["models", "--untrust", digest]) == 2


def test_untrusted_error_survives_a_process_boundary(tmp_path):
    """Batch workers (processes, dask) send the refusal back pickled: its fields must survive."""
    import pickle

    from napari_yolocell.models.safety import UntrustedModelError

    path = tmp_path / "odd.pt"
    path.write_bytes(b"not a model")
    err = pickle.loads(pickle.dumps(UntrustedModelError(path, "posix.system")))
    assert isinstance(err, UntrustedModelError)
    assert (err.path, err.global_name, err.size) == (path, "posix.system", 11)
    assert "posix.system" in str(err) and "\n" not in str(err)


def test_train_refuses_hostile_checkpoints(tmp_path, capsys):
    """ultralytics would unpickle a .pt given to `yolocell train --model` in full."""
    from napari_yolocell.cli import main

    marker = tmp_path / "pwned"
    for name, (path, offending) in _hostile_files(tmp_path, marker).items():
        code = main(["train", "--data", str(tmp_path), "--model", str(path), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, name
        assert str(path) in err and offending in err
        assert not marker.exists(), f"{name}: payload ran"
