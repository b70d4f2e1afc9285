"""Architectures from files (issue 21, cases 2, 3 and 9): one schema at every level, no eval.

A checkpoint's ``yaml`` and a YAML given as ``--model`` name modules and an activation that
ultralytics would look up and ``eval``; repeats and widths size the network. Each hostile
architecture must be refused in one line, before any network is built.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml as pyyaml

from napari_yolocell.models import netbuild
from napari_yolocell.models.checkpoints import load_network
from napari_yolocell.models.loading import load_detector

from ._craft import bundled_checkpoint, contained, payload


def _base() -> dict:
    return copy.deepcopy(bundled_checkpoint()["model"].yaml)


def _hostile(marker) -> dict[str, dict]:
    """name -> architecture."""
    out = {}
    a = _base()
    a["activation"] = payload(marker)
    out["top-level activation"] = a
    a = _base()
    a["head"].append([-1, 1, "DetectionModel", [{"activation": payload(marker)}]])
    out["nested DetectionModel layer"] = a
    a = _base()
    a["backbone"][2][3] = [128, {"activation": payload(marker)}]
    out["dict argument"] = a
    a = _base()
    a["backbone"][0][2] = "torch_safe_load"
    out["function as module"] = a
    a = _base()
    a["backbone"][0][2] = "nn.Module"
    out["nn.* outside the list"] = a
    a = _base()
    a["backbone"][0][3] = ["__import__('os')", 3, 2]
    out["expression argument"] = a
    a = _base()
    a["backbone"][2][1] = 10**9
    out["repeats 1e9"] = a
    a = _base()
    a["backbone"][0][3] = [10**7, 6, 2, 2]
    out["width 1e7"] = a
    a = _base()
    a["scales"]["n"] = [2.0, 2.0, 4096]
    a["backbone"][4][1] = 32
    a["backbone"][6][1] = 32
    out["200M+ parameters"] = a
    a = _base()
    a["backbone"][0][3] = [64, 6000, 2, 2]
    out["kernel 6000"] = a
    a = _base()
    a["head"] = a["head"] * 30
    out["too many layers"] = a
    a = _base()
    a["torchvision"] = "ops"
    out["unknown key"] = a
    return out


@pytest.mark.parametrize("name", list(_hostile(None)))
def test_hostile_architecture_in_a_checkpoint(tmp_path, marker, name):
    ckpt = bundled_checkpoint()
    ckpt["model"].yaml = _hostile(marker)[name]
    path = tmp_path / "arch.pt"
    torch.save(ckpt, path)
    contained(
        lambda: load_detector(path, backend="torch", device="cpu"), marker, tmp_path / "cache"
    )


@pytest.mark.parametrize("name", list(_hostile(None)))
def test_hostile_yaml_given_as_model(tmp_path, marker, name):
    path = tmp_path / "x.yaml"
    path.write_text(pyyaml.safe_dump(_hostile(marker)[name]))
    contained(lambda: load_network(path), marker, secret=str(marker))
    contained(lambda: load_detector(path, backend="torch", device="cpu"), marker)


@pytest.mark.parametrize(
    "content",
    [b"N.", b"\x80\x02cos\nsystem\n.", b"!!python/object/apply:os.system ['true']", b"[1, 2]"],
    ids=["pickle-N.", "pickle-global", "yaml-python-tag", "not-a-mapping"],
)
def test_yaml_that_is_not_an_architecture(tmp_path, marker, content):
    path = tmp_path / "model.yaml"
    path.write_bytes(content)
    contained(lambda: load_network(path), marker)


def test_yaml_size_limit(tmp_path, marker):
    path = tmp_path / "big.yaml"
    path.write_text("nc: 1\n" + "# padding\n" * 100_000)
    err = contained(lambda: load_network(path), marker)
    assert "limit" in str(err)


def test_genuine_architectures_pass():
    for name in ("yolov5n.yaml", "yolov6n.yaml", "yolov8n.yaml"):
        netbuild.shipped_architecture(name)
    netbuild.check_ultralytics_yaml(_base())
