"""Shared pytest fixtures (keep minimal; modules add their own fixtures in their test files).

Tests that read the project's shared public data (``../shared/data``: BBBC039, the SVS slide,
the Roboflow export) carry the ``shared_data`` marker: a test asking for the ``shared_data`` or
``fixtures_dir`` fixture gets it automatically. On a fresh clone without that folder they skip
with a one-line reason; with ``YOLOCELL_REQUIRE_SHARED_DATA=1`` (CI) a missing folder fails them.
"""

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
#: CI sets YOLOCELL_REQUIRE_SHARED_DATA=1: there the data must be present, so missing is an error.
REQUIRE_SHARED_DATA = os.environ.get("YOLOCELL_REQUIRE_SHARED_DATA", "") not in ("", "0")

#: Fixture name -> (folder it serves, environment variable that overrides it).
_SHARED_FIXTURES = {
    "shared_data": (SHARED_DATA, "YOLOCELL_SHARED_DATA"),
    "fixtures_dir": (FIXTURES_DIR, "YOLOCELL_FIXTURES"),
}


def _missing_reason(folder: Path, env: str) -> str:
    """One-line reason for a test that cannot run because ``folder`` is missing."""
    return f"needs the shared data: {folder} not found (set {env})"


def _needed_folders(item: pytest.Item) -> list[tuple[Path, str]]:
    """The shared folders a test needs: from the fixtures it uses, else the marker's default."""
    names = getattr(item, "fixturenames", ())
    needed = [_SHARED_FIXTURES[name] for name in _SHARED_FIXTURES if name in names]
    if not needed and item.get_closest_marker("shared_data"):
        needed = [_SHARED_FIXTURES["shared_data"]]
    return needed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs shared data; skip it here when the folder is missing."""
    for item in items:
        needed = _needed_folders(item)
        if not needed:
            continue
        if not item.get_closest_marker("shared_data"):
            item.add_marker(pytest.mark.shared_data)
        missing = [(folder, env) for folder, env in needed if not folder.is_dir()]
        if missing and not REQUIRE_SHARED_DATA:
            item.add_marker(pytest.mark.skip(reason=_missing_reason(*missing[0])))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under YOLOCELL_REQUIRE_SHARED_DATA=1 a marked test with its folder missing fails."""
    for folder, env in _needed_folders(item):
        if not folder.is_dir():
            pytest.fail(_missing_reason(folder, env), pytrace=False)


def _shared_folder(name: str) -> Path:
    folder, env = _SHARED_FIXTURES[name]
    if not folder.is_dir():  # a fallback: the hooks above have decided before any fixture runs
        if REQUIRE_SHARED_DATA:
            pytest.fail(_missing_reason(folder, env), pytrace=False)
        pytest.skip(_missing_reason(folder, env))
    return folder


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Folder holding the shared real-world fixture files (SVS slide, Roboflow export)."""
    return _shared_folder("fixtures_dir")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared public data folder (BBBC039, DSB2018, Kromp 2020, fixtures)."""
    return _shared_folder("shared_data")


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


@pytest.fixture(autouse=True)
def _private_widget_settings(request: pytest.FixtureRequest, tmp_path_factory, monkeypatch):
    """Widgets remember their settings in the user's config folder: never the real one here."""
    if "make_napari_viewer" in request.fixturenames and "YOLOCELL_CONFIG_DIR" not in os.environ:
        monkeypatch.setenv("YOLOCELL_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))


def reader_imports(path) -> tuple[set[str], set[str]]:
    """Top-level modules imported, in a fresh process, once napari asked our reader about
    ``path`` and once the reader read it: ``(asked, read)``."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from napari_yolocell.shell.reader import napari_get_reader\n"
        "top = lambda: sorted({m.split('.')[0] for m in sys.modules})\n"
        "reader = napari_get_reader(sys.argv[1])\n"
        "asked = top()\n"
        "reader(sys.argv[1])\n"
        "print(json.dumps([asked, top()]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    asked, read = (set(m) for m in json.loads(out.stdout.splitlines()[-1]))
    return asked, read


def write_two_level_pyramid(path, image) -> None:
    """A pyramidal BigTIFF of ``image`` (2-D, even sides) with one half-resolution level, the
    level a 2x2 mean in the image's dtype, both tiled 256 px."""
    import tifffile

    h, w = image.shape
    half = image.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).astype(image.dtype)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(image, tile=(256, 256), subifds=1)
        tw.write(half, tile=(256, 256), subfiletype=1)
