"""The code base stays lint-clean and ruff-formatted (the project's style rule)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "benchmarks", "scripts"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff")
    cmd = [exe] if exe else [sys.executable, "-m", "ruff"]
    return subprocess.run([*cmd, *args, *PATHS], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("args", [("check",), ("format", "--check")])
def test_ruff(args):
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    proc = _ruff(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
