"""Fixtures of the hostile-file tests (issue 21): private settings and cache folders, and a
marker file that a payload would create (see ``_craft.contained`` for the check every case
ends with)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
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
