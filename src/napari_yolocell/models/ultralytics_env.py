"""Make ultralytics safe to import and run offline.

ultralytics reads its settings at import time, may try to sync settings, check for updates,
download fonts (for plots) or pretrained weights. None of that works on a locked-down lab
machine, so every module that touches ultralytics imports it through :func:`import_ultralytics`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from napari_yolocell.models.spec import WeightsError


def _config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    path = Path(base) / "napari-yolocell" / "ultralytics"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home (some clusters): fall back to a temp dir
        path = Path(tempfile.gettempdir()) / "napari-yolocell-ultralytics"
        path.mkdir(parents=True, exist_ok=True)
    return path


def configure_offline() -> None:
    """Set the environment so ultralytics never reaches the network."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(_config_dir()))
    os.environ.setdefault("YOLO_VERBOSE", "False")


def block_triton_on_cpu() -> None:
    """Keep torch from loading triton on machines without an NVIDIA GPU.

    CUDA builds of torch (the default pip wheel on Linux) import triton with torchvision and on
    the first forward pass. triton is useless on CPU, and its bundled LLVM crashes the process
    when Mesa's software OpenGL (napari under Xvfb, VMs, remote desktops) has loaded its own
    LLVM first. A ``None`` entry in ``sys.modules`` makes ``import triton`` fail cleanly, which
    torch handles as "triton not installed". No NVIDIA driver device node means no CUDA, checked
    without importing torch (this runs when the package is imported). Set
    ``YOLOCELL_ALLOW_TRITON=1`` to opt out.
    """
    if "triton" in sys.modules or os.environ.get("YOLOCELL_ALLOW_TRITON") == "1":
        return
    if not os.path.exists("/dev/nvidiactl"):
        sys.modules["triton"] = None


def import_ultralytics():
    """Import ``ultralytics`` offline and with telemetry/sync disabled; return the module."""
    configure_offline()
    block_triton_on_cpu()
    import ultralytics
    from ultralytics.utils import SETTINGS

    try:
        SETTINGS.update(
            {
                "sync": False,
                "hub": False,
                "wandb": False,
                "mlflow": False,
                "tensorboard": False,
                "clearml": False,
                "comet": False,
                "dvc": False,
                "neptune": False,
                "raytune": False,
            }
        )
    except Exception:  # older ultralytics without some keys: settings stay as they are
        pass
    return ultralytics


def load_ultralytics(path: str | Path):
    """Load an ultralytics model from a ``.pt`` checkpoint or a shipped architecture YAML.

    Loading a ``.pt`` file unpickles Python objects: only load weights you trust.

    Raises
    ------
    WeightsError
        (a ValueError) If the file cannot be read as an ultralytics model (names the file).
    """
    from napari_yolocell.models.ultralytics_env import import_ultralytics

    ultralytics = import_ultralytics()
    try:
        return ultralytics.YOLO(str(path), task="detect")
    except Exception as err:  # torch/pickle/zip errors vary: report them uniformly
        raise WeightsError(
            f"cannot load model weights {str(path)!r}: {type(err).__name__}: {err}. "
            "Is it an ultralytics detection checkpoint (.pt)?"
        ) from err
