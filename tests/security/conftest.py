"""Fixtures of the hostile-file tests (issue 21): private settings and cache folders, and a
marker file that a payload would create (``_craft.contained`` is the check every case ends
with). This folder is a package, so this conftest never shadows ``tests/conftest.py``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    """Private settings and cache folders for each test; offline ultralytics."""
    monkeypatch.setenv("YOLOCELL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("YOLOCELL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    from napari_yolocell.models import loading

    loading.clear_cache()
    yield
    loading.clear_cache()


@pytest.fixture
def marker(tmp_path) -> Path:
    """The file a payload would create (``touch``): it must never exist."""
    return tmp_path / "PWNED"
