"""INT8 on first use in the Detect and Batch widgets (issue 23), in their worker thread.

Before a run loads its detector, :func:`quantize_first` makes the model's INT8 version once,
as ``yolocell detect`` does (:func:`~napari_yolocell.training.quantize.quantize_on_first_use`):
only for the ``auto`` / ``openvino-int8`` runtimes on a CPU that gains from INT8, for a model
that is not bundled and has no cached INT8 entry, calibrated on the images about to be
detected. Its steps are reported through the worker's one progress channel with
``data=INT8_STEP`` (the progress row shows their text), Cancel stops it between calibration
tiles, and nothing of it runs in the GUI thread.

A quantization that fails, or whose INT8 model fails its check against FP32, leaves the run on
FP32 and tells the user once per napari session, in one line: a ``RuntimeWarning`` from the
worker, which napari shows as a notification. The widgets' "INT8 on first use" setting turns
it off.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from napari_yolocell.engine.detect import Cancelled
from napari_yolocell.models import int8_cache
from napari_yolocell.models.registry import resolve_model
from napari_yolocell.training.quantize import quantize_on_first_use

__all__ = ["INT8_STEP", "QUANTIZE_TIP", "quantize_first"]

#: ``Progress.data`` of the quantization's reports (their text says the step).
INT8_STEP = "int8"
#: Tooltip of the widget setting.
QUANTIZE_TIP = (
    "On a CPU, make an 8-bit (INT8) version of a model that has none (a fine-tuned or foreign "
    "model) the first time it runs, calibrated on the image being detected and checked "
    "against the full-precision model: later runs are 2-3x faster. Takes a minute or two "
    "once; a version that differs from full precision is not used."
)

_FAILED: set[str] = set()
_LOCK = threading.Lock()


def quantize_first(
    model: str,
    backend: str,
    images: Callable[[], Sequence[np.ndarray]],
    report: Callable[..., None],
    cancel: threading.Event,
) -> None:
    """Make ``model``'s INT8 version before its first run (see the module docstring).

    Parameters
    ----------
    model, backend : str
        The run's model and runtime.
    images : callable
        Returns 2-D arrays of the images about to be detected (called only when quantizing).
    report : callable
        The worker's ``report(done, total, text, data)``.
    cancel : threading.Event
        The worker's Cancel.

    Raises
    ------
    napari_yolocell.engine.detect.Cancelled
        Cancel was pressed while quantizing (nothing is cached).
    """
    key = str(model)
    if key in _FAILED:  # failed once in this session: FP32, not tried again
        return

    def say(message: str) -> None:
        report(0, 0, message, INT8_STEP)

    try:
        entry = quantize_on_first_use(model, images, backend=backend, progress=say, cancel=cancel)
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - an optimisation only: the run goes on in FP32
        with _LOCK:
            first = key not in _FAILED
            _FAILED.add(key)
        if first:
            warnings.warn(
                f"INT8 version of {Path(key).name!r} not made ({exc}): running FP32",
                RuntimeWarning,
                stacklevel=2,
            )
        return
    if entry is not None and not entry.used:
        int8_cache.tell_fp32_once(resolve_model(key), entry)
