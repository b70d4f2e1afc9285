"""Shared pytest fixtures (keep minimal; modules add their own fixtures in their test files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Folder with small real-world fixture files (SVS slide, Roboflow export); override with the
#: YOLOCELL_FIXTURES environment variable.
FIXTURES_DIR = Path(os.environ.get("YOLOCELL_FIXTURES", "/work/shared/data/fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Folder holding the shared real-world fixture files."""
    return FIXTURES_DIR
