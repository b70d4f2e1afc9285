"""Shared pytest fixtures (keep minimal; modules add their own fixtures in their test files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The project's shared data folder lies beside the checkout (``../shared/data``), in
#: development and in CI; override with YOLOCELL_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("YOLOCELL_SHARED_DATA", ROOT.parent / "shared" / "data"))
#: Small real-world fixture files (SVS slide, Roboflow export); override with YOLOCELL_FIXTURES.
FIXTURES_DIR = Path(os.environ.get("YOLOCELL_FIXTURES", SHARED_DATA / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Folder holding the shared real-world fixture files."""
    if not FIXTURES_DIR.is_dir():
        pytest.fail(f"fixture folder {FIXTURES_DIR} not found: set YOLOCELL_FIXTURES")
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared public data folder (BBBC039, DSB2018, Kromp 2020, fixtures)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder {SHARED_DATA} not found: set YOLOCELL_SHARED_DATA")
    return SHARED_DATA


class RecordingArray:
    """Array stand-in that records every window requested from it."""

    def __init__(self, data):
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.ndim = data.ndim
        self.keys = []

    def __getitem__(self, key):
        self.keys.append(key)
        return self.data[key]
