"""Caches that someone else wrote (issue 21, case 7).

Entries are signed with the user's secret key; a planted, copied or edited entry fails its
signature and is rebuilt, never used. Folders are ours and private; a predictable shared
fallback is never accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from napari_yolocell.models import torch_cache, user_cache
from napari_yolocell.models.integrity import file_sha256
from napari_yolocell.models.loading import load_detector

from ._craft import BUNDLED, payload


@pytest.fixture
def mine(tmp_path):
    path = tmp_path / "mine.pt"
    shutil.copy(BUNDLED, path)
    return path


def test_planted_torch_entry_is_rebuilt_not_used(tmp_path, marker, mine):
    """A model.json planted for a genuine file's hash, with a valid body hash: unsigned."""
    key = file_sha256(mine)
    load_detector(mine, backend="torch", device="cpu")  # a genuine entry to copy the shape of
    entry = torch_cache.cache_dir(key)
    body = json.loads((entry / torch_cache.MODEL_FILE).read_text())
    body["architecture"]["yaml"]["activation"] = payload(marker)
    shutil.rmtree(entry)
    entry.mkdir()
    shutil.copy(BUNDLED, entry / torch_cache.WEIGHTS_FILE)  # anything: it is never read
    torch_cache._write_json(entry / torch_cache.MODEL_FILE, body)
    from napari_yolocell.models import loading

    loading.clear_cache()
    with pytest.warns(RuntimeWarning, match="not signed"):
        detector = load_detector(mine, backend="torch", device="cpu")
    assert detector.model.model.names == {0: "nucleus"} and not marker.exists()
    assert user_cache.verify_folder(entry, f"torch-v{torch_cache.CACHE_VERSION}:{key}")


def test_entry_signed_with_another_key_is_rebuilt(tmp_path, mine, monkeypatch):
    load_detector(mine, backend="torch", device="cpu")
    key_file = tmp_path / "config" / user_cache.KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_file.unlink()  # another user's key: the entry no longer verifies
    entry = torch_cache.cache_dir(file_sha256(mine))
    assert not user_cache.verify_folder(entry, f"torch-v1:{file_sha256(mine)}")


def test_planted_onnx_export_is_rebuilt(tmp_path, mine):
    from napari_yolocell.models import export_cache

    key = file_sha256(mine)
    planted = export_cache.export_dir(key, "onnx")
    planted.mkdir(parents=True)
    (planted / "model.onnx").write_bytes(b"planted")
    (planted / "meta.json").write_text("{}")
    detector = load_detector(mine, backend="onnxruntime", device="cpu")
    assert (planted / "model.onnx").read_bytes() != b"planted"
    assert user_cache.verify_folder(planted, f"onnx-v{export_cache.EXPORT_VERSION}:{key}")
    assert detector.model.names == {0: "nucleus"}


def test_sidecar_cannot_name_an_int8_folder(tmp_path, mine):
    planted = tmp_path / "int8"
    planted.mkdir()
    (planted / "model.xml").write_text("<net/>")
    sidecar = mine.with_name("mine.yolocell.json")
    sidecar.write_text(json.dumps({"name": "mine", "int8": {"dir": str(planted), "sha256": {}}}))
    with pytest.raises(ValueError, match="no INT8 version"):
        load_detector(mine, backend="openvino-int8", device="cpu")


def test_shared_cache_folder_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("YOLOCELL_CACHE_DIR", str(shared))
    root = user_cache.cache_root()
    assert root != shared and stat.S_IMODE(root.stat().st_mode) == 0o700
    assert f"exports-{os.getuid()}" not in root.name  # never the old predictable name


def test_link_as_cache_folder_is_refused(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "cache-link"
    link.symlink_to(target)
    with pytest.raises(user_cache.CacheFolderError):
        user_cache.private_dir(link)


def test_key_with_loose_permissions_is_replaced(tmp_path):
    key = user_cache.secret_key()
    path = tmp_path / "config" / user_cache.KEY_FILE
    path.chmod(0o644)
    assert user_cache.secret_key() != key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
